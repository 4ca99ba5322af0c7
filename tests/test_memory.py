"""The memory model (ptx.memory): shapes from the shipped configs, the structural count worked by hand, and the
predictions against peaks measured with the real architectures.

Two kinds of measured peaks are checked, both cheap in CI:
- recorded ones (MEASURED: CPU peaks measured on this project's machines by benchmarks/bench_multiprompt.py
  --memory-only, real architectures with random weights, median of fresh processes; GPU peaks from the H200 run of
  benchmarks/gpu.sh in benchmarks/RESULTS.md) against the model within TOLERANCE. They pin the model: a change to
  its counts that moves a prediction off the measurements fails here. Re-measuring the real architectures takes
  minutes per figure, too slow for every CI run, hence the record (the commands are in RESULTS.md). Every
  recorded trial runs its members in one pass, as GPU trials do; a CPU group split into one-member passes measures
  31% above the model (minilm K=8, RESULTS.md), a gap not yet explained and left out of the tolerance set.
- one measured in the test: a small random RoBERTa's step in a fresh process (peak RSS growth with glibc's mmap
  threshold pinned, so freed tensors leave the resident set; bench_multiprompt's `--allocator fixed`).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptx.errors import PtxError
from ptx.memory import (
    GIB,
    MIB,
    Attention,
    BackboneShape,
    Precision,
    TrialShape,
    backbone_shape,
    predict,
    trial_need,
)

REPO = Path(__file__).resolve().parent.parent
# The relative error allowed between a measured peak and the prediction: the largest error of the fitted model on
# the recorded measurements (RESULTS.md, "Memory model") rounded up, so a count that drifts by more fails
TOLERANCE = 0.12

# (backbone, device, precision, attention, batch, prompt, text, K, per pass, measured MiB above the loaded weights)
MEASURED = [
    # H200, bf16 autocast, SDPA (benchmarks/RESULTS.md, GPU: the ptx rows and the ablations)
    ("roberta-base", "cuda", "bf16", "fused", 32, 100, 128, 1, 1, 1988),
    ("roberta-base", "cuda", "fp32", "fused", 32, 100, 128, 1, 1, 2903),
    ("roberta-large", "cuda", "bf16", "fused", 16, 100, 128, 1, 1, 2848),
    ("roberta-large", "cuda", "bf16", "fused", 64, 100, 128, 1, 1, 9419),
    ("t5-base", "cuda", "bf16", "materialised", 32, 100, 128, 1, 1, 3550),  # transformers 5.17: eager T5 attention
    # CPU, fp32, one thread, glibc's mmap threshold pinned (--allocator fixed: the peak RSS then follows the live
    # tensors; with the default allocator it is 1.25-1.42x these, RESULTS.md, "Memory model"), median of 3 processes
    # (roberta-base) or one process
    ("roberta-base", "cpu", "fp32", "fused", 8, 100, 28, 2, 2, 903),
    ("roberta-base", "cpu", "fp32", "fused", 8, 100, 28, 1, 1, 414),
    ("roberta-large", "cpu", "fp32", "fused", 4, 100, 28, 2, 2, 1121),  # one process each
    ("roberta-large", "cpu", "fp32", "fused", 4, 100, 28, 1, 1, 525),
    ("t5-base", "cpu", "fp32", "fused", 8, 100, 28, 2, 2, 1024),  # transformers 5.24: T5 through SDPA
    ("t5-base", "cpu", "fp32", "fused", 8, 100, 28, 1, 1, 478),
]


def _predicted_mib(backbone, precision, attention, batch, prompt, text, k, per_pass) -> float:
    trial = TrialShape(batch=batch, prompt_tokens=prompt, text_tokens=text, group_size=k, per_pass=per_pass,
                       precision=Precision(precision), attention=Attention(attention))
    return predict(backbone_shape(backbone), trial).working / MIB


@pytest.mark.parametrize("row", MEASURED, ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}-b{r[4]}-k{r[7]}")
def test_the_model_predicts_the_measured_peaks(row):
    backbone, _device, precision, attention, batch, prompt, text, k, per_pass, measured = row
    predicted = _predicted_mib(backbone, precision, attention, batch, prompt, text, k, per_pass)
    assert abs(measured / predicted - 1) <= TOLERANCE, f"{row}: predicted {predicted:.0f} MiB, measured {measured}"


def test_shapes_come_from_the_shipped_configs_and_count_the_real_parameters():
    import torch
    import transformers

    from ptx.assets import paper_config

    large = backbone_shape("roberta-large")
    assert (large.family, large.layers, large.hidden, large.ffn, large.heads, large.vocab) == (
        "encoder", 24, 1024, 4096, 16, 50265)
    t5 = backbone_shape("random:t5-base")
    assert (t5.family, t5.layers, t5.decoder_layers, t5.hidden, t5.ffn, t5.heads) == ("seq2seq", 12, 12, 768, 3072, 12)
    for name, auto in (("roberta-base", transformers.AutoModelForMaskedLM), ("roberta-large", transformers.AutoModelForMaskedLM),
                       ("t5-base", transformers.AutoModelForSeq2SeqLM)):
        cfg = paper_config(name)
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):  # no memory, no weights: the parameter count only
            model = auto.from_config(config)
        real = sum(p.numel() for p in model.parameters())
        assert abs(backbone_shape(name).params / real - 1) < 0.02, (name, backbone_shape(name).params, real)


def test_unknown_backbone_is_one_line_with_a_suggestion():
    with pytest.raises(PtxError, match=r"backbone 'roberta-lage': no config .*did you mean 'roberta-large'"):
        backbone_shape("roberta-lage")


def test_the_structural_count_worked_by_hand():
    # a 2-layer encoder, d=8, d_ff=32, 2 heads, vocab 10; batch 1, prompt 2 + text 2 = 4 tokens, fp32, fused attention
    shape = BackboneShape("toy", "encoder", layers=2, hidden=8, ffn=32, heads=2, vocab=10)
    est = predict(shape, TrialShape(batch=1, prompt_tokens=2, text_tokens=2, precision=Precision.FP32,
                                    attention=Attention.FUSED))
    # kept per token per layer: q, k, v, out (4 x 8 x 4 B) + 2 norm inputs (2 x 8 x 4 B) + GELU input (32 x 4 B)
    per = 4 * 8 * 4 + 2 * 8 * 4 + 32 * 4  # 320 B
    kept = 2 * 4 * per + 3 * 4 * 8 * 4  # 2 layers x 4 tokens, + the embeddings' 3 fp32 rows per token: 2944 B
    grads = 4 * (2 * 32 * 4 + 3 * 8 * 4)  # one layer's backward: 2 FFN-wide and 3 d-wide tensors per token: 1408 B
    prompts = 1 * 4 * 2 * 8 * 4  # weight, grad, AdamW m, v of a 2 x 8 prompt: 256 B
    params = 10 * 8 + 2 * (4 * 8 * 8 + 2 * 8 * 32 + 9 * 8)  # embeddings + per layer q/k/v/o, FFN, biases+norms: 1760
    assert est.working == int((kept + grads) * 1.05 + prompts)  # 1.05: OVERHEAD
    assert est.weights == 4 * params
    # bf16 adds autocast's bf16 copy of every layer weight; matmul outputs halve, norm inputs stay fp32
    bf16 = predict(shape, TrialShape(batch=1, prompt_tokens=2, text_tokens=2, precision=Precision.BF16,
                                     attention=Attention.FUSED))
    per16 = 4 * 8 * 2 + 2 * 8 * 4 + 32 * 2
    kept16, grads16 = 2 * 4 * per16 + 3 * 4 * 8 * 4, 4 * (2 * 32 * 2 + 3 * 8 * 4)
    assert bf16.working == int(2 * (params - 80) + (kept16 + grads16) * 1.05 + prompts)


def test_a_group_in_one_pass_keeps_every_members_activations_and_one_at_a_time_does_not():
    shape = backbone_shape("roberta-base")
    one = predict(shape, TrialShape(16, 100, 128, group_size=1, per_pass=1))
    eight_in_one = predict(shape, TrialShape(16, 100, 128, group_size=8, per_pass=8))
    eight_alone = predict(shape, TrialShape(16, 100, 128, group_size=8, per_pass=1))
    prompt_state = 4 * 100 * 768 * 4
    cache = 2 * shape.linear_params
    assert eight_in_one.working - cache - 8 * prompt_state == pytest.approx(8 * (one.working - cache - prompt_state), abs=8)
    assert eight_alone.working == one.working + 7 * prompt_state
    with pytest.raises(PtxError, match="per_pass <= group_size"):
        predict(shape, TrialShape(16, 100, 128, group_size=2, per_pass=3))


def test_a_trial_needs_its_peak_with_the_margin_plus_the_cuda_context():
    est = predict(backbone_shape("roberta-large"), TrialShape(16, 100, 128, group_size=13, per_pass=13))
    assert trial_need(est) == pytest.approx(est.total * 1.10 + 600 * MIB, abs=1)
    # issue 30's arithmetic: 13 roberta-large prompts in one pass are far above half of any 24 GB card
    assert trial_need(est) > 0.5 * 23028 * MIB and est.total > 20 * GIB


_PROBE = r"""
import ctypes, json, sys
import torch, transformers
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from common import PeakMemory
from ptx.backbones import Backbone, BackboneKind, Insertion
from types import SimpleNamespace
torch.set_num_threads(1)
cfg = transformers.RobertaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=1024, max_position_embeddings=514, pad_token_id=1)
model = transformers.AutoModelForMaskedLM.from_config(cfg, attn_implementation="sdpa").eval().requires_grad_(False)
tok = SimpleNamespace(pad_token_id=1, eos_token_id=2, mask_token_id=999)
bb = Backbone(name="probe", revision=None, kind=BackboneKind.MASKED_LM, insertion=Insertion.PREPEND, model=model,
              tokenizer=tok, d_model=256, n_layers=4, d_ff=1024)
B, P, T = 16, 64, 64
ids = torch.randint(10, 990, (B, T)); ids[:, T - 2] = 999
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "score_index": torch.full((B,), T - 2),
         "labels": torch.zeros(B, dtype=torch.long)}
prompt = torch.zeros(P, 256, requires_grad=True)
labels = torch.tensor([5, 6])
from ptx.train_group import group_backward
group_backward(bb, [(prompt, batch, labels)], 1)  # warm: kernels, lazy buffers
prompt.grad = None
meter = PeakMemory("cpu"); meter.start()
for _ in range(2):
    group_backward(bb, [(prompt, batch, labels)], 1)
    prompt.grad = None
print(json.dumps({"peak": meter.peak()}))
"""


def test_the_model_predicts_a_peak_measured_here():
    """A small random RoBERTa (d=256, 4 layers) trained one step in a fresh process: the RSS peak with glibc's mmap
    threshold pinned at 64 KiB (every activation its own mapping, returned when freed) against the model."""
    env = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(REPO)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    shape = BackboneShape("probe", "encoder", layers=4, hidden=256, ffn=1024, heads=4, vocab=1000)
    trial = TrialShape(batch=16, prompt_tokens=64, text_tokens=64, precision=Precision.FP32,
                       attention=Attention.FUSED)
    predicted = predict(shape, trial).working - 4 * 64 * 256 * 4  # no AdamW here: the prompt and its grad only
    predicted += 2 * 64 * 256 * 4
    assert abs(measured / predicted - 1) <= TOLERANCE, f"measured {measured / MIB:.1f} MiB, predicted {predicted / MIB:.1f}"


def _saved_activation_bytes(model_kind: str, dtype_ctx, hidden=64, layers=2, heads=4, ffn=256, batch=4, prompt=8,
                            text=24) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in one forward of a random backbone to a prompt."""
    import contextlib
    from types import SimpleNamespace

    import torch
    import transformers

    from ptx.backbones import Backbone, BackboneKind, Insertion

    torch.manual_seed(0)
    if model_kind == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=500, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=ffn, pad_token_id=1)
        model = transformers.AutoModelForMaskedLM.from_config(cfg, attn_implementation="sdpa")
        kind, mask_id = BackboneKind.MASKED_LM, 499
    else:
        cfg = transformers.T5Config(vocab_size=500, d_model=hidden, d_kv=hidden // heads, d_ff=ffn, num_layers=layers,
                                    num_heads=heads, feed_forward_proj="relu", decoder_start_token_id=0)
        model = transformers.AutoModelForSeq2SeqLM.from_config(cfg)
        kind, mask_id = BackboneKind.SEQ2SEQ, None
    model.eval().requires_grad_(False)
    tok = SimpleNamespace(pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id, mask_token_id=mask_id)
    bb = Backbone(name="probe", revision=None, kind=kind, insertion=Insertion.PREPEND, model=model, tokenizer=tok,
                  d_model=hidden, n_layers=layers, d_ff=ffn)
    ids = torch.randint(10, 490, (batch, text))
    if mask_id is not None:
        ids[:, text - 2] = mask_id
    batch_d = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "score_index": torch.full((batch,), text - 2 if mask_id is not None else 0), "labels": torch.zeros(batch, dtype=torch.long)}
    prompt = torch.zeros(prompt, hidden, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != prompt.untyped_storage().data_ptr():
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), dtype_ctx or contextlib.nullcontext():
        bb.stacked_label_logits([(prompt, batch_d)], [torch.tensor([5, 6])])
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["roberta", "t5"])
def test_the_kept_activations_are_what_autograd_saves(kind):
    """The model's per-layer count (saved_bytes) against the tensors autograd really saves for the backward, counted
    with saved_tensors_hooks on small random models (CPU, fp32; RoBERTa through SDPA, T5's eager attention)."""
    from ptx.memory import saved_bytes

    measured = _saved_activation_bytes(kind, None)
    family = "encoder" if kind == "roberta" else "seq2seq"
    shape = BackboneShape("probe", family, layers=2, hidden=64, ffn=256, heads=4, vocab=500,
                          decoder_layers=2 if kind == "t5" else 0)
    trial = TrialShape(batch=4, prompt_tokens=8, text_tokens=24, precision=Precision.FP32, attention=Attention.FUSED)
    predicted = saved_bytes(shape, trial)
    assert abs(measured / predicted - 1) <= 0.10, f"{kind}: autograd saved {measured} B, the model counts {predicted}"
