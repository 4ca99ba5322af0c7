"""The transfer stage: the study's zero-shot transfer matrix per backbone, resumable.

A matrix unit is one (backbone, target task): one Ray task loads the backbone, tokenizes each target split
once and scores every bank prompt on it (ptx.transfer.transfer_matrix). Each unit is its own MLflow run
(`ptx.kind=transfer_unit`) keyed by a config hash, so an interrupted matrix resumes with only its missing units.
"""

import dataclasses
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ptx import progress, track
from ptx.errors import PtxError
from ptx.figures import transfer_heatmaps
from ptx.io import config_hash
from ptx.prompt import load_prompt
from ptx.transfer import (
    KIND_UNIT,
    RANDOM,
    RANDOM_PROMPTS,
    _spec,
    check_targets,
    transfer_matrix,
)

log = logging.getLogger(__name__)


# ---- the matrix and table from the store -------------------------------------------------------------------------------
def transfer_matrix_from_store(tracking_uri: str, backbone, tasks=None, splits=("dev", "test"), limits=None,
                               experiment: str | None = None, workdir=None, sources: str = "all", **kwargs):
    """Notebook API: the matrix of every prompt of `backbone` in an MLflow store, as a pandas DataFrame."""
    from ptx.backbones import load_backbone
    from ptx.io import cache_dir

    tracker = track.MlflowTracker(tracking_uri, experiment or track.DEFAULT_EXPERIMENT)
    name = backbone if isinstance(backbone, str) else backbone.name
    ids = [tracker.experiment_id] if experiment else tracker.all_experiment_ids()
    local = Path(workdir) if workdir else cache_dir()
    bank = {r.run_id: load_prompt(tracker.fetch_prompt(r.run_id, local)) for r in tracker.bank(name, tasks, sources, ids)}
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


def run_unit(unit: dict) -> pa.Table:
    """Ray task: score the whole bank on one target, then log the unit as its own MLflow run."""
    t0 = time.perf_counter()
    bb = _backbone(unit["backbone"], unit["insertion"])
    target = _spec(unit["target"], unit.get("max_length"))
    predictions: list = []  # the own and random prompts' answers per example, for the paired test in the report
    table = transfer_matrix(bb, unit["prompts"], [target], unit["splits"], unit["limits"],
                            unit["prompts_per_pass"], unit["batch_size"], unit["random_baseline"], unit["seed"],
                            random_prompts=unit.get("random_prompts", 1), predictions=predictions)
    tracker = track.MlflowTracker(unit["tracking_uri"], unit["experiment"], workdir=Path(unit["workdir"]))
    run_id = tracker.start_run(track.run_name("transfer", unit["target"], unit["backbone"]), unit["tags"], unit["parent"])
    tracker.log_table(run_id, table, KIND_UNIT, "unit.parquet")
    if predictions:
        tracker.log_table(run_id, pa.Table.from_pylist(predictions), KIND_UNIT, "predictions.parquet")
    tracker.log(run_id, {"rows": table.num_rows, "seconds": time.perf_counter() - t0},
                params={"sources": len(unit["prompts"]), "splits": list(unit["splits"]), "limits": unit["limits"]})
    tracker.finish(run_id)
    return table


def _study_tracker(spec, tracker, workdir: Path):
    """Stages read and write the study's experiment (where its sweeps log), whatever `tracker` points at."""
    return tracker.for_experiment(spec.name, workdir)


def run_transfer_stage(spec, tracker, workdir: Path, address: str | None = None) -> dict:
    """Compute or resume the study's transfer matrix per backbone: one Ray task per missing (backbone, target) unit."""
    from ptx import sweep

    workdir = Path(workdir).resolve()
    tracker, cfg = _study_tracker(spec, tracker, workdir), spec.transfer
    limits = {"dev": spec.data.dev_limit, "test": spec.data.test_limit}
    targets = [_spec(t, spec.data.max_length) for t in spec.tasks]
    out = {"study": spec.name, "backbones": {}, "computed": 0, "skipped": 0}
    bar = progress.current()  # units: (source prompt, target) pairs; the total grows per backbone
    for name in spec.backbones:
        bank = {r.run_id: load_prompt(tracker.fetch_prompt(r.run_id, workdir))
                for r in tracker.bank(name, set(spec.tasks), getattr(cfg, "sources", "all"), [tracker.experiment_id])}
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
        hashes = {t.name: config_hash({**base, "target": t.name}) for t in targets}
        digest = config_hash(sorted(hashes.values()))
        done = {t: tracker.finished_run(KIND_UNIT, h) for t, h in hashes.items()}
        todo = [t for t in spec.tasks if done[t] is None]
        previous = tracker.finished_run(track.KIND_TRANSFER, digest)
        pairs = len(bank) + bool(cfg.random_baseline)  # rows of the matrix per target and split
        bar.update(total=bar.total + pairs * len(targets), done=bar.done + pairs * (len(targets) - len(todo)))
        if not todo and previous is not None:
            out["backbones"][name] = {"run_id": previous.run_id, "units": len(targets), "computed": 0,
                                      "sources": len(bank), "reused": True}
            out["skipped"] += len(targets)
            continue
        parent = tracker.start_run(track.run_name("transfer", spec.name, name), {
            "ptx.kind": track.KIND_TRANSFER, "ptx.backbone": name, "ptx.study": spec.name, "ptx.config_hash": digest})
        try:
            units = [{**base, "target": t, "prompts": {rid: (a.prompt, a.meta) for rid, a in bank.items()},
                      "prompts_per_pass": cfg.prompts_per_pass, "batch_size": cfg.batch_size,
                      "tracking_uri": tracker.uri, "experiment": spec.name, "workdir": str(workdir), "parent": parent,
                      "tags": {"ptx.kind": KIND_UNIT, "ptx.backbone": name, "ptx.task": t, "ptx.study": spec.name,
                               "ptx.config_hash": hashes[t]}} for t in todo]
            if units:
                sweep.connect(address)
                fresh = sweep.map_tasks(run_unit, units, dataclasses.asdict(cfg.resources),
                                        names=[f"transfer-{name}-{t}".replace("/", "_") for t in todo],
                                        on_done=lambda i, table, n=pairs: bar.advance(n))
            else:
                fresh = []
            tables = dict(zip(todo, fresh, strict=True))
            tables.update({t: tracker.read_table(r.run_id, KIND_UNIT, "unit.parquet")
                           for t, r in done.items() if r is not None})
            table = pa.concat_tables([tables[t] for t in spec.tasks])
            local = workdir / "transfer" / name.replace("/", "_")
            _gather_predictions(tracker, [hashes[t] for t in spec.tasks], local)
            summary = _log_matrix(tracker, parent, table, local)
        except BaseException:
            tracker.finish(parent, "FAILED")
            raise
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
    """Write the long table and one heatmap per split, log them to the transfer run and finish it."""
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
    tracker.finish(run_id)
    return {"parquet": str(local / "transfer.parquet"), "rows": len(df)}


def run(spec, tracker, workdir, **opts) -> dict:
    """The stage's entry (ptx.stages.STAGES): run_transfer_stage."""
    return run_transfer_stage(spec, tracker, workdir, **opts)
