"""The transfer stage: the study's zero-shot transfer matrix per backbone, resumable.

A matrix unit is one (backbone, target task), its own MLflow run (`ptx.kind=transfer_unit`) keyed by a config
hash, so an interrupted matrix resumes with only its missing units. The work is finer: each unit's sources (the
random prompt among them) are cut into chunks and every (chunk, target) is one Ray task, enough of them that
every core stays busy to the end and the progress line moves as chunks finish; the driver assembles a target's
chunks into its table (relative values need every source's score) and logs the unit when its last chunk lands.
"""

import dataclasses
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ptx import progress, track
from ptx.bank import load_bank, select_runs
from ptx.errors import PtxError
from ptx.figures import transfer_heatmaps
from ptx.io import config_hash
from ptx.transfer import (
    KIND_UNIT,
    RANDOM,
    RANDOM_PROMPTS,
    SCHEMA,
    Source,
    add_random_mean,
    bank_sources,
    check_targets,
    chunk_sizes,
    describe_prompt,
    init_sources,
    matrix_rows,
    random_length,
    random_sources,
    score_sources,
    task_spec,
    transfer_matrix,
)

log = logging.getLogger(__name__)
NAME, KIND, UNITS, SECTION = "transfer", track.KIND_TRANSFER, "pairs", "transfer"


# ---- the matrix and table from the store -------------------------------------------------------------------------------
def transfer_matrix_from_store(tracking_uri: str, backbone, tasks=None, splits=("dev", "test"), limits=None,
                               experiment: str | None = None, workdir=None, sources: str = "all", **kwargs):
    """Notebook API: the matrix of every prompt of `backbone` in an MLflow store, as a pandas DataFrame."""
    from ptx.backbones import load_backbone
    from ptx.io import cache_dir

    tracker = track.open(tracking_uri, experiment or track.DEFAULT_EXPERIMENT)
    name = backbone if isinstance(backbone, str) else backbone.name
    ids = [tracker.experiment_id] if experiment else tracker.all_experiment_ids()
    local = Path(workdir) if workdir else cache_dir()
    bank = load_bank(tracker, select_runs(tracker, name, tasks, sources, ids), local).by_run()
    if not bank:
        raise PtxError(f"the prompt bank for backbone '{name}' in {tracking_uri} is empty (tasks: {tasks or 'all'})")
    if isinstance(backbone, str):
        backbone = load_backbone(name, insertion=next(iter(bank.values())).meta.get("insertion", "prepend"))
    targets = tasks or sorted({a.meta["task"]["name"] for a in bank.values()})
    return transfer_matrix(backbone, bank, targets, splits, limits, **kwargs).to_pandas()


def load_transfer_table(tracker, backbone: str, study: str | None = None):
    """The latest finished transfer matrix of `backbone` (optionally of one study) as a pandas DataFrame."""
    runs = tracker.find_runs({"ptx.kind": track.KIND_TRANSFER, "ptx.backbone": backbone, "ptx.study": study},
                             order_by=["attributes.start_time DESC"], experiment_ids=tracker.all_experiment_ids())
    if not runs:
        raise PtxError(f"no finished transfer run for backbone '{backbone}'" + (f" of study '{study}'" if study else "")
                       + f" in {tracker.uri}: run the transfer stage first (ptx transfer matrix SPEC)")
    return tracker.read_table(runs[0].run_id, track.KIND_TRANSFER, "transfer.parquet").to_pandas()


# ---- the transfer stage ---------------------------------------------------------------------------------
_LOADED: dict = {}  # one backbone per worker process: consecutive units of a backbone skip the reload


def _backbone(name: str, insertion: str):
    from ptx.backbones import load_backbone

    key = (name, insertion)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_backbone(name, insertion=insertion, device="cuda" if torch.cuda.is_available() else None)
    return _LOADED[key]


def run_chunk(chunk: dict) -> dict:
    """Ray task: score one chunk of the bank (and maybe the random prompt) on one target; the driver assembles a
    target's chunks into its table. Returns {scores: [(source, split, value)], sizes, seconds}."""
    t0 = time.perf_counter()
    bb = _backbone(chunk["backbone"], chunk["insertion"])
    target = task_spec(chunk["target"], chunk.get("max_length"))
    sources = bank_sources(chunk["prompts"], bb) if chunk["prompts"] else []
    if chunk["random_tokens"]:  # the target's own seeded random prompts, scored together in this chunk
        sources += random_sources(bb, chunk["random_tokens"], chunk["seed"], chunk["target"], chunk["random_prompts"])
    if chunk.get("init_baseline") and chunk["prompts"]:  # the untrained starts of this chunk's own-task prompts
        sources += init_sources(bb, chunk["prompts"], chunk["target"])
    predictions: list = []  # the own and random prompts' answers per example, for the paired test in the report
    scores, sizes = score_sources(bb, sources, target, chunk["splits"], chunk["limits"], chunk["prompts_per_pass"],
                                  chunk["batch_size"], predictions=predictions)
    return {"scores": [(name, split, float(v)) for (name, split), v in scores.items()], "sizes": sizes,
            "predictions": predictions, "seconds": time.perf_counter() - t0}


def plan_units(targets: list, sources: list, random_baseline: bool, slots: int, prompts_per_pass: int) -> list:
    """[(target, [source names], with the random prompt)]: each target's sources (the random prompt last) cut into
    chunks (ptx.transfer.chunk_sizes), in target order so that targets complete, and are logged, one after another."""
    names = [*sources, RANDOM] if random_baseline else list(sources)
    units = []
    for target in targets:
        start = 0
        for size in chunk_sizes(len(names), len(targets), slots, prompts_per_pass):
            part = names[start:start + size]
            start += size
            units.append((target, [n for n in part if n != RANDOM], RANDOM in part))
    return units


def _log_unit(tracker, unit: dict, table: pa.Table, seconds: float, predictions: list) -> None:
    """One target's matrix as its own run (ptx.kind=transfer_unit), keyed by the unit's config hash, with the
    per-example predictions of its own and random prompts when it has any."""
    name = track.run_name("transfer", unit["target"], unit["backbone"])
    with tracker.run(name, unit["tags"], unit["parent"], reuse=False) as run:
        tracker.log_table(run.run_id, table, KIND_UNIT, "unit.parquet")
        if predictions:
            tracker.log_table(run.run_id, pa.Table.from_pylist(predictions), KIND_UNIT, "predictions.parquet")
        tracker.log(run.run_id, {"rows": table.num_rows, "seconds": seconds},
                    params={"sources": unit["n_sources"], "splits": list(unit["splits"]), "limits": unit["limits"]})


def _compute_targets(todo: list, bank: dict, unit_of: dict, cfg, address, bar) -> dict:
    """Score `todo` targets over (source chunk, target) Ray tasks; log each target's unit run as its last chunk
    lands. Returns {target: table}."""
    from ptx import sweep
    from ptx.packing import packing

    sweep.connect(address)
    res = dataclasses.asdict(cfg.resources)
    slots = sum(packing(res, n["resources"])["trials"] for n in sweep.live_nodes())  # tasks the cluster runs at once
    first = unit_of[todo[0]]
    plan = plan_units(todo, list(bank), first["random_baseline"], slots, cfg.prompts_per_pass)
    lengths = [a.prompt.shape[0] for a in bank.values()]
    chunks = [{"backbone": first["backbone"], "insertion": first["insertion"], "target": t, "seed": first["seed"],
               "max_length": first.get("max_length"), "splits": list(cfg.splits), "limits": first["limits"],
               "prompts": {rid: (bank[rid].prompt, bank[rid].meta) for rid in names},
               "random_tokens": random_length(lengths) if with_random else None,
               "random_prompts": first["random_prompts"], "init_baseline": first.get("init_baseline", False),
               "prompts_per_pass": cfg.prompts_per_pass, "batch_size": cfg.batch_size}
              for t, names, with_random in plan]
    left = {t: sum(1 for u in plan if u[0] == t) for t in todo}
    scores, sizes, seconds, tables = {t: {} for t in todo}, {}, dict.fromkeys(todo, 0.0), {}
    predictions = {t: [] for t in todo}
    described = [Source(rid, a.prompt, *describe_prompt(a.meta, rid)) for rid, a in bank.items()]
    if first["random_baseline"]:
        described.append(Source(RANDOM, None, RANDOM, RANDOM))

    def landed(i: int, got: dict) -> None:
        target = plan[i][0]
        scores[target].update({(name, split): v for name, split, v in got["scores"]})
        sizes[target] = got["sizes"]
        seconds[target] += got["seconds"]
        predictions[target] += got["predictions"]
        left[target] -= 1
        bar.advance(len(plan[i][1]) + plan[i][2])  # this chunk's (source, target) pairs
        if not left[target]:  # the target's last chunk: its table is complete
            unit, spec = unit_of[target], task_spec(target, first.get("max_length"))
            if first["random_baseline"]:  # the matrix's one random row: the mean of the target's random prompts
                add_random_mean(scores[target], first["random_prompts"], unit["splits"])
            rows = matrix_rows(unit["backbone"], described, spec, unit["splits"], scores[target], sizes[target])
            tables[target] = pa.Table.from_pylist(rows, schema=SCHEMA)
            _log_unit(unit["tracker"], unit, tables[target], seconds[target], predictions[target])

    sweep.map_tasks(run_chunk, chunks, res, names=[f"transfer-{first['backbone']}-{t}-{i}".replace("/", "_")
                                                   for i, (t, _, _) in enumerate(plan)], on_done=landed)
    return tables


def run_transfer_stage(spec, tracker, workdir: Path, address: str | None = None, force: bool = False) -> dict:
    """Compute or resume the study's transfer matrix per backbone: a missing (backbone, target) unit is scored over
    (source chunk, target) Ray tasks and logged as one run when its last chunk lands. `force`: every unit and the
    matrix are computed again, finished runs or not."""
    workdir = Path(workdir).resolve()
    # stages read and write the study's experiment (where its sweeps log), whatever `tracker` points at
    tracker, cfg = tracker.for_experiment(spec.name, workdir), spec.transfer
    limits = {"dev": spec.data.dev_limit, "test": spec.data.test_limit}
    targets = [task_spec(t, spec.data.max_length) for t in spec.tasks]
    out = {"study": spec.name, "backbones": {}, "computed": 0, "skipped": 0}
    bar = progress.current()  # units: (source prompt, target) pairs; the total grows per backbone
    for name in spec.backbones:
        runs = select_runs(tracker, name, set(spec.tasks), getattr(cfg, "sources", "all"), [tracker.experiment_id])
        bank = load_bank(tracker, runs, workdir).by_run()
        if not bank:
            raise PtxError(f"the prompt bank for backbone '{name}' of study '{spec.name}' is empty in {tracker.uri}: "
                           "run the train stage first")
        kind = next(iter(bank.values())).meta["backbone"].get("kind")
        if kind:  # fail here, before any worker starts, on a target this backbone cannot score
            check_targets(name, kind, targets)
        base = {"backbone": name, "sources": sorted(bank), "splits": list(cfg.splits), "limits": limits,
                "random_baseline": cfg.random_baseline, "seed": spec.seeds[0], "insertion": spec.insertion,
                "random_prompts": RANDOM_PROMPTS}
        if spec.data.max_length is not None:  # only when set: units computed before the field existed keep their hash
            base["max_length"] = spec.data.max_length
        if cfg.init_baseline:  # likewise
            base["init_baseline"] = True
        hashes = {t.name: config_hash({**base, "target": t.name}) for t in targets}
        digest = config_hash(sorted(hashes.values()))
        done = {t: None if force else tracker.finished_run(KIND_UNIT, h) for t, h in hashes.items()}
        todo = [t for t in spec.tasks if done[t] is None]
        pairs = len(bank) + bool(cfg.random_baseline)  # rows of the matrix per target and split
        bar.update(total=bar.total + pairs * len(targets), done=bar.done + pairs * (len(targets) - len(todo)))
        tags = {"ptx.kind": KIND, "ptx.backbone": name, "ptx.study": spec.name, "ptx.config_hash": digest}
        with tracker.run(track.run_name("transfer", spec.name, name), tags, reuse=not todo) as run:
            if run.reused:
                out["backbones"][name] = {"run_id": run.run_id, "units": len(targets), "computed": 0,
                                          "sources": len(bank), "reused": True}
                out["skipped"] += len(targets)
                continue
            parent = run.run_id
            unit_of = {t: {**base, "target": t, "tracker": tracker, "parent": parent, "n_sources": len(bank),
                           "tags": {"ptx.kind": KIND_UNIT, "ptx.backbone": name, "ptx.task": t, "ptx.study": spec.name,
                                    "ptx.config_hash": hashes[t]}} for t in todo}
            tables = _compute_targets(todo, bank, unit_of, cfg, address, bar) if todo else {}
            tables.update({t: tracker.read_table(r.run_id, KIND_UNIT, "unit.parquet")
                           for t, r in done.items() if r is not None})
            table = pa.concat_tables([tables[t] for t in spec.tasks])
            local = workdir / "transfer" / name.replace("/", "_")
            _gather_predictions(tracker, [hashes[t] for t in spec.tasks], local)
            summary = _log_matrix(tracker, parent, table, local)
        out["backbones"][name] = {"run_id": parent, "units": len(targets), "computed": len(todo),
                                  "sources": len(bank), "reused": False, **summary}
        out["computed"] += len(todo)
        out["skipped"] += len(targets) - len(todo)
    return out


def _gather_predictions(tracker, unit_hashes: list, local: Path) -> None:
    """LOCAL/predictions.parquet: the units' per-example predictions (units logged before they existed have none)."""
    parts = []
    for h in unit_hashes:
        run = tracker.finished_run(KIND_UNIT, h)
        if run is None:
            continue
        try:
            parts.append(tracker.read_table(run.run_id, KIND_UNIT, "predictions.parquet"))
        except (PtxError, OSError):
            log.info("transfer unit %s has no per-example predictions", run.run_id)
    local.mkdir(parents=True, exist_ok=True)
    if parts:
        tmp = local / "predictions.parquet.tmp"
        pq.write_table(pa.concat_tables(parts), tmp)
        tmp.replace(local / "predictions.parquet")


def _log_matrix(tracker, run_id: str, table: pa.Table, local: Path) -> dict:
    """Write the long table and one heatmap per split and log them to the transfer run."""
    local.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, local / "transfer.parquet")
    df = table.to_pandas()
    for split in df["split"].unique():
        transfer_heatmaps(df, split, local / f"heatmap_{split}.png", df.backbone.iloc[0] if "backbone" in df else "")
    bank = df[df.source_prompt_run != RANDOM]
    off = bank[bank.source_task != bank.target_task]
    metrics = {"rows": len(df), "sources": df.source_prompt_run.nunique(), "targets": df.target_task.nunique()}
    for split in df["split"].unique():
        metrics[f"{split}_mean_relative_offdiag"] = float(off[off.split == split].relative_value.mean())
    tracker.log(run_id, metrics)
    tracker.log_artifacts(run_id, local, track.KIND_TRANSFER)
    return {"parquet": str(local / "transfer.parquet"), "rows": len(df)}


def run(spec, tracker, workdir, *, force: bool = False, max_concurrent: int | None = None,
        address: str | None = None) -> dict:
    """The stage's entry: run_transfer_stage (`max_concurrent` is the train stage's: chunks fill the cluster)."""
    return run_transfer_stage(spec, tracker, workdir, address=address, force=force)
