"""The train stage: the study's prompts as one Ray Tune sweep; an interrupted sweep of the same spec is resumed.
"""

import logging
from pathlib import Path

log = logging.getLogger(__name__)
NAME, KIND, UNITS, SECTION = "train", "sweep", "trials", "training"  # KIND: the sweep's parent run


def train_experiment_name(spec) -> str:
    """One Tune experiment per study config: a changed spec gets a fresh experiment, the same one resumes."""
    return f"{spec.name}-train-{spec.hash()[:8]}"


def run_train_stage(spec, tracker, workdir: Path, force: bool = False, max_concurrent: int | None = None) -> dict:
    """The training stage as a Ray Tune sweep; an interrupted sweep of the same spec is resumed."""
    from ptx import sweep

    storage = spec.storage_path or str(workdir / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    name = train_experiment_name(spec)
    path = f"{storage}/{name}"
    if not force and sweep.experiment_exists(path):
        log.info("resuming the interrupted training sweep at %s", path)
        return sweep.resume_sweep(path)
    return sweep.run_sweep(spec, workdir, tracker.uri, storage_path=storage, max_concurrent=max_concurrent,
                           force=force, name=name, tags={"ptx.stage": "train"})


def run(spec, tracker, workdir, *, force: bool = False, max_concurrent: int | None = None,
        address: str | None = None) -> dict:
    """The stage's entry: run_train_stage (`address`: run_study connected Ray already)."""
    return run_train_stage(spec, tracker, workdir, force=force, max_concurrent=max_concurrent)
