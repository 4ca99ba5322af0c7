"""The soft prompt, its init modes, and the prompt artifact (save, strict load, PEFT export, import)."""

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ptx import __version__
from ptx.errors import PtxError
from ptx.io import atomic_dir, git_sha, write_json

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
DEFAULT_TOKENS = 100  # the paper's prompt length
VOCAB_SAMPLE_TOP = 5000  # sample init tokens from the most frequent ids (low ids in BPE/WordPiece vocabularies)
# text_noise: the noise's sd as a share of the vocabulary embeddings' sd. Half keeps the instruction the larger
# part of each token (the prompt starts near what it says) and still makes two starts of one text differ in
# every coordinate (docs/findings.md, the pilot)
TEXT_NOISE_SCALE = 0.5


class InitMode(str, Enum):
    RANDOM = "random"  # Gaussian with the vocabulary embeddings' own scale
    VOCAB = "vocab"  # embeddings of sampled vocabulary tokens
    TEXT = "text"  # embeddings of an init text, cycled to length
    # the task's own instruction plus Gaussian noise seeded by (seed, task): every (seed, task) prompt starts from
    # its own tensor, while the instruction still names the label words (what lets a prompt learn in few CPU steps)
    TEXT_NOISE = "text_noise"
    ARTIFACT = "artifact"  # a saved prompt (transfer initialisation)


class SoftPrompt(nn.Module):
    """A trainable [n_tokens, d_model] prompt; the only parameters that train."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.weight


def init_seed(seed: int, task: str | None = None) -> int:
    """The generator seed of a random or vocab init: `seed` alone, or (seed, task) mixed so that no two tasks of one
    seed start from the same prompt (shared starts make prompt similarity partly measure the shared start)."""
    if task is None:
        return int(seed)
    digest = hashlib.sha256(f"ptx-init:{int(seed)}:{task}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: torch.Generator takes a signed 64-bit seed


def init_prompt(backbone, n_tokens: int = DEFAULT_TOKENS, mode: str = "random", seed: int = 0,
                text: str | None = None, artifact: str | Path | None = None, task: str | None = None) -> torch.Tensor:
    """An initial prompt [n_tokens, d_model] for `backbone`; random and vocab draws are seeded by (seed, task)."""
    try:
        mode = InitMode(mode)
    except ValueError:
        raise PtxError(f"unknown init mode '{mode}'; expected one of {[m.value for m in InitMode]}") from None
    gen = torch.Generator().manual_seed(init_seed(seed, task))
    emb = backbone.input_embeddings().detach().float().cpu()
    if mode is InitMode.RANDOM:
        return torch.randn(n_tokens, emb.shape[1], generator=gen) * emb.std()
    if mode is InitMode.VOCAB:
        ids = torch.randint(0, min(VOCAB_SAMPLE_TOP, emb.shape[0]), (n_tokens,), generator=gen)
        return emb[ids].clone()
    if mode in (InitMode.TEXT, InitMode.TEXT_NOISE):
        if not text:
            raise PtxError(f"init mode '{mode.value}' needs --init-text (the text whose token embeddings start the "
                           "prompt)")
        ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PtxError(f"init text {text!r} tokenizes to nothing")
        start = emb[torch.tensor([ids[i % len(ids)] for i in range(n_tokens)])].clone()
        if mode is InitMode.TEXT:
            return start
        return start + torch.randn(n_tokens, emb.shape[1], generator=gen) * (TEXT_NOISE_SCALE * emb.std())
    if artifact is None:
        raise PtxError("init mode 'artifact' needs the path of a prompt artifact (--init-from DIR)")
    loaded = load_prompt(artifact, backbone=backbone)
    if loaded.prompt.shape[0] != n_tokens:
        raise PtxError(f"init prompt {artifact} has {loaded.prompt.shape[0]} tokens; this run wants {n_tokens}")
    return loaded.prompt.clone()


def init_record(mode: str | None, seed, task: str | None, text: str | None = None, source: str | None = None) -> dict:
    """prompt.json's `init`: the mode, its source, and what rebuilds the start (`reconstruct_init`): the generator
    seed of a random/vocab draw, the text of a text init."""
    out = {"mode": mode, "source": source}
    if mode in SEEDED and seed is not None:
        out["seed"] = init_seed(int(seed), task)
    if mode in TEXTUAL and text:
        out["text"] = text
    return out


SEEDED = (InitMode.RANDOM.value, InitMode.VOCAB.value, InitMode.TEXT_NOISE.value)  # modes that draw from a generator
TEXTUAL = (InitMode.TEXT.value, InitMode.TEXT_NOISE.value)  # modes that read an init text


def reconstruct_init(meta: dict, backbone) -> torch.Tensor | None:
    """The prompt a run started from [n_tokens, d_model], rebuilt from its prompt.json; None when it cannot be
    (an imported prompt, a transfer init, a text init written before the text was recorded)."""
    init, n_tokens = meta.get("init") or {}, meta.get("n_tokens")
    mode = init.get("mode")
    if n_tokens is None or mode not in (*SEEDED, *TEXTUAL):
        return None
    if mode == InitMode.TEXT.value:
        return init_prompt(backbone, n_tokens, mode, text=init["text"]) if init.get("text") else None
    if mode == InitMode.TEXT_NOISE.value:  # the recorded seed is the generator's (init_seed's output): task=None
        if not init.get("text") or init.get("seed") is None:
            return None
        return init_prompt(backbone, n_tokens, mode, seed=int(init["seed"]), text=init["text"])
    seed = init.get("seed", meta.get("seed"))  # no init.seed: written before per-task seeding, the run's seed
    return init_prompt(backbone, n_tokens, mode, seed=int(seed)) if seed is not None else None


@dataclass(frozen=True)
class PromptArtifact:
    """A loaded prompt: the tensor [n_tokens, d_model] and its metadata (prompt.json)."""

    prompt: torch.Tensor
    meta: dict
    path: Path | None = None


BACKBONE_KEYS = ("name", "revision", "kind", "d_model")


def backbone_meta(backbone) -> dict:
    """The backbone identity recorded in artifacts."""
    return {"name": backbone.name, "revision": backbone.revision, "kind": backbone.kind.value,
            "d_model": backbone.d_model}


def prompt_meta(*, config_hash: str | None, run_id: str | None, backbone: dict, task: dict | None, verbalizer,
                insertion: str, init: dict, seed=None, best_step=None, dev_metric: dict | None = None,
                stopped: str | None = None, name: str | None = None) -> dict:
    """prompt.json's fields (`save_prompt` adds the format and ptx versions, the git sha and n_tokens): the one
    builder every writer uses (a trained, a finalised, an imported and a projected prompt), so all carry the same
    keys. `backbone` is `backbone_meta`'s record (a missing field is null); `dev_metric` {name, value}; `stopped`
    why training ended (a `TrainResult.stopped`, or scheduler/error for a trial closed from its checkpoint)."""
    return {"config_hash": config_hash, "mlflow_run_id": run_id, "name": name,
            "backbone": {k: backbone.get(k) for k in BACKBONE_KEYS}, "task": task,
            "verbalizer": list(verbalizer) if verbalizer is not None else None, "insertion": insertion, "init": init,
            "seed": seed, "best_step": best_step, "dev_metric": dev_metric, "stopped": stopped}


def save_prompt(out_dir: str | Path, prompt: torch.Tensor, meta: dict) -> Path:
    """Write a prompt artifact atomically: prompt.safetensors + prompt.json (sorted keys)."""
    if prompt.dim() != 2:
        raise PtxError(f"a prompt must be [n_tokens, d_model]; got shape {list(prompt.shape)}")
    full = {"format_version": FORMAT_VERSION, "ptx_version": __version__, "git_sha": git_sha(),
            "n_tokens": int(prompt.shape[0]), **meta}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file({"prompt": prompt.detach().float().cpu().contiguous()}, str(tmp / "prompt.safetensors"))
        write_json(tmp / "prompt.json", full)
    return out_dir


def read_meta(meta_file: Path, what: str) -> dict:
    """An artifact's JSON object; corrupt, non-UTF-8 or non-object content is a one-line PtxError."""
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise PtxError(f"{meta_file}: corrupt JSON ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict):
        raise PtxError(f"{meta_file}: expected a JSON object of {what}, found {type(meta).__name__}")
    return meta


def open_artifact(path: Path, stem: str, version: int) -> tuple[dict, Path, Path]:
    """(metadata, STEM.json, STEM.safetensors) of an artifact directory (a prompt, a projector): both files there,
    the JSON an object of the supported format `version`; else a one-line PtxError."""
    meta_file, weights = path / f"{stem}.json", path / f"{stem}.safetensors"
    for f in (meta_file, weights):
        if not f.is_file():
            raise PtxError(f"{path} is not a {stem} artifact: {f.name} is missing")
    meta = read_meta(meta_file, f"{stem} metadata")
    if meta.get("format_version") != version:
        raise PtxError(f"{meta_file}: format_version {meta.get('format_version')!r} is not supported "
                       f"(this ptx reads {version})")
    return meta, meta_file, weights


def load_prompt(path: str | Path, backbone=None) -> PromptArtifact:
    """Strictly load a prompt artifact; a mismatch with `backbone` names both sides."""
    path = Path(path)
    meta, meta_file, weights = open_artifact(path, "prompt", FORMAT_VERSION)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PtxError(f"{weights}: corrupt or truncated safetensors file ({exc})") from None
    if set(tensors) != {"prompt"}:
        raise PtxError(f"{weights}: expected one tensor 'prompt', found {sorted(tensors)}")
    prompt = tensors["prompt"]
    bmeta = meta.get("backbone") or {}
    if not isinstance(bmeta, dict):
        raise PtxError(f"{meta_file}: 'backbone' must be an object {{name, d_model, ...}}, found {type(bmeta).__name__}")
    if not prompt.dtype.is_floating_point:
        raise PtxError(f"{weights}: expected a floating-point prompt, found dtype {str(prompt.dtype).removeprefix('torch.')}")
    if prompt.dim() != 2 or prompt.shape[1] != bmeta.get("d_model"):
        raise PtxError(f"{weights}: prompt shape {list(prompt.shape)} does not match prompt.json "
                       f"d_model {bmeta.get('d_model')}")
    if not torch.isfinite(prompt).all():
        raise PtxError(f"{weights}: prompt holds NaN or inf values")
    if backbone is not None:
        check_compatible(meta, backbone, where=str(path))
    return PromptArtifact(prompt=prompt, meta=meta, path=path)


def check_compatible(meta: dict, backbone, where: str) -> None:
    """Raise when a prompt's backbone (name, width) is not `backbone`."""
    b = meta.get("backbone") or {}
    if b.get("d_model") != backbone.d_model:
        raise PtxError(f"{where}: prompt width {b.get('d_model')} (backbone '{b.get('name')}') does not match "
                       f"backbone '{backbone.name}' width {backbone.d_model}; cross-model use needs a projector")
    if b.get("name") != backbone.name:
        raise PtxError(f"{where}: prompt was trained on backbone '{b.get('name')}', not '{backbone.name}'; "
                       "cross-model use needs a projector")


PEFT_TASK_TYPE = {"causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "masked_lm": "FEATURE_EXTRACTION"}


def export_peft(artifact: PromptArtifact, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write a PEFT prompt-tuning adapter (adapter_config.json + adapter_model.safetensors)."""
    meta, prompt = artifact.meta, artifact.prompt
    where = f"run {meta['mlflow_run_id']}" if meta.get("mlflow_run_id") else str(artifact.path or "prompt")
    if meta.get("insertion") == "paper":
        raise PtxError(f"{where}: insertion 'paper' (the <mask>-slot layout) has no PEFT equivalent (PEFT cannot "
                       "replace slot 0 with <mask> or zero the prompt position embeddings); only 'prepend' "
                       "prompts export")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # atomic_dir would replace it whole
        raise PtxError(f"PEFT export target {out_dir.resolve()} exists and is not an empty directory")
    b = meta["backbone"]
    if b.get("kind") not in PEFT_TASK_TYPE:
        raise PtxError(f"prompt backbone kind {b.get('kind')!r} has no PEFT task type; expected one of "
                       f"{sorted(PEFT_TASK_TYPE)}")
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": PEFT_TASK_TYPE[b["kind"]],
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1,  # ptx prompts the encoder only, also for seq2seq
        "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": base_model or b["name"],
        # PEFT reads `revision` as a hub revision of the base model: ptx aliases' revisions ("ptx-tiny-v1") are not
        "revision": b.get("revision") if "/" in str(b["name"]) and not base_model else None,
        "inference_mode": True,
        "peft_version": None,
    }
    with atomic_dir(out_dir) as tmp:
        save_file({"prompt_embeddings": prompt.float().contiguous()}, str(tmp / "adapter_model.safetensors"))
        write_json(tmp / "adapter_config.json", {k: v for k, v in config.items() if v is not None})
    return out_dir


def import_torch_prompt(file: str | Path, d_model: int, backbone_name: str) -> torch.Tensor:
    """Read a released raw torch tensor file safely (weights_only) and check it is [n, d_model]."""
    file = Path(file)
    if not file.is_file():
        raise PtxError(f"{file}: no such file")
    try:
        with warnings.catch_warnings():  # a raw pickle makes torch warn about its protocol before refusing it: the
            warnings.simplefilter("ignore")  # user gets the one-line error below, not that warning beside it
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...: all mean "not a safe tensor file"
        raise PtxError(f"{file}: not a plain tensor file loadable with weights_only=True "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(obj, torch.Tensor):
        raise PtxError(f"{file}: expected one tensor [n_tokens, d_model], found {type(obj).__name__}")
    if obj.dim() != 2 or obj.shape[1] != d_model:
        raise PtxError(f"{file}: tensor shape {list(obj.shape)} does not fit backbone '{backbone_name}' "
                       f"(expected [n_tokens, {d_model}])")
    if not torch.isfinite(obj).all():
        raise PtxError(f"{file}: tensor holds NaN or inf values")
    return obj.float()


@dataclass(frozen=True)
class InitPlanEntry:
    """Where one (backbone, seed, task) prompt of a study starts, known before any training: the recipe
    `init_prompt` follows (mode, the generator seed of a seeded mode, the task's instruction of a text mode)."""

    backbone: str
    task: str
    seed: int
    mode: str
    n_tokens: int
    generator_seed: int | None  # init_seed(seed, task) for a seeded mode, else None (a text init draws nothing)
    text: str | None  # the task's own instruction ({labels} filled in) for a text mode, else None

    def recipe(self) -> str:
        """One line: what the prompt starts from."""
        parts = [f"{self.mode}, {self.n_tokens} tokens"]
        if self.text is not None:
            parts.append(f"text {self.text!r}")
        if self.generator_seed is not None:
            parts.append(f"generator seed {self.generator_seed}")
        return "; ".join(parts)

    def tensor(self, backbone) -> torch.Tensor:
        """The start itself [n_tokens, d_model] on `backbone` (the same call the train stage makes)."""
        return init_prompt(backbone, self.n_tokens, self.mode, seed=self.seed, text=self.text, task=self.task)


def init_plan(spec) -> list[InitPlanEntry]:
    """Every (backbone, seed, task) prompt of a study spec (ptx.config.StudySpec) with its start, in the train
    stage's order; computed from the spec alone (task metadata, no data, no weights)."""
    from ptx.tasks import load_task

    mode = InitMode(spec.init)
    out = []
    for backbone in spec.backbones:
        for task in spec.tasks:
            text = load_task(task).instruction(spec.init_text) if mode.value in TEXTUAL and spec.init_text else None
            for seed in spec.seeds:
                out.append(InitPlanEntry(backbone, task, int(seed), mode.value, int(spec.prompt_length),
                                         init_seed(int(seed), task) if mode.value in SEEDED else None, text))
    return out


def shared_starts(plan: list[InitPlanEntry], tensors: list[torch.Tensor] | None = None) -> list[tuple]:
    """Pairs of plan entries of different (seed, task) on one backbone that start from the same tensor: by
    their recipes, or, given `tensors` (one per entry), by the tensors themselves. [] when every start is its own."""
    pairs = []
    for i, a in enumerate(plan):
        for j in range(i + 1, len(plan)):
            b = plan[j]
            if a.backbone != b.backbone or (a.seed, a.task) == (b.seed, b.task):
                continue
            if (tensors is not None and torch.equal(tensors[i], tensors[j])) or \
                    (tensors is None and (a.mode, a.generator_seed, a.text) == (b.mode, b.generator_seed, b.text)):
                pairs.append((a, b))
    return pairs
