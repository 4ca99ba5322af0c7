"""Finalising a sweep: close every trial's MLflow run from its last checkpoint (a trial stopped early by ASHA, or
one that errored, still gets its best prompt rebuilt and logged), prune superseded checkpoints, and tag the best
prompt per (task, backbone).
"""

import logging
from pathlib import Path

from ptx import bank, track
from ptx.plan import request_from
from ptx.sweep.groups import load_group_checkpoint
from ptx.sweep.trials import find_trial_run
from ptx.train import load_checkpoint

log = logging.getLogger(__name__)


def finalise(grid, tracker, workdir: Path) -> dict:
    """Close every trial's MLflow run from its last checkpoint; tag the best prompt per (task, backbone)."""
    rows, errored = [], 0
    for result in grid:
        if not result.config:  # failed before its first result (Tune knows no config then): nothing to close
            errored += 1
            rows.append({"task": None, "backbone": None, "seed": None, "run_id": None, "best": None,
                         "error": str(result.error).splitlines()[0] if result.error else "no result",
                         "iterations": 0})
            continue
        if result.error is not None:
            errored += 1
        if "group" in result.config:
            rows += _finalise_group(result, tracker, workdir)
            _prune_checkpoints(result)
            continue
        req = result.config["request"]
        run_id = (result.metrics or {}).get("mlflow_run_id")
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                state = load_checkpoint(d)
            run_id = state.get("mlflow_run_id") or run_id
        else:
            state = None
        rows.append(_finalise_run(req, run_id, state, result, tracker, workdir))
        _prune_checkpoints(result)
    bank.tag_best(tracker, {(r["task"], r["backbone"]) for r in rows if r["task"] is not None})
    return {"trials": len(rows), "errored": errored, "rows": rows}


def _finalise_run(req: dict, run_id: str | None, state: dict | None, result, tracker, workdir: Path) -> dict:
    """Close one prompt run from its last checkpoint (unless it finished itself); its row of the summary."""
    from ptx.prompt import init_record, prompt_meta, save_prompt
    from ptx.tasks import load_task

    if run_id:
        run = tracker.get_run(run_id)
        if run.status != "FINISHED" and state is not None:
            # stopped early by the scheduler, or errored after its retries: keep the last good checkpoint
            spec = load_task(req["task"])
            stopped = "error" if result.error else "scheduler"
            art = track.prompt_dir(workdir, run_id)
            if not (art / "prompt.json").exists():
                bmeta = _backbone_meta_from(run, state)
                meta = prompt_meta(
                    config_hash=run.tags.get("ptx.config_hash"), run_id=run_id, backbone=bmeta,
                    task={"name": spec.name, "version": spec.version}, verbalizer=spec.label_words(bmeta.get("kind")),
                    insertion=req.get("insertion", "prepend"),
                    init=init_record("artifact" if req.get("init_from") else req.get("init"), req["settings"]["seed"],
                                     spec.name, spec.instruction(req["init_text"]) if req.get("init_text") else None,
                                     run.tags.get("ptx.source_run")),
                    seed=req["settings"]["seed"], best_step=state["best_step"],
                    dev_metric={"name": spec.metric, "value": state["best_metric"]}, stopped=stopped)
                save_prompt(art, state["best_prompt"], meta)
            tracker.log_curve(run_id, [{"step": p["step"], f"dev_{spec.metric}": p["dev_metric"]} for p in state["curve"]])
            tracker.log(run_id, {"best_dev_metric": state["best_metric"]}, step=state["best_step"],
                        tags={"ptx.stopped": stopped, "ptx.best_step": state["best_step"]})
            tracker.log_artifacts(run_id, art, track.PROMPT_ARTIFACT)
            tracker.finish(run_id, "FAILED" if result.error else "FINISHED")
    return {"task": req["task"], "backbone": req["backbone"], "seed": req["settings"]["seed"],
            "run_id": run_id, "best": (state or {}).get("best_metric", (result.metrics or {}).get("best_dev_metric")),
            "error": str(result.error).splitlines()[0] if result.error else None,
            "iterations": (result.metrics or {}).get("training_iteration")}


def _prune_checkpoints(result) -> None:
    """Delete a finalised trial's superseded checkpoints; its latest stays (Tune's final state names it)."""
    import pyarrow.fs as pafs

    if result.checkpoint is None:
        return
    fs, keep = result.checkpoint.filesystem, result.checkpoint.path.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(keep.rsplit("/", 1)[0])):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name.startswith("checkpoint_") and info.path.rstrip("/") != keep:
            fs.delete_dir(info.path)


def log_sweep_datasets(tracker, parent: str, rows: list) -> None:
    """The sweep's run lists the splits its trials used: the runs table shows data beside the collapsed trials."""
    try:
        tracker.copy_datasets([r["run_id"] for r in rows if r["run_id"]], parent)
    except Exception as exc:  # lineage on the parent is a convenience; the trials' own inputs are logged
        log.warning("could not log the sweep's datasets on run %s: %s", parent, exc)


def _backbone_meta_from(run, state) -> dict:
    """The backbone record of a trial's prompt, from the run's tags (the backbone itself is not loaded here)."""
    return {"name": run.tags.get("ptx.backbone"), "revision": run.tags.get("ptx.backbone_revision"),
            "kind": run.tags.get("ptx.backbone_kind"), "d_model": int(state["best_prompt"].shape[1])}


def _finalise_group(result, tracker, workdir: Path) -> list[dict]:
    """The rows of a group trial: each member closed from its own state in the group's last checkpoint."""
    states = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            states = load_group_checkpoint(d)
    trial_id = (result.metrics or {}).get("trial_id")
    parent = result.config["const"]["parent_run_id"]
    rows = []
    for i, req in enumerate(result.config["group"]):
        state = states.get(i)
        run_id = (state or {}).get("mlflow_run_id") or (trial_id and find_trial_run(tracker, f"{trial_id}/m{i}", parent))
        if run_id is None and not state:  # reused from an earlier study: nothing of this trial to close
            done = tracker.finished_run(track.KIND_PROMPT, request_from({**result.config, "request": req}).hash())
            run_id = done.run_id if done is not None else None
        rows.append(_finalise_run(req, run_id, state, result, tracker, workdir))
    return rows
