"""Stage functions that join the library to the store: train-and-log one prompt run, import a prompt.

The CLI and the Ray trials both call these; `train.py` stays free of MLflow and Ray.
"""

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ptx import track
from ptx.backbones import load_backbone
from ptx.config import config_hash
from ptx.data import encode_split
from ptx.errors import PtxError
from ptx.prompt import backbone_meta, import_torch_prompt, init_prompt, load_prompt, save_prompt
from ptx.train import TrainSettings, train_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptRequest:
    """Everything that decides a prompt-tuning run's result (its hash is the idempotency key)."""

    task: str
    backbone: str
    insertion: str = "prepend"
    prompt_length: int = 100
    init: str = "random"  # random | vocab | text | artifact
    init_text: str | None = None
    init_from: str | None = None  # a prompt artifact dir or an MLflow run id (transfer initialisation)
    train_limit: int | None = None  # cap on training examples (small studies)
    dev_limit: int | None = None  # cap on dev examples used for model selection
    settings: TrainSettings = field(default_factory=TrainSettings)

    def hash(self) -> str:
        return config_hash(asdict(self))


@dataclass
class PromptRun:
    run_id: str | None
    artifact: Path
    best_metric: float
    best_step: int
    reused: bool = False
    stopped: str = "max_steps"
    seconds: float = 0.0
    curve: list = field(default_factory=list)


def resolve_init_source(req: PromptRequest, tracker, workdir: Path) -> tuple[Path | None, str | None]:
    """The local prompt dir for a transfer init, and the MLflow run it came from (if any)."""
    if not req.init_from:
        return None, None
    path = Path(req.init_from)
    if path.is_dir():
        return path, load_prompt(path).meta.get("mlflow_run_id")
    if tracker is None:
        raise PtxError(f"--init-from '{req.init_from}' is not a directory and no MLflow store is configured")
    local = Path(workdir) / "downloads" / req.init_from
    if not (local / "prompt.json").exists():
        tracker.download_prompt(req.init_from, local)
    return local, req.init_from


def run_prompt(req: PromptRequest, workdir: str | Path, tracker=None, parent_run_id: str | None = None,
               force: bool = False, report=None, resume: dict | None = None, run_id: str | None = None,
               backbone=None, progress: bool = False, extra_tags: dict | None = None) -> PromptRun:
    """Train one prompt, save it under the workdir and log it to MLflow (when a tracker is given)."""
    workdir = Path(workdir).resolve()
    digest = req.hash()
    if tracker is not None and not force and run_id is None:
        done = tracker.finished_run(track.KIND_PROMPT, digest)
        if done is not None:
            log.info("config %s already has finished run %s; reusing it", digest, done.info.run_id)
            return PromptRun(done.info.run_id, workdir / "prompts" / done.info.run_id,
                             done.data.metrics.get("best_dev_metric", float("nan")),
                             int(done.data.tags.get("ptx.best_step", 0)), reused=True)
    from ptx.tasks import load_task

    spec = load_task(req.task)
    backbone = backbone or load_backbone(req.backbone, insertion=req.insertion)
    init_dir, source_run = resolve_init_source(req, tracker, workdir)
    init = init_prompt(backbone, req.prompt_length, "artifact" if init_dir else req.init, seed=req.settings.seed,
                       text=req.init_text, artifact=init_dir)
    train = encode_split(spec, backbone, "train", limit=req.train_limit)
    dev = encode_split(spec, backbone, "dev", limit=req.dev_limit)
    tags = {"ptx.kind": track.KIND_PROMPT, "ptx.task": spec.name, "ptx.backbone": req.backbone,
            "ptx.seed": req.settings.seed, "ptx.config_hash": digest, "ptx.source_run": source_run,
            "ptx.origin": "trained", "ptx.init": "artifact" if init_dir else req.init, "ptx.category": spec.category,
            "ptx.backbone_kind": backbone.kind.value, **(extra_tags or {})}
    if tracker is not None and run_id is None:
        run_id = tracker.start_run(f"{spec.name}/{req.backbone}/s{req.settings.seed}", tags, parent_run_id)
        tracker.log(run_id, params=asdict(req))

    def log_and_report(metrics: dict, step: int, state: dict | None = None):
        if tracker is not None:
            tracker.log(run_id, metrics, step)
        if report is not None:
            if state is not None:
                state["mlflow_run_id"] = run_id  # lives in the checkpoint: a resumed trial keeps its run
            report(metrics, step, state)

    try:
        result = train_prompt(backbone, spec, init, train, dev, req.settings, report=log_and_report,
                              resume=resume, progress=progress)
    except BaseException:
        if tracker is not None:
            tracker.finish(run_id, "FAILED")
        raise
    meta = {"config_hash": digest, "mlflow_run_id": run_id, "backbone": backbone_meta(backbone),
            "task": {"name": spec.name, "version": spec.version}, "verbalizer": list(spec.verbalizer),
            "insertion": backbone.insertion.value,
            "init": {"mode": "artifact" if init_dir else req.init, "source": source_run or (str(init_dir) if init_dir else None)},
            "seed": req.settings.seed, "best_step": result.best_step,
            "dev_metric": {"name": spec.metric, "value": result.best_metric}, "stopped": result.stopped}
    artifact = save_prompt(workdir / "prompts" / (run_id or digest), result.prompt, meta)
    out = PromptRun(run_id, artifact, result.best_metric, result.best_step, stopped=result.stopped,
                    seconds=result.seconds, curve=result.curve)
    if tracker is not None:
        try:
            tracker.log(run_id, {"best_dev_metric": result.best_metric, "seconds": result.seconds},
                        step=result.best_step, tags={"ptx.best_step": result.best_step, "ptx.stopped": result.stopped})
            tracker.log_artifacts(run_id, artifact, track.PROMPT_ARTIFACT)
            tracker.finish(run_id, "FINISHED" if result.stopped != "nonfinite_loss" else "FAILED")
        except Exception as exc:
            raise PtxError(f"could not log run {run_id} to {tracker.uri} ({type(exc).__name__}); the trained "
                           f"prompt is kept at {artifact}") from exc
    if result.stopped == "nonfinite_loss":
        raise PtxError(f"training stopped: non-finite loss after step {result.steps_done}; the best checkpoint "
                       f"(step {result.best_step}, dev {result.best_metric:.4f}) is kept at {artifact}")
    return out


def import_prompt(file: str | Path, backbone_name: str, task: str, insertion: str, workdir: str | Path,
                  tracker=None, d_model: int | None = None) -> PromptRun:
    """Import a released raw torch prompt into the bank (ptx.origin=imported)."""
    from ptx.assets import known_d_model
    from ptx.tasks import load_task

    spec = load_task(task)
    width = d_model or known_d_model(backbone_name)
    if width is None:
        raise PtxError(f"the width of backbone '{backbone_name}' is not known offline; pass --d-model")
    tensor = import_torch_prompt(file, width, backbone_name)
    digest = config_hash({"import": str(Path(file).resolve()), "sha": _sha(file), "backbone": backbone_name,
                          "task": task, "insertion": insertion})
    tags = {"ptx.kind": track.KIND_PROMPT, "ptx.task": spec.name, "ptx.backbone": backbone_name,
            "ptx.config_hash": digest, "ptx.origin": "imported", "ptx.category": spec.category}
    run_id = None
    if tracker is not None:
        done = tracker.finished_run(track.KIND_PROMPT, digest)
        if done is not None:
            return PromptRun(done.info.run_id, Path(workdir) / "prompts" / done.info.run_id, float("nan"), 0, True)
        run_id = tracker.start_run(f"import {spec.name}/{backbone_name}", tags)
    meta = {"config_hash": digest, "mlflow_run_id": run_id,
            "backbone": {"name": backbone_name, "revision": None, "kind": _kind_guess(backbone_name), "d_model": width},
            "task": {"name": spec.name, "version": spec.version}, "verbalizer": list(spec.verbalizer),
            "insertion": insertion, "init": {"mode": "imported", "source": str(file)}, "seed": None,
            "best_step": None, "dev_metric": None}
    artifact = save_prompt(Path(workdir).resolve() / "prompts" / (run_id or digest), tensor, meta)
    if tracker is not None:
        tracker.log_artifacts(run_id, artifact, track.PROMPT_ARTIFACT)
        tracker.finish(run_id)
    return PromptRun(run_id, artifact, float("nan"), 0)


def _sha(file) -> str:
    import hashlib

    return hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16]


def _kind_guess(name: str) -> str:
    n = name.lower()
    return "seq2seq" if "t5" in n else "masked_lm" if ("bert" in n or "roberta" in n) else "causal_lm"


def with_settings(req: PromptRequest, **changes) -> PromptRequest:
    """A copy of `req` with training settings changed."""
    return replace(req, settings=replace(req.settings, **changes))
