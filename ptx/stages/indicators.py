"""The indicators stage: per backbone of a study, indicators of the prompt bank vs transfer, logged to MLflow;
the reference check, and `recommend` (sources for a new task by ON).
"""

import logging

import numpy as np
import pandas as pd
import torch

from ptx import track
from ptx.bank import bank_runs, fetch_prompt, load_bank
from ptx.errors import PtxError
from ptx.indicators import (
    analyse,
    bank_inits,
    displacement_overlap,
    displacement_similarities,
    embedding_similarities,
    stack_prompts,
    summary_metrics,
)

log = logging.getLogger(__name__)
NAME, KIND, UNITS, SECTION = "indicators", track.KIND_INDICATORS, "batches", "indicators"


# ---- activations of a bank on a Ray actor pool -------------------------------------------------------
def compute_bank_activations(backbone_name: str, prompts: torch.Tensor, insertion: str = "prepend",
                             probe: str = "paper", tasks: list | None = None, probe_examples: int = 16,
                             position: str = "score", where: str = "decoder", num_actors: int = 2,
                             resources: dict | None = None, chunk_size: int = 8,
                             fault_marker: str | None = None, describe: bool = False,
                             max_length: int | None = None):
    """Masks of a bank, prompts [P, n, d] -> bool [P, n_layers, d_ff], on a Ray actor pool (one backbone per actor,
    activations.ActivationWorker, looked up at each call).

    probe="examples" reads each prompt with `probe_examples` training examples of its own task (`tasks[i]`),
    each cut to `max_length` tokens when given (a study's data.max_length).
    describe=True returns (masks, {kind, hooks}): the backbone kind and the hooked modules' names.
    """
    from ptx import activations, progress, sweep
    from ptx.activations import Probe
    from ptx.io import cache_dir

    probe = activations.parse_enum(Probe, probe, "probe").value
    if probe == Probe.EXAMPLES.value and (tasks is None or len(tasks) != len(prompts)):
        raise PtxError(f"probe 'examples' needs one task per prompt: {len(prompts)} prompts, "
                       f"{'no' if tasks is None else len(tasks)} tasks")
    keys = tasks if probe == Probe.EXAMPLES.value else [None] * len(prompts)
    items, order = [], []
    for task in dict.fromkeys(keys):  # chunks never mix tasks: an actor encodes each task's examples once
        idx = [i for i, t in enumerate(keys) if t == task]
        for s in range(0, len(idx), chunk_size):
            part = idx[s: s + chunk_size]
            items.append({"prompts": prompts[part].float().numpy(), "task": task})
            order += part
    config = {"backbone": backbone_name, "insertion": insertion, "probe": probe, "position": position,
              "where": where, "probe_examples": probe_examples, "prompts_per_pass": chunk_size,
              "cache_dir": str(cache_dir()), "fault_marker": fault_marker, "max_length": max_length}
    bar = progress.current()  # the indicators stage's: units are these activation batches
    bar.update(total=bar.total + len(items))
    parts = sweep.map_actors(activations.ActivationWorker, "masks", items, num_actors=num_actors, resources=resources,
                             name="activations", init_args=(config,), on_done=lambda i, part: bar.advance(1))
    packed = np.concatenate([np.frombuffer(p["packed"], np.uint8).reshape(p["rows"], -1) for p in parts])
    masks = activations.unpack_masks(packed, parts[0]["n_layers"], parts[0]["d_ff"])
    out = torch.empty_like(masks)
    out[torch.tensor(order)] = masks  # back to the caller's prompt order
    return (out, {"kind": parts[0]["kind"], "hooks": parts[0]["hooks"]}) if describe else out



def _own_runs(runs) -> dict:
    """Per task, the prompt(s) that stand for it as a target: the run tagged ptx.best=true, else all its runs."""
    own: dict = {}
    for r in runs:
        own.setdefault(r.tags.get("ptx.task"), []).append(r)
    return {t: [r.run_id for r in rs if r.tags.get("ptx.best") == "true"] or [r.run_id for r in rs]
            for t, rs in own.items()}


def _transfer_table(tracker, backbone: str, study: str, table) -> pd.DataFrame:
    if table is None:
        from ptx.stages.transfer import load_transfer_table  # its PtxError: run the transfer stage first

        table = load_transfer_table(tracker, backbone, study)
    if table is None or len(table) == 0:
        raise PtxError(f"no transfer table for backbone '{backbone}' in {tracker.uri}; run the transfer stage first")
    return table[table["backbone"] == backbone] if "backbone" in table.columns else table


def run_indicators_stage(spec, tracker, workdir, transfer_table: pd.DataFrame | None = None,
                         force: bool = False) -> dict:
    """Per backbone of a study: embedding indicators + ON (actor pool) vs transfer, logged as ptx.kind=indicators.

    Returns {study, backbones: {name: {run_id, reused, artifacts, n_prompts, spearman: {indicator: mean}}},
    computed, skipped}. A backbone whose bank, settings and transfer table already have a finished run is skipped
    (unless `force`).
    """
    import dataclasses
    import time
    from pathlib import Path

    from ptx.activations import ACTIVE_RULE, overlap_matrices, save_masks
    from ptx.io import config_hash

    ind, out = spec.indicators, {"study": spec.name, "backbones": {}, "computed": 0, "skipped": 0}
    tracker = tracker.for_experiment(spec.name, Path(workdir))  # stages read and write the study's experiment
    cap = spec.data.max_length if ind.probe == "examples" else None  # the paper probe reads no task text
    for backbone in spec.backbones:
        runs = bank_runs(tracker, backbone, spec.tasks)
        if len(runs) < 2:
            raise PtxError(f"backbone '{backbone}': the bank has {len(runs)} finished prompt run(s) for the study's "
                           "tasks; expected at least 2 (run the train stage first)")
        table = _transfer_table(tracker, backbone, spec.name, transfer_table)
        digest = config_hash({"stage": "indicators", "backbone": backbone, "runs": sorted(r.run_id for r in runs),
                              "settings": dataclasses.asdict(ind),
                              "transfer": int(pd.util.hash_pandas_object(table, index=False).sum()),
                              **({"max_length": cap} if cap is not None else {})})
        tags = {"ptx.kind": KIND, "ptx.backbone": backbone, "ptx.study": spec.name, "ptx.config_hash": digest}
        with tracker.run(track.run_name("indicators", spec.name, backbone), tags, reuse=not force) as run:
            if run.reused:
                out["backbones"][backbone] = {"run_id": run.run_id, "reused": True}
                out["skipped"] += 1
                continue
            t0 = time.perf_counter()
            bank = load_bank(tracker, runs, workdir)
            ids, tasks, insertion = list(bank.ids), list(bank.tasks), bank.insertion
            prompts = stack_prompts(bank.prompts)
            matrices = embedding_similarities(prompts, drop_first=insertion == "paper")
            inits = bank_inits(bank, backbone, insertion)
            if inits is not None:
                matrices.update(displacement_similarities(prompts, inits, drop_first=insertion == "paper"))
            both = torch.cat([prompts, inits]) if inits is not None else prompts  # inits' masks: ON's displacement
            masks, info = compute_bank_activations(backbone, both, insertion, ind.probe,
                                                   tasks * (2 if inits is not None else 1), ind.probe_examples,
                                                   getattr(ind, "position", "score"), ind.hook, ind.num_actors,
                                                   dataclasses.asdict(ind.resources), describe=True, max_length=cap)
            if inits is not None:
                masks, init_masks = masks[:len(ids)], masks[len(ids):]
            matrices.update(overlap_matrices(masks, ind.windows, getattr(ind, "window_stride", None)))
            if inits is not None:
                matrices.update(displacement_overlap(masks, init_masks))
            run_id = run.run_id
            art = Path(workdir).resolve() / "indicators" / run_id
            save_masks(art / "activations", masks, {
                "backbone": backbone, "backbone_kind": info["kind"], "hook_modules": info["hooks"],
                "active": ACTIVE_RULE.get(info["kind"], "value > 0"), "insertion": insertion, "probe": ind.probe,
                "where": ind.hook,
                "position": getattr(ind, "position", "score"), "prompt_runs": ids, "prompt_tasks": tasks,
                "probe_examples": ind.probe_examples if ind.probe == "examples" else None})
            tables = analyse(table, matrices, ids, tasks, _own_runs(runs), art / "tables", ind.bootstrap,
                             seeds=[r.tags.get("ptx.seed") for r in runs])
            (art / "indicators").mkdir()  # where TPT's `indicator:<name>` source reads its ranking
            tables["recommendations"].to_parquet(art / "indicators" / "recommendations.parquet", index=False)
            tracker.log(run_id, {**summary_metrics(tables), "n_prompts": len(ids), "seconds": time.perf_counter() - t0},
                        params={"indicators": dataclasses.asdict(ind), "n_prompts": len(ids)})
            tracker.log_artifacts(run_id, art)
        spearman = tables["correlations"].query("method == 'spearman'")
        out["backbones"][backbone] = {"run_id": run_id, "reused": False, "artifacts": str(art), "n_prompts": len(ids),
                                      "spearman": dict(zip(spearman.indicator, spearman.mean_over_targets, strict=True))}
        out["computed"] += 1
    return out


# ---- reference check: the authors' released prompts and zero-shot results ------------------------------
def reference_check(reference_dir, tracker, workdir, bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Import the released prompts (prompts/BACKBONE/TASK.pt) through `import_prompt`, correlate the embedding
    indicators with zero_shot_transfer.csv; one summary row per (backbone, indicator, method).

    RoBERTa prompts are imported with insertion 'paper' and row 0 is left out of the similarities (the authors'
    code overwrote it with <mask>). Files whose name is not a registered task (random.pt) are not imported.
    """
    from pathlib import Path

    from ptx.prompt import load_prompt
    from ptx.prompt_runs import import_prompt
    from ptx.tasks import list_tasks

    root, workdir = Path(reference_dir), Path(workdir).resolve()
    csv = root / "zero_shot_transfer.csv"
    if not csv.is_file() or not (root / "prompts").is_dir():
        raise PtxError(f"reference dir {root}: expected prompts/BACKBONE/TASK.pt and zero_shot_transfer.csv")
    zero_shot = pd.read_csv(csv)
    known, out = {t.name for t in list_tasks()}, []
    for bdir in sorted(p for p in (root / "prompts").iterdir() if p.is_dir()):
        backbone, insertion = bdir.name, "paper" if "roberta" in bdir.name else "prepend"
        ids, tasks, prompts = [], [], []
        for f in sorted(bdir.glob("*.pt")):
            if f.stem not in known:
                log.info("%s: '%s' is not a registered task; not imported", f, f.stem)
                continue
            run = import_prompt(f, backbone, f.stem, insertion, workdir, tracker)
            local = run.artifact
            if not (local / "prompt.json").is_file():  # imported earlier into another workdir
                local = fetch_prompt(tracker, run.run_id, workdir)
            ids.append(run.run_id or local.name)
            tasks.append(f.stem)
            prompts.append(load_prompt(local).prompt)
        matrices = embedding_similarities(stack_prompts(prompts), drop_first=insertion == "paper")
        zs = zero_shot[zero_shot["backbone"] == backbone]
        own = zs[zs["source_prompt"] == zs["target_task"]].set_index("target_task")["value"]
        zs = zs.assign(source_task=zs["source_prompt"], source_prompt_run=zs["source_prompt"].map(dict(zip(tasks, ids, strict=True))),
                       relative_value=zs["value"] / zs["target_task"].map(own))
        tables = analyse(zs, matrices, ids, tasks, None, workdir / "reference_check" / backbone, bootstrap, seed)
        if tracker.enabled:
            with tracker.run(f"reference check {backbone}", {
                    "ptx.kind": KIND, "ptx.backbone": backbone, "ptx.study": "reference-check",
                    "ptx.origin": "reference"}, reuse=False) as run:
                tracker.log(run.run_id, {**summary_metrics(tables), "n_prompts": len(ids)}, params={"reference_dir": str(root)})
                tracker.log_artifacts(run.run_id, workdir / "reference_check" / backbone)
        out.append(tables["correlations"].assign(backbone=backbone, n_prompts=len(ids)))
    if not out:
        raise PtxError(f"reference dir {root}: no backbone folders under prompts/")
    df = pd.concat(out, ignore_index=True)
    return df[["backbone", *[c for c in df.columns if c != "backbone"]]]


# ---- recommending sources for a new task (beyond the paper, SPoT-style) ---------------------------------
def recommend(task: str, backbone_name: str, tracker, workdir, top_k: int = 5, probe_steps: int = 50,
              probe_lr: float = 3e-2, train_limit: int = 256, dev_limit: int = 64, where: str = "decoder",
              seed: int = 0) -> list[dict]:
    """Rank the bank's prompts on `backbone_name` as sources for `task`: rows {source_run, source_task, on, rank}.

    A probe prompt is tuned on the task for `probe_steps` steps (train_prompt, not logged), then every bank
    prompt is ranked by ON (cosine of active-neuron masks, paper probe, all layers) against it.
    """
    from ptx.activations import capture_activations, overlap_counts, overlap_from_counts
    from ptx.backbones import load_backbone
    from ptx.data import encode_split
    from ptx.prompt import init_prompt
    from ptx.tasks import load_task
    from ptx.train import TrainSettings, train_prompt

    spec = load_task(task)
    runs = [r for r in bank_runs(tracker, backbone_name, experiment_ids=tracker.all_experiment_ids())
            if r.tags.get("ptx.task") != spec.name]
    if not runs:
        raise PtxError(f"no finished prompt run on backbone '{backbone_name}' for a task other than '{task}' in "
                       f"{tracker.uri}; train or import a bank first")
    bank = load_bank(tracker, runs, workdir)
    ids, tasks, prompts, insertion = bank.ids, bank.tasks, stack_prompts(bank.prompts), bank.insertion
    backbone = load_backbone(backbone_name, insertion=insertion)
    init = init_prompt(backbone, prompts.shape[1], "random", seed=seed, task=spec.name)
    settings = TrainSettings(steps=probe_steps, eval_every=probe_steps, lr=probe_lr, seed=seed, batch_size=16)
    probe = train_prompt(backbone, spec, init, encode_split(spec, backbone, "train", limit=train_limit),
                         encode_split(spec, backbone, "dev", limit=dev_limit), settings)
    masks = capture_activations(backbone, torch.cat([probe.prompt[None], prompts]), where=where)
    inter, counts = overlap_counts(masks)
    on = overlap_from_counts(inter.sum(0), counts.sum(0))[0, 1:]
    order = torch.argsort(on, descending=True, stable=True)[:top_k].tolist()
    return [{"source_run": ids[i], "source_task": tasks[i], "on": float(on[i]), "rank": r + 1,
             "probe_dev_metric": probe.best_metric} for r, i in enumerate(order)]


def run(spec, tracker, workdir, *, force: bool = False, max_concurrent: int | None = None,
        address: str | None = None, transfer_table: pd.DataFrame | None = None) -> dict:
    """The stage's entry: run_indicators_stage (the actor pool's size is `indicators.num_actors`); `transfer_table`
    correlates with that table instead of the transfer stage's (`ptx indicators --transfer-table`)."""
    return run_indicators_stage(spec, tracker, workdir, transfer_table=transfer_table, force=force)
