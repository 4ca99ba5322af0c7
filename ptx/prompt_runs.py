"""Prompt runs that join the library to the store: train-and-log one prompt run, import a prompt.

The CLI and the Ray trials both call these; `train.py` stays free of MLflow and Ray.
"""

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

from ptx import bank, track
from ptx.backbones import Insertion, kind_of, load_backbone
from ptx.data import describe_split, encode_split
from ptx.errors import PtxError
from ptx.fields import Range
from ptx.io import config_hash
from ptx.prompt import (
    DEFAULT_TOKENS,
    InitMode,
    backbone_meta,
    import_torch_prompt,
    init_prompt,
    init_record,
    load_prompt,
    prompt_meta,
    save_prompt,
)
from ptx.train import TrainSettings, train_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptRequest:
    """Everything that decides a prompt-tuning run's result (its hash is the idempotency key)."""

    task: str
    backbone: str
    insertion: Annotated[str, Insertion] = "prepend"
    prompt_length: Annotated[int, Range(ge=1)] = DEFAULT_TOKENS
    init: Annotated[str, InitMode] = "random"
    init_text: str | None = None
    init_from: str | None = None  # a prompt artifact dir or an MLflow run id (transfer initialisation)
    train_limit: Annotated[int, Range(ge=1)] | None = None  # cap on training examples (small studies)
    dev_limit: Annotated[int, Range(ge=1)] | None = None  # cap on dev examples used for model selection
    max_length: Annotated[int, Range(ge=8)] | None = None  # cap on the task's token budget (a study's data.max_length)
    settings: TrainSettings = field(default_factory=TrainSettings)

    def hash(self) -> str:
        fields = asdict(self)
        fields["settings"].pop("compile")  # how the same step is executed, not what it computes
        # fields added later, at the value that reproduces what runs did before them: the hash those runs had
        for key, legacy in (("dropout", False), ("label_loss", "label_words")):
            if fields["settings"].get(key) == legacy:
                fields["settings"].pop(key)
        fields["settings"].pop("group_size")  # how runs are executed: a grouped member computes what it does alone
        if fields["max_length"] is None:  # absent: the hash of every request made before the field existed
            fields.pop("max_length")
        return config_hash(fields)


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
    if not tracker.enabled:
        raise PtxError(f"--init-from '{req.init_from}' is not a directory and no MLflow store is configured")
    return bank.fetch_prompt(tracker, req.init_from, workdir), req.init_from


def run_prompt(req: PromptRequest, workdir: str | Path, tracker=None, parent_run_id: str | None = None,
               force: bool = False, report=None, resume: dict | None = None, run_id: str | None = None,
               backbone=None, progress: bool = False, extra_tags: dict | None = None) -> PromptRun:
    """Train one prompt, save it under the workdir and log it to the tracker (none given: nothing is tracked)."""
    tracker = tracker or track.NullTracker(workdir=Path(workdir))
    run = start_prompt_run(req, workdir, tracker, parent_run_id, force, report, run_id, backbone, extra_tags)
    if isinstance(run, PromptRun):  # reused
        return run
    try:
        # CPU/GPU utilisation and memory of a GPU run, as MLflow system metrics
        with tracker.system_metrics(run.run_id, enabled=run.backbone.device.type == "cuda"):
            result = train_prompt(run.backbone, run.spec, run.init, run.train, run.dev, req.settings,
                                  report=run.log_and_report, resume=resume, progress=progress)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI turns it into SystemExit)
        run.fail("KILLED")
        raise
    except BaseException:
        run.fail()
        raise
    return run.finish(result)


@dataclass
class StartedRun:
    """A prompt run between its start (data, init, MLflow run) and its end: what a trainer needs, and how to log."""

    req: PromptRequest
    spec: object
    backbone: object
    init: object  # [n_tokens, d_model]
    train: object
    dev: object
    run_id: str | None
    log_and_report: object  # report(metrics, step, state): logs to MLflow, then calls the caller's report
    finish: object  # finish(TrainResult) -> PromptRun: artifact, final logs, run status
    fail: object  # fail(): mark the run FAILED (the trainer raised)


def start_prompt_run(req: PromptRequest, workdir: str | Path, tracker=None, parent_run_id: str | None = None,
                     force: bool = False, report=None, run_id: str | None = None, backbone=None,
                     extra_tags: dict | None = None) -> "StartedRun | PromptRun":
    """Everything of run_prompt before training; a finished run of the same config comes back as a reused PromptRun."""
    tracker = tracker or track.NullTracker(workdir=Path(workdir))
    workdir = Path(workdir).resolve()
    digest = req.hash()
    if not force and run_id is None:
        done = tracker.finished_run(track.KIND_PROMPT, digest)
        if done is not None:
            log.info("config %s already has finished run %s; reusing it", digest, done.run_id)
            return PromptRun(done.run_id, bank.fetch_prompt(tracker, done.run_id, workdir),
                             done.metrics.get("best_dev_metric", float("nan")),
                             int(done.tags.get("ptx.best_step", 0)), reused=True)
    from ptx.tasks import load_task

    spec = load_task(req.task, max_length=req.max_length)
    backbone = backbone or load_backbone(req.backbone, insertion=req.insertion)
    init_dir, source_run = resolve_init_source(req, tracker, workdir)
    init_text = spec.instruction(req.init_text) if req.init_text else None
    init = init_prompt(backbone, req.prompt_length, "artifact" if init_dir else req.init, seed=req.settings.seed,
                       text=init_text, artifact=init_dir, task=spec.name)
    train = encode_split(spec, backbone, "train", limit=req.train_limit)
    dev = encode_split(spec, backbone, "dev", limit=req.dev_limit)
    tags = {"ptx.kind": track.KIND_PROMPT, "ptx.task": spec.name, "ptx.backbone": req.backbone,
            "ptx.seed": req.settings.seed, "ptx.config_hash": digest, "ptx.source_run": source_run,
            "ptx.origin": "trained", "ptx.init": "artifact" if init_dir else req.init, "ptx.category": spec.category,
            "ptx.backbone_kind": backbone.kind.value, "ptx.backbone_revision": backbone.revision,
            "ptx.insertion": backbone.insertion.value, **(extra_tags or {})}
    if run_id is None:
        try:
            run_id = tracker.start_run(track.run_name(spec.name, req.backbone, f"s{req.settings.seed}"), tags,
                                       parent_run_id)
            tracker.log(run_id, params=asdict(req))
            tracker.log_datasets(run_id, [{**describe_split(spec, "train", train), "context": "train"},
                                          {**describe_split(spec, "dev", dev), "context": "dev"}])
        except PtxError:
            raise
        except Exception as exc:
            raise PtxError(f"could not start a run in the MLflow store {tracker.uri} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]})") from exc
    lost: list = []  # the first tracking failure: training goes on, the prompt is kept on disk, the error comes last

    def track_call(fn, *args, **kwargs) -> None:
        if lost:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # a dead server must not throw away the training: keep going, report at the end
            log.error("MLflow store %s failed (%s: %s); training goes on, nothing more is logged", tracker.uri,
                      type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            lost.append(exc)

    def log_and_report(metrics: dict, step: int, state: dict | None = None):
        track_call(tracker.log, run_id, metrics, step)
        if report is not None:
            if state is not None:
                state["mlflow_run_id"] = run_id  # lives in the checkpoint: a resumed trial keeps its run
            report(metrics, step, state)

    def fail(status: str = "FAILED") -> None:  # KILLED for Ctrl-C or SIGTERM
        track_call(tracker.finish, run_id, status)

    def finish(result) -> PromptRun:
        return _finish_prompt_run(req, spec, backbone, workdir, digest, run_id, init_dir, init_text, source_run, result,
                                  tracker, track_call, lost)

    return StartedRun(req, spec, backbone, init, train, dev, run_id, log_and_report, finish, fail)


def _finish_prompt_run(req, spec, backbone, workdir, digest, run_id, init_dir, init_text, source_run, result, tracker,
                       track_call, lost) -> PromptRun:
    meta = prompt_meta(config_hash=digest, run_id=run_id, backbone=backbone_meta(backbone),
                       task={"name": spec.name, "version": spec.version}, verbalizer=spec.label_words(backbone.kind),
                       insertion=backbone.insertion.value,
                       init=init_record("artifact" if init_dir else req.init, req.settings.seed, spec.name, init_text,
                                        source_run or (str(init_dir) if init_dir else None)),
                       seed=req.settings.seed, best_step=result.best_step,
                       dev_metric={"name": spec.metric, "value": result.best_metric}, stopped=result.stopped)
    artifact = save_prompt(track.prompt_dir(workdir, run_id or digest), result.prompt, meta)
    out = PromptRun(run_id, artifact, result.best_metric, result.best_step, stopped=result.stopped,
                    seconds=result.seconds, curve=result.curve)
    # best_dev_metric is already in the curve (one point per eval); logging it again would add a duplicate point
    last_step = result.curve[-1]["step"] if result.curve else result.best_step
    track_call(tracker.log, run_id, {"seconds": result.seconds}, step=last_step,
               tags={"ptx.best_step": result.best_step, "ptx.stopped": result.stopped})
    track_call(tracker.log_artifacts, run_id, artifact, track.PROMPT_ARTIFACT)
    track_call(tracker.finish, run_id, "FINISHED" if result.stopped != "nonfinite_loss" else "FAILED")
    if lost:
        exc = lost[0]
        raise PtxError(f"could not log run {run_id} to {tracker.uri} ({type(exc).__name__}); the trained prompt "
                       f"is kept on local disk at {artifact}") from exc
    if result.stopped == "nonfinite_loss":
        raise PtxError(f"training stopped: non-finite loss after step {result.steps_done}; the best checkpoint "
                       f"(step {result.best_step}, dev {result.best_metric:.4f}) is kept at {artifact}")
    return out


def import_prompt(file: str | Path, backbone_name: str, task: str | None, insertion: str, workdir: str | Path,
                  tracker=None, d_model: int | None = None, name: str | None = None) -> PromptRun:
    """Import a released raw torch prompt [n_tokens, d_model] into the bank (ptx.origin=imported).

    `task` None imports a prompt that belongs to no task (the paper's random baseline): it then needs `name`.
    """
    from ptx.assets import known_d_model
    from ptx.tasks import load_task

    if task is None and not name:
        raise PtxError(f"{file}: a prompt with no --task needs --name (e.g. --name random for a baseline prompt)")
    spec = load_task(task) if task is not None else None
    width = d_model or known_d_model(backbone_name)
    if width is None:
        raise PtxError(f"the width of backbone '{backbone_name}' is not known offline; pass --d-model")
    kind = kind_of(backbone_name).value
    if insertion == "paper" and kind != "masked_lm":
        raise PtxError(f"insertion 'paper' is the masked-LM <mask>-slot layout; backbone '{backbone_name}' is {kind}")
    tensor = import_torch_prompt(file, width, backbone_name)
    # the content, not the path, is the identity: the same file imported from two places is one run
    digest = config_hash({"import": _sha(file), "backbone": backbone_name, "task": task, "name": name,
                          "insertion": insertion})
    label = name or spec.name
    tags = {"ptx.kind": track.KIND_PROMPT, "ptx.task": spec.name if spec else None, "ptx.name": label,
            "ptx.backbone": backbone_name, "ptx.config_hash": digest, "ptx.origin": "imported",
            "ptx.category": spec.category if spec else None, "ptx.backbone_kind": kind, "ptx.insertion": insertion,
            "ptx.imported_from": Path(file).name}
    workdir = Path(workdir).resolve()
    tracker = tracker or track.NullTracker(workdir=workdir)
    done = tracker.finished_run(track.KIND_PROMPT, digest)
    if done is not None:
        return PromptRun(done.run_id, bank.fetch_prompt(tracker, done.run_id, workdir), float("nan"), 0, reused=True)
    run_id = tracker.start_run(f"import {label}/{backbone_name}", tags)
    meta = prompt_meta(config_hash=digest, run_id=run_id, name=label,
                       backbone={"name": backbone_name, "revision": None, "kind": kind, "d_model": width},
                       task={"name": spec.name, "version": spec.version} if spec else None,
                       verbalizer=spec.label_words(kind) if spec and spec.verbalizer else None, insertion=insertion,
                       init={"mode": "imported", "source": str(Path(file).resolve())})
    artifact = save_prompt(track.prompt_dir(workdir, run_id or digest), tensor, meta)
    if tracker.enabled:
        try:
            tracker.log_artifacts(run_id, artifact, track.PROMPT_ARTIFACT)
            tracker.finish(run_id)
        except Exception as exc:
            raise PtxError(f"could not log run {run_id} to {tracker.uri} ({type(exc).__name__}); the imported "
                           f"prompt is kept on local disk at {artifact}") from exc
    return PromptRun(run_id, artifact, float("nan"), 0)


def _sha(file) -> str:
    import hashlib

    return hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16]


def with_settings(req: PromptRequest, **changes) -> PromptRequest:
    """A copy of `req` with training settings changed."""
    return replace(req, settings=replace(req.settings, **changes))
