"""Study specs: YAML -> frozen, validated dataclasses; `a.b=value` overrides; the config hash.

Every error in a spec is collected and raised together, each naming the file and the field.
"""

import dataclasses
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Annotated

import yaml

from ptx.activations import Hook, Position, Probe
from ptx.backbones import Insertion
from ptx.errors import PtxError, suggest
from ptx.fields import Range, SafeName, check_value
from ptx.io import config_hash
from ptx.projector import Form, Objective
from ptx.prompt import DEFAULT_TOKENS
from ptx.train import LABEL_LOSSES, TrainSettings

STAGES = ("train", "transfer", "tpt", "indicators", "projector", "report")
SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
Count = Annotated[int, Range(ge=1)]  # a size or a number of things: at least one
Name = Annotated[str, SafeName()]  # becomes a directory or experiment name


class SearchAlgorithm(str, Enum):
    GRID = "grid"
    RANDOM = "random"
    OPTUNA = "optuna"


class SchedulerType(str, Enum):
    FIFO = "fifo"
    ASHA = "asha"


class SpecInit(str, Enum):  # a study's init modes (a transfer init is the TPT stage's business)
    RANDOM = "random"
    VOCAB = "vocab"
    TEXT = "text"
    TEXT_NOISE = "text_noise"  # each task's instruction plus noise seeded by (seed, task): a start per prompt


class BankSources(str, Enum):  # which prompts of the bank the transfer stage reads
    ALL = "all"  # every seed's prompt
    BEST = "best"  # the ptx.best prompt per task


class TransferUnit(str, Enum):
    TARGET = "target"  # one Ray task per target task


class TptSource(str, Enum):  # besides these: indicator:<name> or a task name, checked at load
    BEST_SAME_CATEGORY = "best_same_category"
    BEST_CROSS_CATEGORY = "best_cross_category"  # the best source of another category: the control for same-category
    BEST_ANY = "best_any"


@dataclass(frozen=True)
class DataLimits:
    train_limit: Count | None = None  # cap on training examples per task
    dev_limit: Count | None = 200  # dev examples used for model selection
    test_limit: Count | None = 500  # test examples for reported scores
    max_length: Annotated[int, Range(ge=8)] | None = None  # caps every task's max_length (tokens, template included); None: the task's own


@dataclass(frozen=True)
class Search:
    algorithm: Annotated[str, SearchAlgorithm] = "grid"
    num_samples: Count = 1  # samples per grid point (random/optuna: total samples)
    space: dict = field(default_factory=dict)  # field -> {grid|choice: [...]} or {uniform|loguniform|randint: [lo, hi]}


@dataclass(frozen=True)
class Scheduler:
    type: Annotated[str, SchedulerType] = "fifo"
    grace_period: Count = 2  # evaluations before ASHA may stop a trial
    reduction_factor: Annotated[int, Range(ge=2)] = 2
    max_t: Count | None = None  # evaluations; default: steps // eval_every + 1
    metric: str = "best_dev_metric"  # what ASHA compares at each rung (train_loss: minimised)


@dataclass(frozen=True)
class Resources:
    cpu: Annotated[float, Range(gt=0)] = 1.0
    gpu: Annotated[float, Range(ge=0)] = 0.0  # fractions pack trials: 0.25 runs four small-model trials per GPU
    custom: dict = field(default_factory=dict)  # e.g. {"gpu_1x": 1} to pin trials to a node type


@dataclass(frozen=True)
class GpuCluster:
    """The GPUs a study is planned for: memory per GPU and how many, for memory-aware packing and group sizing."""

    # one GPU of the node type the study runs on, in MiB (what nvidia-smi reports; cluster/ declares it per node
    # type as the label ptx/gpu-memory-mib). Default: the smallest GPU of cluster/, A10G (23028) / L4 (23034)
    gpu_memory_mib: Count = 23028
    gpus: Count = 8  # GPUs the study may use at once: group_size auto leaves at least that many GPUs' trials
    node_types: tuple[str, ...] = ()  # the node types of cluster/ the spec is planned for ("aws.yaml gpu_1x", ...)


@dataclass(frozen=True)
class TransferStage:
    splits: tuple[str, ...] = ("dev", "test")
    random_baseline: bool = True
    init_baseline: bool = False  # also score each task's own prompts' untrained starts (the paired test's baseline)
    prompts_per_pass: Count = 8  # prompts stacked in one forward pass
    batch_size: Count = 32
    unit: Annotated[str, TransferUnit] = "target"
    sources: Annotated[str, BankSources] = "all"
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class TptStage:
    source: str = "best_same_category"  # best_same_category | best_cross_category | best_any | indicator:<name> | <task name>
    sources: tuple[str, ...] | None = None  # several of those: one TPT run per (target, source, seed); replaces `source`
    steps: Count | None = None  # defaults to train.steps
    seeds: tuple[Annotated[int, Range(ge=0, lt=2**32)], ...] | None = None  # defaults to the study's seeds

    @property
    def source_modes(self) -> tuple[str, ...]:
        """The source modes TPT runs, in order: `sources` when given, else the one `source`."""
        return (self.source,) if self.sources is None else self.sources


@dataclass(frozen=True)
class IndicatorStage:
    hook: Annotated[str, Hook] = "decoder"  # seq2seq only: encoder | decoder
    probe: Annotated[str, Probe] = "paper"  # paper (prompt + one start token) | examples
    probe_examples: Count = 16
    position: Annotated[str, Position] = "score"  # score | last | mean: where activations are read
    window_stride: Count | None = None  # None: consecutive windows of `windows` layers; 1: sliding
    num_actors: Count = 2
    windows: Count = 3  # layers per window for the per-window ON
    bootstrap: Count = 1000
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class Findings:
    # the indicator comparisons the study's verdict rests on, declared before it runs ("A vs B": does A track
    # transfer better than B); Holm adjusts across them, every other comparison is reported as exploratory
    primary: tuple[str, ...] = ("on vs e_concat_cos", "on vs e_avg_cos")


@dataclass(frozen=True)
class ProjectorStage:
    source_backbone: str | None = None
    target_backbone: str | None = None
    form: Annotated[str, Form] = "flat"  # flat (the paper's) | per_token
    objective: Annotated[str, Objective] = "task"  # distance | task | mixed
    hidden: Count = 768
    steps: Count = 200
    lr: Annotated[float, Range(gt=0)] = 1e-3
    mix_weight: Annotated[float, Range(ge=0, le=1)] = 0.5  # weight of the distance loss in `mixed`
    # how projectors are kept off the tasks they are scored on (docs/projectors.md):
    # leave_one_out: per evaluated task, a projector trained on the other training tasks;
    # leave_one_out_category: the same, trained on the other tasks of the evaluated task's category only;
    # split: one projector trained on train_tasks, scored on eval_tasks (both required)
    protocol: str = "leave_one_out"
    train_tasks: tuple[str, ...] | None = None  # the training pool; default: all tasks of the study
    eval_tasks: tuple[str, ...] | None = None  # the evaluated tasks; default: all tasks of the study
    allow_overlap: bool = False  # split only: let eval_tasks share tasks with train_tasks (rows then not held out)
    # why this study cannot test the cross-model question (e.g. no offline target with a trained head fits its
    # budget): the stage then runs nothing and logs "not testable offline: <reason>", and the report gives no verdict
    not_testable: str | None = None


@dataclass(frozen=True)
class StudySpec:
    name: Name  # the workdir and the MLflow experiment are named after it
    backbones: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: tuple[Annotated[int, Range(ge=0, lt=2**32)], ...] = (0,)
    description: str = ""
    insertion: Annotated[str, Insertion] = "prepend"
    prompt_length: Count = DEFAULT_TOKENS
    init: Annotated[str, SpecInit] = "random"
    init_text: str | None = None  # the text whose token embeddings start every prompt (init: text); {labels}
    #                               becomes each task's label words, "negative, neutral or positive"
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataLimits = field(default_factory=DataLimits)
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    cluster: GpuCluster = field(default_factory=GpuCluster)  # where the study runs, not what it computes: not hashed
    max_concurrent: Count | None = None
    max_failures: Annotated[int, Range(ge=0)] = 2  # retries of a failed trial, from its last checkpoint
    storage_path: str | None = None  # local dir, NFS path or s3://; default WORKDIR/ray_results
    storage_shared: bool = False  # a local storage_path that every node mounts (NFS, RWX): allowed multi-node
    tracking_uri: str | None = None
    workdir: str | None = None
    stages: tuple[str, ...] = ("train",)
    transfer: TransferStage = field(default_factory=TransferStage)
    tpt: TptStage = field(default_factory=TptStage)
    indicators: IndicatorStage = field(default_factory=IndicatorStage)
    projector: ProjectorStage = field(default_factory=ProjectorStage)
    findings: Findings = field(default_factory=Findings)
    source_file: str | None = None

    def hash(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("source_file")
        d.pop("storage_shared")  # where checkpoints live, not what is computed: same hash, same experiment
        d.pop("findings")  # what the report tests, not what any stage computes
        d.pop("cluster")  # which GPUs run it, likewise
        if d["train"].get("group_size") in (None, AUTO):  # unset or auto: the hash every spec had before the field
            d["train"].pop("group_size", None)
        if d["tpt"].get("sources") is None:  # likewise for tpt.sources
            d["tpt"].pop("sources", None)
        if not d["transfer"].get("init_baseline"):  # likewise for transfer.init_baseline
            d["transfer"].pop("init_baseline", None)
        if d["projector"].get("not_testable") is None:  # likewise for projector.not_testable
            d["projector"].pop("not_testable", None)
        return config_hash(d)


    def gpu_plans(self) -> list:
        """Per backbone, its GPU plan (ptx.packing.GroupPlan); [] for a CPU study."""
        return gpu_plans(self)


AUTO = "auto"  # train.group_size: picked from the memory model and the cluster (gpu_plans)
INIT_MODES = tuple(m.value for m in SpecInit)
NESTED = {"train": TrainSettings, "data": DataLimits, "search": Search, "scheduler": Scheduler,
          "resources": Resources, "cluster": GpuCluster, "transfer": TransferStage, "tpt": TptStage,
          "indicators": IndicatorStage, "projector": ProjectorStage, "findings": Findings}


def _build(cls, raw, where: str, errors: list):
    """Construct a dataclass from a dict, collecting unknown keys and type errors."""
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, found {type(raw).__name__}")
        return cls() if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                            for f in fields(cls)) else None
    known = {f.name: f for f in fields(cls)}
    kwargs, invalid = {}, set()
    for key, value in raw.items():
        if key not in known or key == "source_file":
            errors.append(f"{where}.{key}: unknown key{suggest(key, known)}")
            continue
        sub = NESTED.get(key) if cls is StudySpec else (Resources if key == "resources" else None)
        if sub is not None:
            value = _build(sub, value, f"{where}.{key}", errors)
        else:
            value = _coerce(value, known[key], f"{where}.{key}", errors)
            if value is _INVALID:  # reported; the default stands in so the cross-field checks still run
                invalid.add(key)
                continue
        kwargs[key] = value
    for f in fields(cls):
        if f.name not in kwargs and f.name not in invalid and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{where}.{f.name}: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError:
        return None


_INVALID = object()


def _coerce(value, f, where: str, errors: list):
    """A field's value checked against its declared type and range (ptx.fields); lists become tuples."""
    try:
        return check_value(value, f.type, where)
    except PtxError as exc:
        errors.append(str(exc))
        return _INVALID


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
    if spec.init in ("text", "text_noise") and not (isinstance(spec.init_text, str) and spec.init_text.strip()):
        errors.append(f"{where}.init_text: init '{spec.init}' needs a non-empty init_text, found {spec.init_text!r}")
    train_fields = {f.name for f in fields(TrainSettings)} | {"prompt_length", "init"}
    for key, dist in spec.search.space.items():
        if key not in train_fields:
            errors.append(f"{where}.search.space.{key}: not a searchable field{suggest(key, train_fields)}")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SEARCH_KINDS:
            errors.append(f"{where}.search.space.{key}: expected one of {{{', '.join(SEARCH_KINDS)}: ...}}, found {dist!r}")
        elif spec.search.algorithm == "grid" and next(iter(dist)) not in ("grid", "choice"):
            errors.append(f"{where}.search.space.{key}: grid search takes grid/choice lists, found {next(iter(dist))}")
        else:
            _check_distribution(dist, f"{where}.search.space.{key}", errors)
    _check_spec_names(spec, names, where, errors)
    for res_where, res in ((f"{where}.resources", spec.resources), (f"{where}.transfer.resources", spec.transfer.resources),
                           (f"{where}.indicators.resources", spec.indicators.resources)):
        if res.gpu > 1 and res.gpu != int(res.gpu):
            errors.append(f"{res_where}.gpu: expected a fraction ≤ 1 or a whole number, found {res.gpu}")
        for name, amount in res.custom.items():
            if not isinstance(name, str) or isinstance(amount, bool) or not isinstance(amount, int | float) \
                    or not amount >= 0 or amount == float("inf"):
                errors.append(f"{res_where}.custom: expected resource name -> amount ≥ 0, found {name!r}: {amount!r}")
    if spec.train.label_loss not in LABEL_LOSSES:
        errors.append(f"{where}.train.label_loss: expected one of {list(LABEL_LOSSES)}, found {spec.train.label_loss!r}")
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


def _check_distribution(dist: dict, where: str, errors: list) -> None:
    """A search distribution's argument: a non-empty list (grid, choice) or [low, high] numbers, low < high."""
    (kind, arg), = dist.items()
    if kind in ("grid", "choice"):
        if not isinstance(arg, list | tuple) or not arg:
            errors.append(f"{where}.{kind}: expected a non-empty list of values, found {arg!r}")
        return
    numbers = isinstance(arg, list | tuple) and len(arg) == 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and abs(v) != float("inf") and v == v for v in arg)
    if not numbers or not arg[0] < arg[1] or (kind == "loguniform" and arg[0] <= 0) or (
            kind == "randint" and not all(isinstance(v, int) for v in arg)):
        what = "whole numbers" if kind == "randint" else "positive numbers" if kind == "loguniform" else "numbers"
        errors.append(f"{where}.{kind}: expected [low, high], {what} with low < high, found {arg!r}")


def _check_spec_names(spec: StudySpec, tasks: dict, where: str, errors: list) -> None:
    """Names a later stage would look up: TPT's source, the projector's tasks and backbones, transfer splits."""
    from ptx.assets import ALIASES

    modes = [m.value for m in TptSource]
    key = "sources" if spec.tpt.sources is not None else "source"
    if spec.tpt.sources is not None and not spec.tpt.sources:
        errors.append(f"{where}.tpt.sources: expected a non-empty list of source modes, found []")
    if len(set(spec.tpt.source_modes)) != len(spec.tpt.source_modes):
        errors.append(f"{where}.tpt.sources: each source mode once, found {list(spec.tpt.source_modes)}")
    for source in spec.tpt.source_modes:
        if not (source in modes or source in tasks or (source.startswith("indicator:") and source.split(":", 1)[1])):
            errors.append(f"{where}.tpt.{key}: expected one of {modes}, indicator:<name> or a task name, found "
                          f"{source!r}{suggest(source, [*modes, *tasks])}")
    for key in ("source_backbone", "target_backbone"):
        name = getattr(spec.projector, key)
        if name is not None and name.startswith(("tiny-", "smollm", "minilm")) and name not in ALIASES:
            errors.append(f"{where}.projector.{key}: unknown backbone '{name}'{suggest(name, ALIASES)}")
    for split in spec.transfer.splits:
        if split not in ("train", "dev", "test"):
            errors.append(f"{where}.transfer.splits: expected dev, test or train, found {split!r}")
    _check_findings(spec.findings, f"{where}.findings.primary", errors)


def _check_findings(findings: Findings, where: str, errors: list) -> None:
    """findings.primary: 'A vs B' comparisons of two different indicators the indicators stage logs."""
    from ptx.indicators import EMBEDDING_INDICATORS, MAIN_ON

    known = [*MAIN_ON, *EMBEDDING_INDICATORS]
    known += [f"{k}_disp" for k in known]
    for text in findings.primary:
        a, sep, b = str(text).partition(" vs ")
        if not sep or a.strip() == b.strip():
            errors.append(f"{where}: expected 'INDICATOR vs INDICATOR' (two different ones), found {text!r}")
            continue
        for name in (a.strip(), b.strip()):
            if name not in known:
                errors.append(f"{where}: unknown indicator '{name}' in {text!r}{suggest(name, known)}")


def _validate_groups(spec: StudySpec, where: str, errors: list) -> None:
    """train.group_size: a whole number ≥ 1, auto or null; groups need a scheduler that decides per trial (FIFO, not
    ASHA); on GPUs every trial must fit its share's memory (gpu_plans)."""
    size = spec.train.group_size
    if size in (None, AUTO):
        _validate_memory(spec, where, errors)
        return
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        errors.append(f"{where}.train.group_size: expected a whole number ≥ 1, auto or null, found {size!r}"
                      f"{suggest(size, [AUTO]) if isinstance(size, str) else ''}")
        return
    _validate_memory(spec, where, errors)
    if size == 1:
        return
    if spec.scheduler.type == "asha":
        errors.append(f"{where}.train.group_size: {size} puts several prompts in one trial, and ASHA stops whole "
                      "trials on one metric; use scheduler.type fifo or train.group_size 1")


def auto_groups(spec) -> bool:
    """Whether group_size auto/null sizes groups from memory: GPU trials, FIFO, a grid (the sweep's rule; else 1)."""
    return spec.resources.gpu > 0 and spec.scheduler.type == "fifo" and spec.search.algorithm == "grid"


def gpu_plans(spec: StudySpec) -> list:
    """Per backbone, the ptx.packing.GroupPlan of its trials on spec.cluster's GPUs; [] for a CPU study. Backbones without a config to size (a hub id ptx ships none for) are left
    out: nothing is downloaded to plan."""
    from math import prod

    from ptx.memory import Attention, Precision, TrialShape, backbone_shape
    from ptx.packing import plan_backbone
    from ptx.tasks import load_task

    if spec.resources.gpu <= 0:
        return []
    size = spec.train.group_size
    size = (None if auto_groups(spec) else 1) if size in (None, AUTO) else size
    t = spec.train
    grid = prod(len(d.get("grid", d.get("choice", [None]))) for d in spec.search.space.values()) \
        if spec.search.algorithm == "grid" and spec.search.space else 1
    repeats = grid * spec.search.num_samples
    tasks = [load_task(name) for name in spec.tasks]
    cap = spec.data.max_length or 10**9

    def shape(text: int, decoder: int = 1) -> TrialShape:
        return TrialShape(batch=t.batch_size, prompt_tokens=spec.prompt_length, text_tokens=min(text, cap),
                          precision=Precision.BF16 if t.bf16 else Precision.FP32, attention=Attention.FUSED,
                          dropout=t.dropout, eval_batch=t.eval_batch_size, decoder_tokens=decoder)

    together = [k for k in tasks if k.kind != "generation" and t.label_loss == "label_words"]
    apart = [k for k in tasks if k not in together]
    plans = []
    for backbone in spec.backbones:
        try:
            backbone_shape(backbone)
        except PtxError:
            continue
        grouped = shape(max(k.max_length for k in together)) if together else None
        singles = sorted({(k.max_length, k.max_new_tokens if k.kind == "generation" else 1) for k in apart})
        plans.append(plan_backbone(backbone, grouped, len(together) * len(spec.seeds), [shape(*s) for s in singles],
                                   len(apart) * len(spec.seeds), repeats, size, spec.resources.gpu,
                                   spec.cluster.gpus, spec.cluster.gpu_memory_mib))
    return plans


def _validate_memory(spec: StudySpec, where: str, errors: list) -> None:
    """Every GPU trial fits its share: predicted peak + CUDA context <= resources.gpu x cluster.gpu_memory_mib."""
    from ptx.memory import GIB

    if errors or spec.resources.gpu <= 0 or not isinstance(spec.cluster, GpuCluster):
        return  # sized only once the rest is valid: a plan needs known tasks and backbones
    size = spec.train.group_size
    for plan in gpu_plans(spec):
        if plan.fits:
            continue
        if plan.max_fit and auto_groups(spec):
            fix = f"train.group_size: auto (picks at most {plan.max_fit} here) or a group of at most {plan.max_fit}"
        elif plan.max_fit:
            fix = f"a group of at most {plan.max_fit}"
        elif spec.resources.gpu < 1:
            fix = (f"more GPU per trial (resources.gpu {min(1.0, 2 * spec.resources.gpu):g}) or a GPU with more "
                   "memory (cluster.gpu_memory_mib)")
        else:
            fix = "a GPU with more memory (cluster.gpu_memory_mib), or a smaller train.batch_size"
        errors.append(
            f"{where}.train.group_size: {size if size is not None else AUTO} does not fit the GPU: a {plan.backbone} "
            f"trial of {plan.largest} prompt(s) needs {plan.need / GIB:.1f} GiB (predicted peak "
            f"{plan.estimate.total / GIB:.1f} GiB + CUDA context) but its share is {plan.share / GIB:.1f} GiB "
            f"(resources.gpu {spec.resources.gpu:g} of a {spec.cluster.gpu_memory_mib} MiB GPU, cluster.gpu_memory_mib); "
            f"fix: {fix}")


def set_path(raw: dict, dotted: str, value) -> None:
    """Apply one `a.b=value` override (value parsed as YAML)."""
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise PtxError(f"override '{dotted}': '{k}' is not a mapping")
    try:
        node[keys[-1]] = yaml.safe_load(value) if isinstance(value, str) else value
    except yaml.YAMLError as exc:
        raise PtxError(f"override '{dotted}={value}': invalid YAML value ({str(exc).splitlines()[0]})") from None


def load_study(path: str | Path, overrides: list[str] | tuple = ()) -> StudySpec:
    """Read, override and validate a study spec; all errors raised together."""
    path = Path(path)
    if not path.is_file():
        raise PtxError(f"study spec {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise PtxError(f"study spec {path}: invalid YAML{where} ({str(exc).splitlines()[0]})") from None
    except (UnicodeDecodeError, ValueError) as exc:  # not text, or characters YAML does not allow
        raise PtxError(f"study spec {path}: not a UTF-8 YAML text ({type(exc).__name__})") from None
    except RecursionError:
        raise PtxError(f"study spec {path}: nested too deeply") from None
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
