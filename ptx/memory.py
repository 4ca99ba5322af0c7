"""Peak accelerator memory of one prompt-tuning trial, predicted from the backbone's config (no weights loaded).

A trial holds one frozen backbone and trains K prompts (ptx.train_group), `per_pass` members per backbone pass. The
backbone is frozen, so autograd keeps no input of a linear layer (its weight needs no gradient) and no weight
gradient; what a pass keeps for the backward that reaches the prompt is, per layer and per token:
- attention: q, k, v, and the output when a fused kernel (SDPA's flash / memory-efficient path, CUDA and CPU) runs
  it (T5 too with transformers >= 5, which runs its position bias through SDPA); the [heads, tokens] probabilities
  instead of the output when attention is materialised (eager attention);
- each layer norm's input (RoBERTa: 2 per layer; T5's RMS norm about 1.5 d_model each, 3 per layer);
- the FFN activation's input (GELU) or output (ReLU): d_ff;
- under bf16 autocast the matmul outputs are bf16 (2 bytes) and the layer-norm inputs stay fp32 (residual sums
  promote to fp32), and autocast caches a bf16 copy of every linear weight for the step.
T5 with label-word scoring runs a 1-token decoder whose cross-attention keeps each layer's k and v of the encoder
output (2 d_model per encoder token per decoder layer). The backward's peak adds one layer's gradients (the FFN's
two d_ff-wide tensors, the attention probabilities' gradient when materialised) to the kept activations.

Calibrated against measured peaks (benchmarks/bench_multiprompt.py --memory-only; benchmarks/RESULTS.md, "Memory
model"): the structural count above times OVERHEAD, a factor for what it leaves out (the embeddings' and the
head's few d_model-wide tensors, allocator rounding).
"""

import json
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ptx.errors import PtxError, suggest

MIB = 2**20
GIB = 2**30
# The CUDA context and torch's kernels, per process (every Ray trial is its own process): about 500 MiB with lazy
# module loading (CUDA 12); counted as 600 MiB so a trial is never planned to the last byte
CUDA_CONTEXT_BYTES = 600 * MIB
# torch's caching allocator reserves more than it hands out (block rounding, fragmentation between steps)
ALLOCATOR_MARGIN = 1.10
# fitted on the measured peaks (RESULTS.md): the structural count leaves out a few d_model-wide tensors per token
OVERHEAD = 1.05


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast over fp32 weights: what train_prompt does on CUDA with train.bf16


class Attention(str, Enum):
    FUSED = "fused"  # SDPA's flash / memory-efficient kernels (CUDA; CPU's flash): no [heads, tokens, tokens] tensor
    MATERIALISED = "materialised"  # eager attention


@dataclass(frozen=True)
class BackboneShape:
    """What the memory model needs of a backbone: its sizes (from config.json)."""

    name: str
    family: str  # encoder (BERT/RoBERTa), seq2seq (T5), decoder (Llama-like)
    layers: int  # encoder layers (seq2seq: also the decoder's count, as in T5)
    hidden: int
    ffn: int
    heads: int
    vocab: int
    decoder_layers: int = 0
    gated_ffn: bool = False  # SwiGLU / gated-GELU: two up projections, both kept

    @property
    def params(self) -> int:
        """Parameter count, near enough for memory (biases and norms included roughly)."""
        per_layer = 4 * self.hidden * self.hidden + (3 if self.gated_ffn else 2) * self.hidden * self.ffn + 9 * self.hidden
        cross = 4 * self.hidden * self.hidden * self.decoder_layers
        return self.vocab * self.hidden + (self.layers + self.decoder_layers) * per_layer + cross

    @property
    def linear_params(self) -> int:
        """Parameters of the matmuls autocast casts to bf16 (every layer's; not the embeddings)."""
        return self.params - self.vocab * self.hidden


@dataclass(frozen=True)
class TrialShape:
    """One trial's training work: K prompts of `prompt_tokens`, batches of `batch` x `text_tokens` per member."""

    batch: int
    prompt_tokens: int
    text_tokens: int
    group_size: int = 1
    per_pass: int = 1  # members in one backbone pass: their activations are kept together for one backward
    precision: Precision = Precision.BF16
    attention: Attention = Attention.FUSED
    dropout: bool = False  # train-mode dropout keeps a 1-byte mask per dropped element
    eval_batch: int = 0  # dev scoring (no grad); 0: left out
    decoder_tokens: int = 1  # seq2seq: the decoder's length (1 for label-word scoring; a target's for generation)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes of one trial: the backbone's weights, the step's working memory and their sum."""

    weights: int
    working: int  # above the loaded weights: activations, the autocast weight cache, prompts and AdamW states
    total: int

    def gib(self) -> float:
        return self.total / GIB


def shape_from_config(name: str, config: dict) -> BackboneShape:
    """A BackboneShape from a Hugging Face config.json dict; PtxError naming the missing key."""
    def get(*keys):
        for k in keys:
            if config.get(k) is not None:
                return int(config[k])
        raise PtxError(f"backbone '{name}' config: expected one of {list(keys)}, found none")

    hidden = get("hidden_size", "d_model")
    model_type = str(config.get("model_type", ""))
    if config.get("is_encoder_decoder"):
        layers = get("num_layers", "num_hidden_layers")
        gated = str(config.get("feed_forward_proj", "relu")).startswith("gated")
        return BackboneShape(name, "seq2seq", layers, hidden, get("d_ff", "intermediate_size"), get("num_heads"),
                             get("vocab_size"), decoder_layers=int(config.get("num_decoder_layers") or layers),
                             gated_ffn=gated)
    family = "decoder" if model_type in {"llama", "qwen2", "mistral", "gpt2", "gpt_neox"} else "encoder"
    ffn = int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden)
    return BackboneShape(name, family, get("num_hidden_layers", "n_layer"), hidden, ffn,
                         get("num_attention_heads", "n_head"), get("vocab_size"), gated_ffn=family == "decoder")


# shapes of the aliases that are not built from ptx/configs (their published configs)
_ALIAS_CONFIGS = {
    "minilm-l6": {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536,
                  "num_attention_heads": 12, "vocab_size": 30522},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                     "num_attention_heads": 9, "vocab_size": 49152},
}


def backbone_shape(name: str) -> BackboneShape:
    """The shape of a paper backbone (ptx/configs), a tiny alias or minilm/smollm, or a local model directory."""
    from ptx import assets

    name = name.removeprefix("random:")
    local = Path(name).expanduser() / "config.json"
    if local.is_file():
        return shape_from_config(name, json.loads(local.read_text()))
    if name in assets.TINY_MODELS:
        tiny = assets.TINY_MODELS[name]
        vocab = 1000  # the tiny vocabularies are small; their memory is noise next to any share
        return shape_from_config(name, {"model_type": tiny["model_type"], "vocab_size": vocab,
                                        "is_encoder_decoder": tiny["model_type"] == "t5", **tiny["config"]})
    if name in _ALIAS_CONFIGS:
        return shape_from_config(name, _ALIAS_CONFIGS[name])
    try:
        return shape_from_config(name, assets.paper_config(name))
    except PtxError:
        known = [*assets.TINY_MODELS, *_ALIAS_CONFIGS, *(p.stem for p in assets.CONFIGS_DIR.glob("*.json"))]
        raise PtxError(f"backbone '{name}': no config to size its memory from; expected one of {sorted(known)}"
                       f"{suggest(name, known)} or a model directory") from None


def _kept_per_token_layer(shape: BackboneShape, tokens: int, act: int, norm: int, attention: Attention,
                          dropout: bool) -> float:
    """Bytes kept for the backward per token per layer (module doc)."""
    h, f, a = shape.hidden, shape.ffn, shape.heads
    fused = attention is Attention.FUSED
    attn = (4 * h * act) if fused else (3 * h * act + a * tokens * 4)  # eager softmax probabilities: fp32
    # each norm's input; T5's RMS norm keeps about 1.5 d_model a token (its input, and its normalised value where the
    # next op needs it: counted with saved_tensors_hooks, tests/test_memory.py)
    norms = (3 if shape.family == "seq2seq" else 2) * h * norm
    ffn = (2 if shape.gated_ffn else 1) * f * act
    masks = (2 * h + (0 if fused else a * tokens)) if dropout else 0
    return attn + norms + ffn + masks


def saved_bytes(shape: BackboneShape, trial: TrialShape) -> int:
    """Bytes autograd keeps for the backward of one pass (per_pass members' rows): the module doc's count."""
    bf16 = trial.precision is Precision.BF16
    act, norm = (2, 4) if bf16 else (4, 4)
    tokens = trial.prompt_tokens + trial.text_tokens
    kept = shape.layers * tokens * _kept_per_token_layer(shape, tokens, act, norm, trial.attention, trial.dropout)
    if shape.family == "seq2seq":
        kept += shape.decoder_layers * tokens * 2 * shape.hidden * act  # cross-attention k, v of the encoder output
        dec = trial.decoder_tokens
        if dec > 1:  # a generation target: decoder layers like encoder ones plus cross-attention probabilities, and
            # the LM head's fp32 logits over the vocabulary with their softmax and gradient, per target token
            per_dec = _kept_per_token_layer(shape, dec, act, norm, trial.attention, trial.dropout)
            per_dec += 3 * shape.hidden * act + shape.heads * tokens * 4
            kept += dec * (shape.decoder_layers * per_dec + 3 * shape.vocab * 4)
    # embeddings (fp32): RoBERTa's prompt + text rows, their sum with the positions and its norm; T5's rows only
    kept += (1 if shape.family == "seq2seq" else 3) * tokens * shape.hidden * 4
    return trial.per_pass * trial.batch * kept


def predict(shape: BackboneShape, trial: TrialShape) -> MemoryEstimate:
    """Peak bytes of one trial: weights + max(training step, dev scoring) + the members' prompts and AdamW states."""
    if trial.per_pass < 1 or trial.group_size < 1 or trial.per_pass > trial.group_size:
        raise PtxError(f"memory model: expected 1 <= per_pass <= group_size, found per_pass {trial.per_pass}, "
                       f"group_size {trial.group_size}")
    bf16 = trial.precision is Precision.BF16
    act = 2 if bf16 else 4
    tokens = trial.prompt_tokens + trial.text_tokens
    rows = trial.per_pass * trial.batch  # stacked examples in one pass
    # one layer's backward gradients on top of the kept activations
    grads = tokens * (2 * (2 if shape.gated_ffn else 1) * shape.ffn * act + 3 * shape.hidden * 4)
    if trial.attention is Attention.MATERIALISED:
        grads += shape.heads * tokens * tokens * 4
    train = (saved_bytes(shape, trial) + rows * grads) * OVERHEAD
    # dev scoring: no grad, one layer's widest temporaries for eval_batch rows per member of a pass
    eval_rows = trial.per_pass * trial.eval_batch
    scoring = eval_rows * tokens * (3 * shape.ffn * act + 4 * shape.hidden * 4 +
                                    (shape.heads * tokens * 4 if trial.attention is Attention.MATERIALISED else 0))
    cache = 2 * shape.linear_params if bf16 else 0
    prompts = trial.group_size * 4 * trial.prompt_tokens * shape.hidden * 4  # weight, grad, AdamW m and v (fp32)
    working = int(cache + max(train, scoring) + prompts)
    weights = 4 * shape.params  # fp32 weights: autocast casts per matmul, the stored weights stay fp32
    return MemoryEstimate(weights=weights, working=working, total=weights + working)


def trial_need(estimate: MemoryEstimate) -> int:
    """Bytes of GPU memory a trial's share must hold: its peak with the allocator's margin, plus the CUDA context."""
    return int(math.ceil(estimate.total * ALLOCATOR_MARGIN)) + CUDA_CONTEXT_BYTES


def step_flops(shape: BackboneShape, batch: int, tokens: int) -> float:
    """Model FLOPs of one training step of one prompt (forward + backward to the prompt, no weight gradients)."""
    n_layers = shape.layers
    per_token = 2 * shape.linear_params / max(1, shape.layers + shape.decoder_layers) * n_layers
    attention = 2 * 2 * n_layers * tokens * shape.hidden  # scores and weighted sum, per token
    return 2 * batch * tokens * (per_token + attention)  # backward to the inputs costs about the forward again
