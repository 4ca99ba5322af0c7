"""Study specs: YAML -> frozen, validated dataclasses; `a.b=value` overrides; the config hash.

Every error in a spec is collected and raised together, each naming the file and the field.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ptx.errors import PtxError, suggest
from ptx.train import TrainSettings

STAGES = ("train", "transfer", "tpt", "indicators", "projector", "report")
SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


def config_hash(obj) -> str:
    """A short stable hash of a JSON-able config (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class DataLimits:
    train_limit: int | None = None  # cap on training examples per task
    dev_limit: int | None = 200  # dev examples used for model selection
    test_limit: int | None = 500  # test examples for reported scores
    max_length: int | None = None  # caps every task's max_length (tokens, template included); None: the task's own


@dataclass(frozen=True)
class Search:
    algorithm: str = "grid"  # grid | random | optuna
    num_samples: int = 1  # samples per grid point (random/optuna: total samples)
    space: dict = field(default_factory=dict)  # field -> {grid|choice: [...]} or {uniform|loguniform|randint: [lo, hi]}


@dataclass(frozen=True)
class Scheduler:
    type: str = "fifo"  # fifo | asha
    grace_period: int = 2  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2
    max_t: int | None = None  # evaluations; default: steps // eval_every + 1
    metric: str = "best_dev_metric"  # what ASHA compares at each rung (train_loss: minimised)


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0  # fractions pack trials: 0.25 runs four small-model trials per GPU
    custom: dict = field(default_factory=dict)  # e.g. {"gpu_1x": 1} to pin trials to a node type


@dataclass(frozen=True)
class TransferStage:
    splits: tuple = ("dev", "test")
    random_baseline: bool = True
    prompts_per_pass: int = 8  # prompts stacked in one forward pass
    batch_size: int = 32
    unit: str = "target"  # one Ray task per target task
    sources: str = "all"  # all: every seed's prompt in the bank; best: the ptx.best prompt per task
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class TptStage:
    source: str = "best_same_category"  # best_same_category | best_any | indicator:<name> | <task name>
    steps: int | None = None  # defaults to train.steps
    seeds: tuple | None = None  # defaults to the study's seeds


@dataclass(frozen=True)
class IndicatorStage:
    hook: str = "decoder"  # seq2seq only: encoder | decoder
    probe: str = "paper"  # paper (prompt + one start token) | examples
    probe_examples: int = 16
    position: str = "score"  # score | last | mean: where activations are read
    window_stride: int | None = None  # None: consecutive windows of `windows` layers; 1: sliding
    num_actors: int = 2
    windows: int = 3  # layers per window for the per-window ON
    bootstrap: int = 1000
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class ProjectorStage:
    source_backbone: str | None = None
    target_backbone: str | None = None
    form: str = "flat"  # flat (the paper's) | per_token
    objective: str = "task"  # distance | task | mixed
    hidden: int = 768
    steps: int = 200
    lr: float = 1e-3
    mix_weight: float = 0.5  # weight of the distance loss in `mixed`
    # how projectors are kept off the tasks they are scored on (docs/projectors.md):
    # leave_one_out: per evaluated task, a projector trained on the other training tasks;
    # leave_one_out_category: the same, trained on the other tasks of the evaluated task's category only;
    # split: one projector trained on train_tasks, scored on eval_tasks (both required)
    protocol: str = "leave_one_out"
    train_tasks: tuple | None = None  # the training pool; default: all tasks of the study
    eval_tasks: tuple | None = None  # the evaluated tasks; default: all tasks of the study
    allow_overlap: bool = False  # split only: let eval_tasks share tasks with train_tasks (rows then not held out)


@dataclass(frozen=True)
class StudySpec:
    name: str
    backbones: tuple
    tasks: tuple
    seeds: tuple = (0,)
    description: str = ""
    insertion: str = "prepend"
    prompt_length: int = 100
    init: str = "random"  # random | vocab | text
    init_text: str | None = None  # the text whose token embeddings start every prompt (init: text); {labels}
    #                               becomes each task's label words, "negative, neutral or positive"
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataLimits = field(default_factory=DataLimits)
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int | None = None
    max_failures: int = 2  # retries of a failed trial, from its last checkpoint
    storage_path: str | None = None  # local dir, NFS path or s3://; default WORKDIR/ray_results
    storage_shared: bool = False  # a local storage_path that every node mounts (NFS, RWX): allowed multi-node
    tracking_uri: str | None = None
    workdir: str | None = None
    stages: tuple = ("train",)
    transfer: TransferStage = field(default_factory=TransferStage)
    tpt: TptStage = field(default_factory=TptStage)
    indicators: IndicatorStage = field(default_factory=IndicatorStage)
    projector: ProjectorStage = field(default_factory=ProjectorStage)
    source_file: str | None = None

    def hash(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("source_file")
        d.pop("storage_shared")  # where checkpoints live, not what is computed: same hash, same experiment
        if d["train"].get("group_size") is None:  # unset: the hash every spec had before the field existed
            d["train"].pop("group_size", None)
        return config_hash(d)


INIT_MODES = ("random", "vocab", "text")
NESTED = {"train": TrainSettings, "data": DataLimits, "search": Search, "scheduler": Scheduler,
          "resources": Resources, "transfer": TransferStage, "tpt": TptStage, "indicators": IndicatorStage,
          "projector": ProjectorStage}


def _build(cls, raw, where: str, errors: list):
    """Construct a dataclass from a dict, collecting unknown keys and type errors."""
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, found {type(raw).__name__}")
        return cls() if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                            for f in fields(cls)) else None
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known or key == "source_file":
            errors.append(f"{where}.{key}: unknown key{suggest(key, known)}")
            continue
        sub = NESTED.get(key) if cls is StudySpec else (Resources if key == "resources" else None)
        if sub is not None:
            value = _build(sub, value, f"{where}.{key}", errors)
        else:
            value = _coerce(value, known[key], f"{where}.{key}", errors)
        kwargs[key] = value
    for f in fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{where}.{f.name}: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def _coerce(value, f, where: str, errors: list):
    """Check a scalar field's type from its annotation; lists become tuples."""
    t = str(f.type)
    if isinstance(value, list):
        value = tuple(value)
    checks = [("tuple", tuple), ("dict", dict), ("float", (int, float)), ("int", int), ("bool", bool), ("str", str)]
    if value is None:
        if "None" not in t:
            errors.append(f"{where}: expected a value, found null")
        return value
    for name, typ in checks:
        if t.startswith(name) or t.startswith(f"{name} |"):
            if not isinstance(value, typ) or (name in ("int", "float") and isinstance(value, bool)):
                errors.append(f"{where}: expected {name}, found {type(value).__name__} {value!r}")
            return float(value) if name == "float" and isinstance(value, int) else value
    return value


def _validate(spec: StudySpec, where: str, errors: list) -> None:
    """Cross-field checks: names that must exist, allowed values, positive sizes."""
    from ptx.assets import ALIASES
    from ptx.tasks import list_tasks

    names = {t.name: t for t in list_tasks()}
    for task in spec.tasks:
        if task not in names:
            errors.append(f"{where}.tasks: unknown task '{task}'{suggest(task, names)}")
    for b in spec.backbones:
        if b.startswith(("tiny-", "smollm", "minilm")) and b not in ALIASES:
            errors.append(f"{where}.backbones: unknown backbone '{b}'{suggest(b, ALIASES)}")
    for stage in spec.stages:
        if stage not in STAGES:
            errors.append(f"{where}.stages: unknown stage '{stage}'{suggest(stage, STAGES)}; expected {list(STAGES)}")
    if not spec.tasks or not spec.backbones or not spec.seeds:
        errors.append(f"{where}: backbones, tasks and seeds must each list at least one entry")
    if spec.search.algorithm not in ("grid", "random", "optuna"):
        errors.append(f"{where}.search.algorithm: expected grid, random or optuna, found '{spec.search.algorithm}'")
    if spec.init not in INIT_MODES:
        errors.append(f"{where}.init: expected one of {list(INIT_MODES)}, found '{spec.init}'{suggest(spec.init, INIT_MODES)}")
    elif spec.init == "text" and not (isinstance(spec.init_text, str) and spec.init_text.strip()):
        errors.append(f"{where}.init_text: init 'text' needs a non-empty init_text, found {spec.init_text!r}")
    train_fields = {f.name for f in fields(TrainSettings)} | {"prompt_length", "init"}
    for key, dist in spec.search.space.items():
        if key not in train_fields:
            errors.append(f"{where}.search.space.{key}: not a searchable field{suggest(key, train_fields)}")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SEARCH_KINDS:
            errors.append(f"{where}.search.space.{key}: expected one of {{{', '.join(SEARCH_KINDS)}: ...}}, found {dist!r}")
        elif spec.search.algorithm == "grid" and next(iter(dist)) not in ("grid", "choice"):
            errors.append(f"{where}.search.space.{key}: grid search takes grid/choice lists, found {next(iter(dist))}")
    if spec.scheduler.type not in ("fifo", "asha"):
        errors.append(f"{where}.scheduler.type: expected fifo or asha, found '{spec.scheduler.type}'")
    for res_where, res in ((f"{where}.resources", spec.resources), (f"{where}.transfer.resources", spec.transfer.resources),
                           (f"{where}.indicators.resources", spec.indicators.resources)):
        if res.cpu <= 0 or res.gpu < 0 or (res.gpu > 1 and res.gpu != int(res.gpu)):
            errors.append(f"{res_where}: cpu must be > 0 and gpu a fraction ≤ 1 or a whole number; found "
                          f"cpu={res.cpu} gpu={res.gpu}")
    if spec.train.steps < 1 or spec.train.eval_every < 1 or spec.train.batch_size < 1 or spec.prompt_length < 1:
        errors.append(f"{where}.train: steps, eval_every, batch_size and prompt_length must be ≥ 1")
    if spec.data.max_length is not None and (not isinstance(spec.data.max_length, int) or spec.data.max_length < 8):
        errors.append(f"{where}.data.max_length: expected a whole number of tokens ≥ 8 or null, "
                      f"found {spec.data.max_length!r}")
    if spec.projector.form not in ("flat", "per_token"):
        errors.append(f"{where}.projector.form: expected flat or per_token, found '{spec.projector.form}'")
    if spec.projector.objective not in ("distance", "task", "mixed"):
        errors.append(f"{where}.projector.objective: expected distance, task or mixed, found '{spec.projector.objective}'")
    _validate_projector_tasks(spec.projector, f"{where}.projector", names, errors)
    _validate_groups(spec, where, errors)


PROJECTOR_PROTOCOLS = ("leave_one_out", "leave_one_out_category", "split")


def _validate_projector_tasks(p, where: str, names, errors: list) -> None:
    """The projector's protocol and task lists: known names; a split needs both lists, disjoint unless allowed."""
    if p.protocol not in PROJECTOR_PROTOCOLS:
        errors.append(f"{where}.protocol: expected one of {list(PROJECTOR_PROTOCOLS)}, found '{p.protocol}'"
                      f"{suggest(p.protocol, PROJECTOR_PROTOCOLS)}")
    for key in ("train_tasks", "eval_tasks"):
        for task in getattr(p, key) or ():
            if task not in names:
                errors.append(f"{where}.{key}: unknown task '{task}'{suggest(task, names)}")
    if p.protocol == "split":
        if not p.train_tasks or not p.eval_tasks:
            errors.append(f"{where}: protocol 'split' needs both train_tasks and eval_tasks, found "
                          f"train_tasks={p.train_tasks!r} eval_tasks={p.eval_tasks!r}")
        elif not p.allow_overlap and set(p.train_tasks) & set(p.eval_tasks):
            errors.append(f"{where}: train_tasks and eval_tasks share {sorted(set(p.train_tasks) & set(p.eval_tasks))}; "
                          f"a projector scored on its own training tasks leaks (set allow_overlap: true to allow it)")


def _validate_groups(spec: StudySpec, where: str, errors: list) -> None:
    """train.group_size: a whole number ≥ 1; groups need a scheduler that decides per trial (FIFO, not ASHA)."""
    size = spec.train.group_size
    if size is None:
        return
    if not isinstance(size, int) or size < 1:
        errors.append(f"{where}.train.group_size: expected a whole number ≥ 1 or null, found {size!r}")
        return
    if size == 1:
        return
    if spec.scheduler.type == "asha":
        errors.append(f"{where}.train.group_size: {size} puts several prompts in one trial, and ASHA stops whole "
                      "trials on one metric; use scheduler.type fifo or train.group_size 1")


def set_path(raw: dict, dotted: str, value) -> None:
    """Apply one `a.b=value` override (value parsed as YAML)."""
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise PtxError(f"override '{dotted}': '{k}' is not a mapping")
    node[keys[-1]] = yaml.safe_load(value) if isinstance(value, str) else value


def load_study(path: str | Path, overrides: list[str] | tuple = ()) -> StudySpec:
    """Read, override and validate a study spec; all errors raised together."""
    path = Path(path)
    if not path.is_file():
        raise PtxError(f"study spec {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PtxError(f"study spec {path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PtxError(f"study spec {path}: expected a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise PtxError(f"override '{item}': expected key.path=value")
        key, value = item.split("=", 1)
        set_path(raw, key.strip(), value)
    errors: list[str] = []
    spec = _build(StudySpec, raw, path.name, errors)
    if spec is not None:  # validate what parsed, so every error is reported in one go
        _validate(spec, path.name, errors)
    if errors:
        raise PtxError(f"{len(errors)} error(s) in study spec {path}: " + "; ".join(errors))
    return dataclasses.replace(spec, source_file=str(path.resolve()))
