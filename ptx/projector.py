"""Cross-model prompt projectors (Su et al. §6): the module, its artifact, its training loop and its stage.

A projector maps a soft prompt of a source PLM [n, d_src] to one for a target PLM [n, d_tgt]. Two forms:
`flat` (the paper's: the flattened prompt through Linear → act → Linear, reshaped, LayerNorm per token) and
`per_token` (one small MLP applied to every prompt token; any prompt length, far fewer parameters).
Objectives: `distance` (MSE to the target PLM's own prompt for the same task), `task` (the target task's
cross-entropy through the frozen target backbone; only the projector trains) and `mixed` (weighted sum).
"""

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ptx import __version__
from ptx.errors import PtxError, suggest
from ptx.io import atomic_dir, git_sha, write_json

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
ARTIFACT = "projector"  # the MLflow artifact sub-directory of a projector run
NOT_TESTABLE = "not testable offline"  # the projector stage's skip reason when a spec declares projector.not_testable


class Form(str, Enum):
    FLAT = "flat"  # the paper's: [n*d_src] -> hidden -> [n*d_tgt]; fixed prompt length
    PER_TOKEN = "per_token"  # [d_src] -> hidden -> [d_tgt] per token; any prompt length


class Objective(str, Enum):
    DISTANCE = "distance"
    TASK = "task"
    MIXED = "mixed"


ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}


@dataclass(frozen=True)
class ProjectorConfig:
    """The architecture of a projector; validated when built, saved as `config` in projector.json."""

    form: str
    d_source: int
    d_target: int
    n_tokens: int | None = None  # flat only: the prompt length it is built for
    hidden: int = 768  # the paper's hidden size
    activation: str = "tanh"  # the paper's
    dropout: float = 0.0

    def __post_init__(self):
        errors = []
        if self.form not in [f.value for f in Form]:
            errors.append(f"form: expected flat or per_token, found '{self.form}'{suggest(self.form, [f.value for f in Form])}")
        for name in ("d_source", "d_target", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name}: expected a positive int, found {value!r}")
        if self.form == Form.FLAT.value and (not isinstance(self.n_tokens, int) or self.n_tokens < 1):
            errors.append(f"n_tokens: the flat form needs the prompt length (a positive int), found {self.n_tokens!r}")
        if self.activation not in ACTIVATIONS:
            errors.append(f"activation: expected one of {sorted(ACTIVATIONS)}, found '{self.activation}'")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout: expected 0 <= dropout < 1, found {self.dropout}")
        if errors:
            raise PtxError("projector config: " + "; ".join(errors))


class Projector(nn.Module):
    """Source prompt [n, d_src] (or [B, n, d_src]) -> target prompt [n, d_tgt] (or [B, n, d_tgt])."""

    def __init__(self, config: ProjectorConfig, out_scale: float = 1.0):
        super().__init__()
        self.config = config
        flat = config.form == Form.FLAT.value
        d_in = config.d_source * (config.n_tokens if flat else 1)
        d_out = config.d_target * (config.n_tokens if flat else 1)
        self.net = nn.Sequential(nn.Linear(d_in, config.hidden), ACTIVATIONS[config.activation](),
                                 nn.Dropout(config.dropout), nn.Linear(config.hidden, d_out))
        self.norm = nn.LayerNorm(config.d_target)
        # LayerNorm gives unit-scale tokens; start at the target vocabulary's scale instead, because decoder-only
        # models add prompts to a residual stream where a 30x louder token would swamp the text.
        with torch.no_grad():
            self.norm.weight.fill_(out_scale)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        squeeze = prompt.dim() == 2
        x = prompt[None] if squeeze else prompt
        if self.config.form == Form.FLAT.value:
            y = self.net(x.reshape(x.shape[0], -1)).view(x.shape[0], x.shape[1], self.config.d_target)
        else:
            y = self.net(x)
        y = self.norm(y)
        return y[0] if squeeze else y


def check_input(config: ProjectorConfig, prompt: torch.Tensor, where: str = "prompt") -> None:
    """Raise a PtxError naming both sides when `prompt` [n, d] does not fit the projector."""
    if prompt.dim() != 2:
        raise PtxError(f"{where}: expected a prompt [n_tokens, d_model], found shape {list(prompt.shape)}")
    if prompt.shape[1] != config.d_source:
        raise PtxError(f"{where}: prompt width {prompt.shape[1]} does not match the projector's source width "
                       f"{config.d_source}")
    if config.form == Form.FLAT.value and prompt.shape[0] != config.n_tokens:
        raise PtxError(f"{where}: prompt length {prompt.shape[0]} does not match the flat projector's n_tokens "
                       f"{config.n_tokens} (the per_token form takes any length)")


@torch.no_grad()
def apply_projector(projector: Projector, prompt: torch.Tensor) -> torch.Tensor:
    """Project one source prompt [n, d_src] -> [n, d_tgt] (eval mode, no gradient)."""
    check_input(projector.config, prompt)
    was = projector.training
    projector.eval()
    try:
        device = next(projector.parameters()).device
        return projector(prompt.float().to(device)).cpu()
    finally:
        projector.train(was)


# ---- the artifact -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectorArtifact:
    projector: Projector
    meta: dict
    path: Path | None = None


def save_projector(out_dir: str | Path, projector: Projector, source: dict, target: dict, objective: str,
                   train_tasks, metrics: dict | None = None, mlflow_run_id: str | None = None,
                   extra: dict | None = None) -> Path:
    """Write projector.safetensors + projector.json (sorted keys) atomically; source/target: {name, d_model, ...}."""
    cfg = projector.config
    for side, info, width in (("source", source, cfg.d_source), ("target", target, cfg.d_target)):
        if info.get("d_model") != width:
            raise PtxError(f"save_projector: {side} backbone '{info.get('name')}' width {info.get('d_model')} does "
                           f"not match the projector's d_{side} {width}")
    meta = {"format_version": FORMAT_VERSION, "ptx_version": __version__, "git_sha": git_sha(), "config": asdict(cfg),
            "source": source, "target": target, "objective": objective, "train_tasks": list(train_tasks),
            "metrics": metrics or {}, "mlflow_run_id": mlflow_run_id, **(extra or {})}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()}
        save_file(state, str(tmp / "projector.safetensors"))
        write_json(tmp / "projector.json", meta)
    return out_dir


def _state_shapes(config: ProjectorConfig) -> dict[str, list[int]]:
    """The state_dict shapes `Projector(config)` has, computed without allocating it."""
    flat = config.form == Form.FLAT.value
    d_in = config.d_source * (config.n_tokens if flat else 1)
    d_out = config.d_target * (config.n_tokens if flat else 1)
    return {"net.0.weight": [config.hidden, d_in], "net.0.bias": [config.hidden], "net.3.weight": [d_out, config.hidden],
            "net.3.bias": [d_out], "norm.weight": [config.d_target], "norm.bias": [config.d_target]}


def load_projector(path: str | Path) -> ProjectorArtifact:
    """Strictly load a projector artifact: format version, config and every tensor shape are checked."""
    from ptx.prompt import open_artifact

    path = Path(path)
    meta, meta_file, weights = open_artifact(path, "projector", FORMAT_VERSION)
    raw = meta.get("config") or {}
    if not isinstance(raw, dict):
        raise PtxError(f"{meta_file}: 'config' must be an object, found {type(raw).__name__}")
    for side in ("source", "target"):
        info = meta.get(side)
        if not isinstance(info, dict) or not isinstance(info.get("name"), str) or \
                isinstance(info.get("d_model"), bool) or not isinstance(info.get("d_model"), int):
            raise PtxError(f"{meta_file}: '{side}' must be an object {{name, d_model, ...}}, found {info!r:.80}")
    unknown = set(raw) - {f.name for f in fields(ProjectorConfig)}
    if unknown:
        raise PtxError(f"{meta_file}: unknown config keys {sorted(unknown)}")
    try:
        config = ProjectorConfig(**raw)
    except TypeError as exc:
        raise PtxError(f"{meta_file}: incomplete config ({exc})") from None
    for side in ("source", "target"):
        if meta[side]["d_model"] != getattr(config, f"d_{side}"):
            raise PtxError(f"{meta_file}: {side} width {meta[side]['d_model']} does not match config "
                           f"d_{side} {getattr(config, f'd_{side}')}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PtxError(f"{weights}: corrupt or truncated safetensors file ({exc})") from None
    # compare shapes before building the module: a config from a damaged file may ask for terabytes
    expected = _state_shapes(config)
    found = {k: list(v.shape) for k, v in tensors.items()}
    if expected != found:
        diff = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
        raise PtxError(f"{weights}: tensors do not match projector.json's config: "
                       + "; ".join(f"{k} expected {expected.get(k)} found {found.get(k)}" for k in diff))
    bad = sorted(k for k, v in tensors.items() if not v.dtype.is_floating_point or not torch.isfinite(v).all())
    if bad:
        raise PtxError(f"{weights}: tensors {bad} are not finite floating-point values")
    projector = Projector(config)
    projector.load_state_dict(tensors)
    projector.eval()
    return ProjectorArtifact(projector, meta, path)


def project_prompt_artifact(projector_dir: str | Path, prompt_dir: str | Path, out_dir: str | Path) -> Path:
    """Project a source-backbone prompt artifact into a target-backbone prompt artifact (init mode `projected`)."""
    from ptx.io import config_hash
    from ptx.prompt import load_prompt, prompt_meta, save_prompt

    proj = load_projector(projector_dir)
    art = load_prompt(prompt_dir)
    source, target = proj.meta["source"], proj.meta["target"]
    have = art.meta.get("backbone") or {}
    if have.get("name") != source.get("name") or have.get("d_model") != source.get("d_model"):
        raise PtxError(f"{prompt_dir}: prompt is for backbone '{have.get('name')}' (width {have.get('d_model')}); "
                       f"projector {projector_dir} maps from '{source.get('name')}' (width {source.get('d_model')})")
    check_input(proj.projector.config, art.prompt, where=str(prompt_dir))
    projected = apply_projector(proj.projector, art.prompt)
    src_run, proj_run = art.meta.get("mlflow_run_id"), proj.meta.get("mlflow_run_id")
    meta = prompt_meta(config_hash=config_hash({"projector": proj_run or str(projector_dir),
                                                "prompt": src_run or str(prompt_dir),
                                                "prompt_hash": art.meta.get("config_hash")}),
                       run_id=None, backbone=target, task=art.meta.get("task"), verbalizer=art.meta.get("verbalizer"),
                       insertion=target.get("insertion", "prepend"),
                       init={"mode": "projected", "source": src_run, "projector": proj_run})
    return save_prompt(out_dir, projected, meta)


# ---- training ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectorSettings:
    objective: str = "task"
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    mix_weight: float = 0.5  # weight of the distance loss in `mixed`; the task loss gets 1 - mix_weight
    sampling: str = "round_robin"  # round_robin | uniform: which task a `task` step draws its batch from
    weight_decay: float = 0.0
    report_every: int = 10
    seed: int = 0


@dataclass
class ProjectorResult:
    projector: Projector
    curve: list = field(default_factory=list)  # [{step, loss, distance_loss?, task_loss?, task?}] per step
    tasks: tuple = ()  # the tasks that trained it
    seconds: float = 0.0


def train_projector(config: ProjectorConfig, settings: ProjectorSettings, sources: dict, targets: dict | None = None,
                    backbone=None, task_data: dict | None = None, report: Callable | None = None,
                    progress: bool = False) -> ProjectorResult:
    """Train a projector; sources/targets: {task: prompt [n, d]}, task_data: {task: (TaskSpec, encoded train split)}."""
    from ptx.data import iterate_batches

    try:
        objective = Objective(settings.objective)
    except ValueError:
        raise PtxError(f"projector objective '{settings.objective}': expected one of "
                       f"{[o.value for o in Objective]}") from None
    if settings.sampling not in ("round_robin", "uniform"):
        raise PtxError(f"projector sampling '{settings.sampling}': expected round_robin or uniform")
    for task, prompt in sources.items():
        check_input(config, prompt, where=f"source prompt of task '{task}'")
    use_distance, use_task = objective is not Objective.TASK, objective is not Objective.DISTANCE
    shared = sorted(set(sources) & set(targets or {}))
    if use_distance:
        if not shared:
            raise PtxError(f"projector objective '{objective.value}': no task has prompts on both backbones "
                           f"(source tasks {sorted(sources)}, target tasks {sorted(targets or {})})")
        for task in shared:
            want = (sources[task].shape[0], config.d_target)
            if tuple(targets[task].shape) != want:
                raise PtxError(f"target prompt of task '{task}': shape {list(targets[task].shape)} does not match the "
                               f"projected shape {list(want)}")
    task_names = sorted(set(sources) & set(task_data or {}))
    if use_task:
        if backbone is None or not task_names:
            raise PtxError(f"projector objective '{objective.value}' needs the target backbone and training data for "
                           f"tasks with a source prompt; source tasks {sorted(sources)}, data for {sorted(task_data or {})}")
        if backbone.d_model != config.d_target:
            raise PtxError(f"target backbone '{backbone.name}' width {backbone.d_model} does not match the projector's "
                           f"d_target {config.d_target}")
    torch.manual_seed(settings.seed)
    if backbone is not None:
        scale = float(backbone.input_embeddings().detach().float().std())
    else:
        scale = float(torch.cat([targets[t] for t in shared]).float().std())
    device = backbone.device if backbone is not None else torch.device("cpu")
    projector = Projector(config, out_scale=scale).to(device).train()
    opt = torch.optim.AdamW(projector.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    src = {t: p.float().to(device) for t, p in sources.items()}
    tgt = {t: targets[t].float().to(device) for t in shared}
    labels, streams = {}, {}
    if use_task:
        for i, task in enumerate(task_names):
            spec, data = task_data[task]
            labels[task] = backbone.label_ids(spec.label_words(backbone.kind)).to(device)
            streams[task] = iterate_batches(data, settings.batch_size, backbone.pad_id, seed=settings.seed + i, epochs=None)
    rng = random.Random(settings.seed)

    t0, curve, window = time.perf_counter(), [], []
    bar = tqdm(total=settings.steps, disable=not progress, desc=f"projector ({objective.value})")
    for step in range(1, settings.steps + 1):
        point, loss = {"step": step}, torch.zeros((), device=device)
        if use_distance:  # every shared task each step: a handful of small tensors
            dist = torch.stack([F.mse_loss(projector(src[t]), tgt[t]) for t in shared]).mean()
            point["distance_loss"] = dist.item()
            loss = loss + (settings.mix_weight if objective is Objective.MIXED else 1.0) * dist
        if use_task:  # balanced: one task per step, in turn or drawn uniformly
            task = task_names[(step - 1) % len(task_names)] if settings.sampling == "round_robin" else rng.choice(task_names)
            batch = next(streams[task])
            logits = backbone.label_logits(projector(src[task]), batch, labels[task])
            ce = F.cross_entropy(logits.float(), batch["labels"].to(device))
            point.update(task_loss=ce.item(), task=task)
            loss = loss + (1.0 - settings.mix_weight if objective is Objective.MIXED else 1.0) * ce
        if not torch.isfinite(loss):
            raise PtxError(f"projector training ({objective.value}): non-finite loss at step {step}; lower the lr "
                           f"(now {settings.lr})")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        point["loss"] = loss.item()
        curve.append(point)
        window.append(point)
        bar.update(1)
        if report and (step % settings.report_every == 0 or step == settings.steps):
            keys = [k for k in ("loss", "distance_loss", "task_loss") if k in window[0]]
            report({f"train_{k}": sum(p[k] for p in window) / len(window) for k in keys}, step)
            window = []
    bar.close()
    projector.eval()
    trained = tuple(sorted(set(shared if use_distance else []) | set(task_names if use_task else [])))
    return ProjectorResult(projector.cpu(), curve, trained, time.perf_counter() - t0)


def curve_mean(curve: list, key: str, last: bool, k: int = 5) -> float:
    """Mean of `key` over the first or last k points of a curve (a smoothed start/end loss)."""
    values = [p[key] for p in curve if key in p]
    part = values[-k:] if last else values[:k]
    return sum(part) / len(part) if part else math.nan
