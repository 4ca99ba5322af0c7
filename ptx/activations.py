"""Activated FFN neurons of prompts: capture through forward hooks, bit-packed mask artifacts, overlap (ON).

A neuron is *active* when the value at its hook point is > 0 (`Backbone.ffn_modules`, `Backbone.active_neurons`,
`BackboneKind.active_rule`):
- BERT/RoBERTa/MPNet (masked LM): the intermediate block's output, i.e. after GELU. GELU(x) > 0 iff x > 0,
  so this is also "pre-activation > 0"; as in the paper's RoBERTa analysis.
- T5 (seq2seq): `wi` (or the gate `wi_0` of gated variants), before ReLU/GELU: ReLU(x) > 0 iff x > 0.
- Llama/Qwen2/SmolLM2 (gated decoder-only): the gate projection before SiLU (SiLU(x) > 0 iff x > 0). The
  FFN's value is SiLU(gate) * up, whose sign also depends on `up`; the gate alone says whether the unit opens.
- GPT-2: `c_fc` before GELU.
With the "examples" probe the hooked values are averaged over examples first, then compared with 0 (so for T5
and gated FFNs it is the mean pre-activation, for BERT/RoBERTa the mean post-GELU value).
"""

import logging
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from ptx import __version__
from ptx.backbones import Backbone, BackboneKind, Position
from ptx.errors import PtxError
from ptx.io import atomic_dir, write_json

log = logging.getLogger(__name__)
MASKS_FORMAT = 1
MASKS_FILE, MASKS_META = "activations.safetensors", "activations.json"
ACTIVE_RULE = {k.value: k.active_rule for k in BackboneKind}  # per kind name, recorded in activations.json


class Probe(str, Enum):
    PAPER = "paper"  # the prompt plus one start token: what the prompt alone switches on
    EXAMPLES = "examples"  # the prompt in front of N real task examples, values averaged over examples


class Hook(str, Enum):  # which stack's FFNs are hooked; only seq2seq backbones have two
    ENCODER = "encoder"
    DECODER = "decoder"


def parse_enum(cls, value, what: str):
    """`value` as a member of the str Enum `cls`; a PtxError naming `what` and the allowed values otherwise."""
    try:
        return cls(value)
    except ValueError:
        raise PtxError(f"unknown {what} '{value}'; expected one of {[m.value for m in cls]}") from None


def probe_batch(backbone: Backbone) -> dict:
    """The paper's minimal input, as a collated batch of one: `<mask>` input (masked LM), `</s>` (T5), one start token."""
    from ptx.data import collate

    ids, score = backbone.encode("", "", max_length=16)
    if backbone.kind is BackboneKind.CAUSAL_LM and not ids:  # no BOS in the template: add one start token
        tok = backbone.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids, score = [int(start)], 0
    return collate([{"input_ids": ids, "score_index": score}], backbone.pad_id)


@torch.no_grad()
def activation_values(backbone: Backbone, prompts: torch.Tensor, batch: dict, where: str = "decoder",
                      position: str = "score") -> torch.Tensor:
    """Hooked FFN values at the read position: prompts [P, n, d] x batch [B, T] -> [P, B, n_layers, d_ff]."""
    position = parse_enum(Position, position, "position")
    modules = backbone.ffn_modules(where)
    n_prompts, n_tok = prompts.shape[0], prompts.shape[1]
    bsz = batch["input_ids"].shape[0]
    index = backbone.read_index(batch, n_tok, where, position)
    seq_mask = torch.cat([batch["attention_mask"].new_ones(bsz, n_tok), batch["attention_mask"]], 1).float()
    captured: list = [None] * len(modules)

    def hook_for(layer: int):
        def hook(_module, _inputs, out):
            out = out.float()
            rows = out.shape[0]
            if index is None:
                m = seq_mask.to(out.device).repeat(n_prompts, 1)[:, : out.shape[1]]
                if out.shape[1] == 1:  # a decoder step: nothing to average
                    m = m[:, :1]
                val = (out * m[..., None]).sum(1) / m.sum(1, keepdim=True)
            else:
                val = out[torch.arange(rows, device=out.device), index.to(out.device).repeat(n_prompts)]
            captured[layer] = val.view(n_prompts, bsz, -1).cpu()
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        backbone.hidden_at_score(prompts.to(backbone.device), batch)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(captured, dim=2)


def capture_activations(backbone: Backbone, prompts: torch.Tensor, probe: str = "paper", examples=None,
                        position: str = "score", where: str = "decoder", prompts_per_pass: int = 8,
                        batch_size: int = 16) -> torch.Tensor:
    """Active-neuron masks of prompts [P, n, d] -> bool [P, n_layers, d_ff] (value > 0; see the module doc)."""
    from ptx.data import iterate_batches

    probe = parse_enum(Probe, probe, "probe")
    if prompts.dim() != 3 or prompts.shape[2] != backbone.d_model:
        raise PtxError(f"prompts: expected [P, n_tokens, {backbone.d_model}] for backbone '{backbone.name}', "
                       f"found {list(prompts.shape)}")
    if probe is Probe.EXAMPLES and (examples is None or len(examples) == 0):
        raise PtxError("probe 'examples' needs an encoded split of task examples (examples=...); found none")
    out = []
    for s in range(0, prompts.shape[0], prompts_per_pass):
        chunk = prompts[s: s + prompts_per_pass].float()
        if probe is Probe.PAPER:
            values = activation_values(backbone, chunk, probe_batch(backbone), where, position)[:, 0]
        else:
            total = 0.0
            for batch in iterate_batches(examples, batch_size, backbone.pad_id, seed=None):
                total = total + activation_values(backbone, chunk, batch, where, position).sum(1)
            values = total / len(examples)
        out.append(backbone.active_neurons(values))
    return torch.cat(out)


def hook_names(backbone: Backbone, where: str = "decoder") -> list[str]:
    """The dotted module names of the hook points, recorded in the activations artifact."""
    wanted = {id(m): i for i, m in enumerate(backbone.ffn_modules(where))}
    names = [""] * len(wanted)
    for name, module in backbone.model.named_modules():
        if id(module) in wanted and not names[wanted[id(module)]]:
            names[wanted[id(module)]] = name
    return names


# ---- the artifact ---------------------------------------------------------------------------------------
def save_masks(out_dir: str | Path, masks: torch.Tensor, meta: dict) -> Path:
    """Write masks bool [P, n_layers, d_ff] bit-packed (uint8 [P, ceil(L*F/8)]) + activations.json, atomically."""
    from safetensors.torch import save_file

    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise PtxError(f"masks: expected a bool tensor [P, n_layers, d_ff], found {masks.dtype} {list(masks.shape)}")
    runs = meta.get("prompt_runs")
    if runs is not None and len(runs) != masks.shape[0]:
        raise PtxError(f"masks: {masks.shape[0]} prompts but meta lists {len(runs)} prompt runs")
    p, n_layers, d_ff = masks.shape
    packed = np.packbits(masks.reshape(p, -1).cpu().numpy(), axis=1)
    full = {**meta, "format_version": MASKS_FORMAT, "ptx_version": __version__, "shape": [p, n_layers, d_ff],
            "packed_shape": list(packed.shape), "bitorder": "big", "n_layers": n_layers, "d_ff": d_ff}
    with atomic_dir(Path(out_dir)) as tmp:
        save_file({"masks": torch.from_numpy(packed)}, str(tmp / MASKS_FILE))
        write_json(tmp / MASKS_META, full)
    return Path(out_dir)


def load_masks(path: str | Path) -> tuple[torch.Tensor, dict]:
    """Read an activations artifact: (masks bool [P, n_layers, d_ff], meta)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    for name in (MASKS_FILE, MASKS_META):
        if not (path / name).is_file():
            raise PtxError(f"{path} is not an activations artifact: {name} is missing")
    meta = json.loads((path / MASKS_META).read_text())
    if meta.get("format_version") != MASKS_FORMAT:
        raise PtxError(f"{path / MASKS_META}: format_version {meta.get('format_version')!r}, expected {MASKS_FORMAT}")
    packed = load_file(str(path / MASKS_FILE)).get("masks")
    p, n_layers, d_ff = meta["shape"]
    if packed is None or list(packed.shape) != [p, -(-n_layers * d_ff // 8)]:
        raise PtxError(f"{path / MASKS_FILE}: packed masks {None if packed is None else list(packed.shape)} do not "
                       f"match shape {meta['shape']} in {MASKS_META}")
    return unpack_masks(packed.numpy(), n_layers, d_ff), meta


# ---- overlap of activated neurons (ON) ------------------------------------------------------------------
def overlap_counts(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared active neurons per layer [L, P, P] and active neurons per prompt and layer [L, P] (exact in fp32)."""
    m = masks.float().transpose(0, 1).contiguous()  # [L, P, F]: one matmul per layer, counts < 2**24
    return torch.bmm(m, m.transpose(1, 2)), m.sum(2)


def overlap_from_counts(inter: torch.Tensor, counts: torch.Tensor, measure: str = "cosine") -> torch.Tensor:
    """ON [P, P] from shared counts [P, P] and counts [P]: cosine |A∩B|/sqrt(|A||B|) or Jaccard; 0 if undefined."""
    if measure == "cosine":
        denom = torch.sqrt(counts[:, None] * counts[None, :])
    elif measure == "jaccard":
        denom = counts[:, None] + counts[None, :] - inter
    else:
        raise PtxError(f"unknown overlap measure '{measure}'; expected 'cosine' or 'jaccard'")
    return torch.where(denom > 0, inter / denom.clamp_min(1e-12), torch.zeros_like(inter))


def layer_windows(n_layers: int, k: int = 3, stride: int | None = None) -> list[tuple[int, int]]:
    """Windows of k layers [(start, stop)): consecutive (stride=k, the default) or sliding (stride=1)."""
    stride = stride or k
    if k < 1 or stride < 1:
        raise PtxError(f"layer windows: k and stride must be ≥ 1, found k={k} stride={stride}")
    k = min(k, n_layers)
    return [(s, s + k) for s in range(0, n_layers - k + 1, stride)]


def overlap_matrices(masks: torch.Tensor, k: int = 3, stride: int | None = None,
                     measures=("cosine", "jaccard")) -> dict[str, torch.Tensor]:
    """Pairwise ON of a bank, masks [P, L, F] -> {name: [P, P]}: all layers, each layer, each window of k layers.

    Names: "on" (cosine, all layers), "on_jaccard", "on.layer_3", "on.layers_1-3" (1-based, inclusive).
    """
    inter, counts = overlap_counts(masks)
    out = {}
    for measure in measures:
        base = "on" if measure == "cosine" else f"on_{measure}"
        out[base] = overlap_from_counts(inter.sum(0), counts.sum(0), measure)
        for layer in range(inter.shape[0]):
            out[f"{base}.layer_{layer + 1}"] = overlap_from_counts(inter[layer], counts[layer], measure)
        for a, b in layer_windows(inter.shape[0], k, stride):
            out[f"{base}.layers_{a + 1}-{b}"] = overlap_from_counts(inter[a:b].sum(0), counts[a:b].sum(0), measure)
    return out


# ---- the Ray actor pool ---------------------------------------------------------------------------------
class ActivationWorker:
    """A pool actor (ptx.stages.indicators.compute_bank_activations maps it with sweep.map_actors): loads one
    backbone once, returns packed masks per chunk.

    Test-only fault hook: when `fault_marker` names an existing file, the first actor to see it deletes it and
    exits its process (os._exit) in the middle of a chunk, so the pool must redo that chunk on a fresh actor.
    """

    def __init__(self, config: dict):
        import os

        from ptx.backbones import load_backbone

        if config.get("cache_dir"):
            os.environ["PTX_CACHE_DIR"] = config["cache_dir"]
        self.config = config
        self.backbone = load_backbone(config["backbone"], insertion=config.get("insertion", "prepend"))
        self.examples: dict = {}

    def _examples(self, task: str | None):
        if task is None:
            return None
        if task not in self.examples:
            from ptx.data import encode_split
            from ptx.tasks import load_task

            self.examples[task] = encode_split(load_task(task, max_length=self.config.get("max_length")),
                                               self.backbone, "train",
                                               limit=self.config.get("probe_examples", 16))
        return self.examples[task]

    def masks(self, item: dict) -> dict:
        """One chunk {prompts [p, n, d], task} -> {packed: bytes of uint8 [p, ceil(L*F/8)], rows, n_layers, d_ff}."""
        import os

        marker = self.config.get("fault_marker")
        if marker:
            try:
                os.unlink(marker)  # only one actor wins the unlink: it dies, the others carry on
                os._exit(1)
            except FileNotFoundError:
                pass
        c = self.config
        prompts = torch.tensor(np.array(item["prompts"], dtype=np.float32))  # own copy, not the read-only arg buffer
        masks = capture_activations(self.backbone, prompts, c.get("probe", "paper"),
                                    self._examples(item.get("task")), c.get("position", "score"),
                                    c.get("where", "decoder"), prompts_per_pass=c.get("prompts_per_pass", 8))
        packed = np.packbits(masks.reshape(masks.shape[0], -1).numpy(), axis=1)
        # bytes, not an array: the driver gets its own copy rather than a zero-copy view of a Ray buffer
        return {"packed": packed.tobytes(), "rows": packed.shape[0], "n_layers": masks.shape[1], "d_ff": masks.shape[2],
                "kind": self.backbone.kind.value, "hooks": hook_names(self.backbone, c.get("where", "decoder"))}


def unpack_masks(packed, n_layers: int, d_ff: int) -> torch.Tensor:
    """uint8 [P, ceil(L*F/8)] -> bool [P, n_layers, d_ff]."""
    packed = np.asarray(packed)
    bits = np.unpackbits(packed, axis=1, count=n_layers * d_ff)
    return torch.from_numpy(bits.astype(bool)).view(packed.shape[0], n_layers, d_ff)
