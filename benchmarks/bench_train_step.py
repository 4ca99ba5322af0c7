"""ptx's prompt-tuning train step vs HF PEFT prompt tuning: examples/s and peak memory, plus ablations.

Both sides tune the same number of prompt tokens in front of the same frozen model, on the same batches
(synthetic token ids of length --seq-len, seeded), with the same loss (cross-entropy over the label words'
logits at the scoring position) and the same optimizer (AdamW on the prompt only).

- ptx: a faithful copy of `ptx.train.train_prompt`'s inner step: `Backbone.label_logits` (label-word rows of the
  output head at the scoring position only), CE, backward, AdamW step, LR-scheduler step, zero_grad, loss.item().
- peft: what a PEFT user writes: `get_peft_model(model, PromptTuningConfig(...))`, PEFT's own forward on
  input_ids, then the label-word columns of its output logits at the scoring position (masked LM: the <mask>
  position, `task_type=FEATURE_EXTRACTION` as ptx's PEFT export uses; causal LM: the last real token after a
  full forward; seq2seq: `labels` = the label word, logits of the first decoder step).
  `num_transformer_submodules=1` (the prompt goes to the encoder only, like ptx).
- peft-default: the same with PEFT's default `num_transformer_submodules` (2 for seq2seq). In peft 0.21 prompt
  tuning still prompts only the encoder (the second n vectors are allocated and never used), so it costs the same.
- peft-lean: a PEFT user who knows transformers' `logits_to_keep` (the head only at the scoring positions) or,
  for seq2seq, passes `decoder_input_ids` instead of labels. The strongest PEFT baseline we know of. Masked-LM
  classes (BertForMaskedLM, RobertaForMaskedLM) have no `logits_to_keep` (it would be swallowed by **kwargs), so
  there peft-lean runs as peft and says so in a note.

Ablation variants (`--ablation NAME` picks a set; `--variants` lists any):
  ptx-onepass     decoder-only: one forward over [prompt; text] per example (what `ptx` runs on CUDA)
  ptx-promptonce  decoder-only: the prompt-once path, forced (what `ptx` runs on CPU)
  ptx-fullvocab   ptx-onepass's body, then the full-vocabulary head at the scoring position (ptx: label rows only)
  ptx-eager       ptx with eager attention instead of SDPA (`load_backbone` uses SDPA)
  ptx-compile     ptx with `torch.compile(Backbone.label_logits)` (compile time is in the warm-up, reported apart)
  ptx-weightgrads ptx with the frozen weights' requires_grad switched on (what freezing saves)
  padding         real task data: length-bucketed batches (data.bucketed_order) vs random batches
  cache           encode_split: cold (tokenize + write Arrow) vs warm (load the Arrow cache) vs no cache

Every variant runs in its own subprocess, so its memory meter starts fresh (see common.py for what is counted).
"""

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import (
    PeakMemory,
    command_line,
    emit,
    machine,
    median,
    mib,
    rotated_rounds,
    run_worker,
    table,
    timed_loop,
    write_json,
)

N_LABELS = 3
KIND_TASK = {"masked_lm": "FEATURE_EXTRACTION", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
# Random-weight models of real shapes (speed does not depend on the weights). Paper backbones come from
# ptx.assets.paper_config; the 1B Llama shape is spelled out here.
EXTRA_CONFIGS = {
    "llama-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192, vocab_size=32000,
                     max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0),
    # t5-small's published shape: a seq2seq model of real size that a 2-core CPU can still step
    "t5-small": dict(model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=512, d_kv=64, d_ff=2048,
                     num_layers=6, num_heads=8, vocab_size=32128, feed_forward_proj="relu", pad_token_id=0,
                     eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=True),
}
VARIANTS = {
    "ptx": {"impl": "ptx"},
    "peft": {"impl": "peft"},
    "peft-lean": {"impl": "peft", "lean": True},
    "peft-default": {"impl": "peft", "submodules": None},
    "ptx-onepass": {"impl": "ptx", "onepass": True},
    "ptx-promptonce": {"impl": "ptx", "promptonce": True},
    "ptx-fullvocab": {"impl": "ptx", "head": "full"},
    "ptx-eager": {"impl": "ptx", "attn": "eager"},
    "peft-eager": {"impl": "peft", "attn": "eager"},
    "ptx-compile": {"impl": "ptx", "compile": True},
    "ptx-weightgrads": {"impl": "ptx", "weight_grads": True},
}
# ratios are always first variant / the others
ABLATIONS = {"head": ["ptx-onepass", "ptx-fullvocab"], "prompt-once": ["ptx-promptonce", "ptx-onepass"],
             "attn": ["ptx", "ptx-eager"], "compile": ["ptx", "ptx-compile"], "grads": ["ptx", "ptx-weightgrads"]}


# ---- model and batches ------------------------------------------------------------------------------
def load(spec: str, device: str, weights_dtype, attn: str = "sdpa"):
    """A ptx Backbone: an alias/path through load_backbone, or `random:NAME` built from a config (random weights)."""
    import torch
    import transformers

    from ptx.backbones import Backbone, BackboneKind, Insertion, detect_kind, load_backbone

    if not spec.startswith("random:"):
        backbone = load_backbone(spec, device=device, dtype=weights_dtype)
        if attn != "sdpa":
            backbone.model.set_attn_implementation(attn)
        return backbone
    from types import SimpleNamespace

    from ptx.assets import paper_config

    name = spec.split(":", 1)[1]
    cfg = dict(EXTRA_CONFIGS[name]) if name in EXTRA_CONFIGS else paper_config(name)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    kind = detect_kind(config)
    auto = {BackboneKind.MASKED_LM: transformers.AutoModelForMaskedLM,
            BackboneKind.SEQ2SEQ: transformers.AutoModelForSeq2SeqLM,
            BackboneKind.CAUSAL_LM: transformers.AutoModelForCausalLM}[kind]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1B model's CPU init would take minutes
        model = auto.from_config(config, dtype=weights_dtype, attn_implementation=attn)
    model.requires_grad_(False)
    model.eval()
    c = model.config
    pad = c.pad_token_id if c.pad_token_id is not None else 0
    tokenizer = SimpleNamespace(pad_token_id=pad, eos_token_id=c.eos_token_id, mask_token_id=c.vocab_size - 1)
    d_model = getattr(c, "d_model", None) or c.hidden_size
    n_layers = getattr(c, "num_layers", None) or c.num_hidden_layers
    d_ff = getattr(c, "d_ff", None) or getattr(c, "intermediate_size", None) or 4 * d_model
    return Backbone(name=spec, revision=None, kind=kind, insertion=Insertion.PREPEND, model=model,
                    tokenizer=tokenizer, d_model=int(d_model), n_layers=int(n_layers), d_ff=int(d_ff))


def token_range(vocab: int) -> tuple[int, int]:
    """Ids to draw synthetic text from: above the special tokens at the low end, below the sentinels at the top."""
    lo = min(1000, vocab // 8)
    return lo, vocab - max(20, vocab // 100)


def make_batches(backbone, n: int, batch_size: int, seq_len: int, device: str, seed: int = 0) -> list[dict]:
    """Seeded synthetic batches in data.collate's layout: input_ids/attention_mask [B, T], score_index, labels [B]."""
    import torch

    from ptx.backbones import BackboneKind

    vocab = backbone.model.config.vocab_size
    lo, hi = token_range(vocab)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(lo, hi, (batch_size, seq_len), generator=g)
        if backbone.kind is BackboneKind.MASKED_LM:  # <mask> near the end, as "... It was <mask>." puts it
            score = max(0, seq_len - 2)
            ids[:, score] = backbone.tokenizer.mask_token_id
        elif backbone.kind is BackboneKind.CAUSAL_LM:
            score = seq_len - 1
        else:
            score = 0
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "score_index": torch.full((batch_size,), score, dtype=torch.long),
                 "labels": torch.randint(0, N_LABELS, (batch_size,), generator=g)}
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def label_word_ids(backbone):
    import torch

    lo, _ = token_range(backbone.model.config.vocab_size)
    return torch.tensor([lo + 1 + 7 * i for i in range(N_LABELS)], device=backbone.device)


def step_flops(backbone, batch_size: int, n_prompt: int, seq_len: int, prompt_once: bool = False) -> float:
    """Model FLOPs of one prompt-tuning step: 4 x (matmul parameters) x tokens run (forward + activation gradients,
    no weight gradients). The output head is left out for every variant (ptx computes only label rows), attention
    scores too. `prompt_once`: ptx's decoder-only path runs the prompt once, not once per example."""
    from torch import nn

    from ptx.backbones import BackboneKind

    def linear_params(module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    model, tokens = backbone.model, batch_size * (n_prompt + seq_len)
    if backbone.kind is BackboneKind.SEQ2SEQ:
        dec = model.get_decoder()
        cross_kv = sum(m.k.weight.numel() + m.v.weight.numel() for n, m in dec.named_modules() if n.endswith("EncDecAttention"))
        enc = linear_params(model.get_encoder())
        # encoder over every token; decoder for one step per example, except cross-attention K/V over every token
        return 4.0 * (enc * tokens + (linear_params(dec) - cross_kv) * batch_size + cross_kv * tokens)
    if prompt_once:
        tokens = n_prompt + batch_size * seq_len
    return 4.0 * linear_params(model.base_model) * tokens


def runs_prompt_once(backbone, opts: dict) -> bool:
    """Whether this variant takes Backbone.label_logits' decoder-only prompt-once path."""
    if opts.get("promptonce"):
        return True
    once = getattr(backbone, "_prompt_once", None)
    return (opts["impl"] == "ptx" and not opts.get("onepass") and opts.get("head") != "full" and once is not None
            and once())


# ---- the two training steps -------------------------------------------------------------------------
def autocast_ctx(device: str, dtype: str):
    import torch

    if dtype == "bf16":  # ptx's train_prompt: fp32 weights, bf16 autocast (on CUDA)
        return lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext


def init_prompt(backbone, n_tokens: int):
    import torch

    g = torch.Generator().manual_seed(0)
    emb = backbone.input_embeddings().detach().float()
    return torch.randn(n_tokens, backbone.d_model, generator=g) * emb.std().cpu()


def ptx_step(backbone, batches, n_tokens: int, opts: dict, ctx):
    """train_prompt's inner step; returns step(i) -> loss."""
    import torch
    import torch.nn.functional as F

    from ptx.backbones import BackboneKind
    from ptx.prompt import SoftPrompt

    model = backbone.model
    prompt = SoftPrompt(init_prompt(backbone, n_tokens)).to(backbone.device)
    opt = torch.optim.AdamW([prompt.weight], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    label_ids = label_word_ids(backbone)
    if opts.get("weight_grads"):
        model.requires_grad_(True)

    def full_vocab(weight, batch, ids):  # ablation: the whole head at the scoring position, then pick labels
        hidden = backbone.hidden_at_score(weight[None], batch)
        if backbone.kind is BackboneKind.MASKED_LM:
            head = model.cls if hasattr(model, "cls") else model.lm_head
            return head(hidden)[:, ids].float()
        if backbone.kind is BackboneKind.SEQ2SEQ and model.config.tie_word_embeddings:
            hidden = hidden * (backbone.d_model ** -0.5)
        return model.get_output_embeddings()(hidden)[:, ids].float()

    def one_pass(weight, batch, ids):  # ablation: label_logits without the decoder-only prompt-once path
        return backbone._head(backbone.hidden_at_score(weight[None], batch), ids).float()

    def prompt_once(weight, batch, ids):  # ablation: the prompt-once path on any device
        return backbone._head(backbone._hidden_prompt_once(weight[None], batch), ids).float()

    logits_fn = (full_vocab if opts.get("head") == "full" else one_pass if opts.get("onepass")
                 else prompt_once if opts.get("promptonce") else backbone.label_logits)
    if opts.get("compile"):
        logits_fn = torch.compile(logits_fn)
    grads = {"bytes": 0}

    def step(i):
        batch = batches[i % len(batches)]
        with ctx():
            logits = logits_fn(prompt.weight, batch, label_ids)
            loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        grads["bytes"] = max(grads["bytes"], sum(p.grad.numel() * p.grad.element_size()
                                                 for p in model.parameters() if p.grad is not None))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        return loss.item()

    return step, grads


def peft_step(backbone, batches, n_tokens: int, opts: dict, ctx):
    """The PEFT user's step; returns step(i) -> loss."""
    import torch
    import torch.nn.functional as F
    from peft import PromptTuningConfig, get_peft_model

    from ptx.backbones import BackboneKind

    kind = backbone.kind
    # 1: the prompt in front of the encoder only, as ptx; None: PEFT's default (2 for seq2seq: also the decoder)
    subs = opts.get("submodules", 1)
    config = PromptTuningConfig(task_type=KIND_TASK[kind.value], num_virtual_tokens=n_tokens,
                                token_dim=backbone.d_model, **({"num_transformer_submodules": subs} if subs else {}))
    model = get_peft_model(backbone.model, config)
    embedding = model.prompt_encoder["default"].embedding
    embedding.weight.data.copy_(init_prompt(backbone, embedding.weight.shape[0]).to(embedding.weight))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    label_ids = label_word_ids(backbone)
    lean = opts.get("lean", False)
    start = backbone.model.config.decoder_start_token_id if kind is BackboneKind.SEQ2SEQ else None
    grads = {"bytes": 0}
    if lean and kind is not BackboneKind.SEQ2SEQ:
        import inspect

        if "logits_to_keep" not in inspect.signature(type(backbone.model).forward).parameters:
            # e.g. BertForMaskedLM/RobertaForMaskedLM: the kwarg would be swallowed by **kwargs and ignored
            lean = False
            grads["note"] = f"{type(backbone.model).__name__} has no logits_to_keep: peft-lean runs as peft"

    def step(i):
        batch = batches[i % len(batches)]
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        rows = torch.arange(ids.shape[0], device=ids.device)
        with ctx():
            if kind is BackboneKind.SEQ2SEQ:
                extra = ({"decoder_input_ids": torch.full_like(ids[:, :1], start)} if lean
                         else {"labels": label_ids[labels][:, None]})
                # the first decoder step of the answer is the last position (after PEFT's decoder prompt, if any)
                word_logits = model(input_ids=ids, attention_mask=attn, **extra).logits[:, -1]
            else:
                pos = n_tokens + batch["score_index"]  # PEFT's output covers the virtual tokens too
                if lean:
                    keep = torch.unique(pos)
                    out = model(input_ids=ids, attention_mask=attn, logits_to_keep=keep)
                    word_logits = out.logits[rows, torch.searchsorted(keep, pos)]
                else:
                    word_logits = model(input_ids=ids, attention_mask=attn).logits[rows, pos]
            loss = F.cross_entropy(word_logits[:, label_ids].float(), labels)
        loss.backward()
        grads["bytes"] = max(grads["bytes"], sum(p.grad.numel() * p.grad.element_size()
                                                 for p in backbone.model.parameters() if p.grad is not None))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, grads


def weights_dtype(args):
    import torch

    return torch.bfloat16 if args.dtype == "bf16-weights" else torch.float32


def _variant_record(args, backbone, variant: str) -> dict:
    once = runs_prompt_once(backbone, VARIANTS[variant])
    flops = step_flops(backbone, args.batch_size, args.prompt_length, args.seq_len, prompt_once=once)
    return {"variant": variant, "backbone": args.backbone, "kind": backbone.kind.value, "device": args.device,
            "dtype": args.dtype, "batch_size": args.batch_size, "prompt_length": args.prompt_length,
            "seq_len": args.seq_len, "n_params": sum(p.numel() for p in backbone.model.parameters()),
            "model_tflops_per_step": flops / 1e12, "prompt_once": once,
            "one_pass_tflops_per_step": step_flops(backbone, args.batch_size, args.prompt_length, args.seq_len) / 1e12}


def worker_memory(args) -> dict:
    """One variant alone in this process: its peak extra memory over warm-up + a few steps (CPU: RSS)."""
    import torch

    torch.manual_seed(0)
    opts = VARIANTS[args.variant]
    backbone = load(args.backbone, args.device, weights_dtype(args), attn=opts.get("attn", "sdpa"))
    batches = make_batches(backbone, 4, args.batch_size, args.seq_len, args.device)
    with torch.no_grad():  # weights may be memory-mapped: page them in now, or the first step's RSS counts them
        for t in (*backbone.model.parameters(), *backbone.model.buffers()):
            t.sum()
    meter = PeakMemory(args.device)
    meter.start()
    step, grads = (ptx_step if opts["impl"] == "ptx" else peft_step)(backbone, batches, args.prompt_length, opts,
                                                                    autocast_ctx(args.device, args.dtype))
    for i in range(max(2, args.warmup + 1)):
        step(i)
    peak = meter.peak()
    return {"variant": args.variant, "peak_bytes": peak, "peak_mib": mib(peak), "memory_measure": meter.what(),
            "frozen_weight_grad_bytes": grads["bytes"]}


def worker_time(args) -> dict:
    """All variants in this one process, each with its own model copy, timed in interleaved rounds.

    Round r runs one step of every variant (in an order rotated each round), so load from other processes on
    the machine hits every variant alike; the speed ratio is the median over rounds of the per-round ratio.
    On CUDA each variant's peak memory is also measured here, alone, before the timed rounds.
    """
    import torch

    torch.manual_seed(0)
    variants = args.variant.split(",")
    ctx = autocast_ctx(args.device, args.dtype)
    steps, records = {}, {}
    for v in variants:
        opts = VARIANTS[v]
        t0 = time.perf_counter()
        backbone = load(args.backbone, args.device, weights_dtype(args), attn=opts.get("attn", "sdpa"))
        rec = records[v] = _variant_record(args, backbone, v)
        rec["load_s"] = round(time.perf_counter() - t0, 2)
        batches = make_batches(backbone, min(args.warmup + args.steps, 16), args.batch_size, args.seq_len, args.device)
        meter = PeakMemory(args.device)
        meter.start()
        step, grads = (ptx_step if opts["impl"] == "ptx" else peft_step)(backbone, batches, args.prompt_length,
                                                                        opts, ctx)
        rec["warmup_s"] = round(sum(timed_loop(step, args.warmup, args.device)[0]), 3)
        if args.device.startswith("cuda"):
            rec.update(peak_bytes=meter.peak(), peak_mib=mib(meter.peak()), memory_measure=meter.what())
        steps[v], rec["_grads"] = step, grads
        if grads.get("note"):
            rec["note"] = grads["note"]
    wall, cpu = rotated_rounds(steps, variants, args.steps, args.warmup, args.device)
    # The headline time: wall time on a GPU; on CPU, process CPU time (see common.timed_loop), wall beside it.
    on_gpu = args.device.startswith("cuda")
    times = wall if on_gpu else cpu
    for v, rec in records.items():
        sec = median(times[v])
        rec.update(step_s=sec, step_s_min=min(times[v]), examples_per_s=args.batch_size / sec,
                   wall_step_s=median(wall[v]), wall_examples_per_s=args.batch_size / median(wall[v]),
                   cpu_step_s=median(cpu[v]), times=[round(t, 4) for t in times[v]],
                   frozen_weight_grad_bytes=rec.pop("_grads")["bytes"], time_measure="wall" if on_gpu else "cpu",
                   threads=torch.get_num_threads(), achieved_tflops=rec["model_tflops_per_step"] / sec,
                   one_pass_equivalent_tflops=rec["one_pass_tflops_per_step"] / sec)
        if on_gpu:  # mfu: FLOPs this variant ran; effective_mfu: FLOPs of the one-pass step it replaces
            rec.update(mfu=rec["achieved_tflops"] / args.peak_tflops, peak_tflops=args.peak_tflops,
                       effective_mfu=rec["one_pass_equivalent_tflops"] / args.peak_tflops)
        base = variants[0]
        if v != base:  # paired: the same round's steps ran back to back
            rec["base"] = base
            rec["speed_ratio_base_over_this"] = median([a / b for a, b in zip(times[v], times[base], strict=True)])
            rec["wall_speed_ratio_base_over_this"] = median([a / b for a, b in zip(wall[v], wall[base], strict=True)])
    return {"results": [records[v] for v in variants]}


# ---- data-side ablations ----------------------------------------------------------------------------
def worker_padding(args) -> dict:
    """Length-bucketed batches vs random batches over the same examples: padding fraction and time per epoch."""
    import torch

    from ptx.data import bucketed_order, collate, encode_split
    from ptx.tasks import load_task

    torch.manual_seed(0)
    backbone = load(args.backbone, args.device, weights_dtype(args))
    spec = load_task(args.task)
    rows = encode_split(spec, backbone, "train", limit=args.limit).to_list()
    lengths = [r["length"] for r in rows]
    ctx = autocast_ctx(args.device, "bf16" if args.dtype == "bf16" else "fp32")
    orders = {"bucketed": bucketed_order(lengths, args.batch_size, random.Random(0))}
    idx = list(range(len(rows)))
    random.Random(0).shuffle(idx)
    orders["random"] = [idx[i: i + args.batch_size] for i in range(0, len(idx), args.batch_size)]
    out = {"task": args.task, "backbone": args.backbone, "examples": len(rows), "batch_size": args.batch_size,
           "prompt_length": args.prompt_length, "mean_length": sum(lengths) / len(lengths), "max_length": max(lengths)}
    for name, order in orders.items():
        batches = [{k: v.to(args.device) for k, v in collate([rows[i] for i in g], backbone.pad_id).items()}
                   for g in order]
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["input_ids"].numel() for b in batches)
        step, _ = ptx_step(backbone, batches, args.prompt_length, {}, ctx)
        timed_loop(step, 1, args.device)  # warm-up on the first batch, not counted
        wall, cpu = timed_loop(step, len(batches), args.device)
        secs = wall if args.device.startswith("cuda") else cpu
        out[name] = {"padding_fraction": 1 - real / padded, "tokens_computed": padded,
                     "padding_fraction_with_prompt": 1 - (real + len(rows) * args.prompt_length)
                     / (padded + len(rows) * args.prompt_length),
                     "epoch_s": sum(secs), "examples_per_s": len(rows) / sum(secs), "steps": len(batches),
                     "wall_epoch_s": sum(wall)}
    out["speedup"] = out["bucketed"]["examples_per_s"] / out["random"]["examples_per_s"]
    return out


def worker_cache(args) -> dict:
    """encode_split cold (tokenize and write the Arrow cache) vs warm (read it) vs no cache, in a scratch cache dir."""
    from ptx.backbones import load_backbone
    from ptx.io import cache_dir

    real = cache_dir()
    backbone = load_backbone(args.backbone)  # models stay in the real cache
    scratch = Path(tempfile.mkdtemp(prefix="ptx-bench-cache-"))
    (scratch / "models").symlink_to(real / "models", target_is_directory=True)
    os.environ["PTX_CACHE_DIR"] = str(scratch)
    try:
        from ptx.data import encode_split
        from ptx.tasks import load_task

        spec = load_task(args.task)
        encode_split(spec, backbone, "train", limit=8, use_cache=False)  # imports and file reads: not timed
        t0 = time.perf_counter()
        n = len(encode_split(spec, backbone, "train", limit=args.limit, use_cache=False))
        nocache = time.perf_counter() - t0
        t0 = time.perf_counter()
        encode_split(spec, backbone, "train", limit=args.limit)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            ds = encode_split(spec, backbone, "train", limit=args.limit)
            ds.to_list()[-1]  # the rows are really read, as iterate_batches does
            warm.append(time.perf_counter() - t0)
    finally:
        os.environ["PTX_CACHE_DIR"] = str(real)
        shutil.rmtree(scratch, ignore_errors=True)
    return {"task": args.task, "backbone": args.backbone, "rows": n, "no_cache_s": nocache, "cold_s": cold,
            "warm_s": median(warm), "speedup_warm_vs_cold": cold / median(warm)}


# ---- driver -----------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny-llama", help="ptx alias/path, or random:NAME (roberta-base, "
                   "roberta-large, t5-base, t5-large, bert-base-uncased, llama-1b) for random weights of real shape")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=48, help="text tokens per example (synthetic, no padding)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median step time is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "bf16-weights"],
                   help="bf16: fp32 weights under bf16 autocast (ptx's CUDA training path); bf16-weights: bf16 weights")
    p.add_argument("--variants", default="ptx,peft,peft-lean", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--ablation", choices=[*ABLATIONS, "padding", "cache"], help="run one ablation instead")
    p.add_argument("--task", default="drug_sentiment", help="padding/cache ablations: the task")
    p.add_argument("--limit", type=int, default=192, help="padding/cache ablations: examples")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (0: torch's default); 1 "
                   "keeps CPU-time figures honest on a shared machine")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU: H100 SXM bf16 dense peak")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", choices=["time", "memory", "padding", "cache"], help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker_argv(args, mode: str, variant: str | None = None) -> list[str]:
    keep = ["backbone", "batch_size", "prompt_length", "seq_len", "steps", "warmup", "device", "dtype", "task",
            "limit", "peak_tflops", "threads"]
    argv = [str(Path(__file__).resolve()), "--worker", mode]
    for k in keep:
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return argv + (["--variant", variant] if variant else [])


def run_steps(args, variants: list[str]) -> list[dict]:
    """Time all variants together (interleaved), then measure each one's memory alone (CPU: own process)."""
    timing = run_worker(worker_argv(args, "time", ",".join(variants)))
    if "error" in timing:
        return [{"variant": v, "error": timing["error"]} for v in variants]
    results = timing["results"]
    if not args.device.startswith("cuda"):
        for rec in results:
            mem = run_worker(worker_argv(args, "memory", rec["variant"]))
            rec.update(mem if "error" not in mem else {"memory_error": mem["error"]})
    return results


def report_steps(results: list[dict]) -> str:
    cols = ["variant", "examples_per_s", "step_s", "step_s_min", "wall_examples_per_s", "peak_mib",
            "frozen_weight_grad_bytes", "warmup_s"]
    if any("mfu" in r for r in results):
        cols += ["achieved_tflops", "mfu", "effective_mfu"]
    lines = [table([r for r in results if "error" not in r], cols)]
    by = {r["variant"]: r for r in results if "error" not in r}
    for name, o in by.items():
        base = by.get(o.get("base"))
        if base is None:
            continue
        mem = (f"{base['peak_bytes'] / o['peak_bytes']:.2f}x" if o.get("peak_bytes") and base.get("peak_bytes")
               else "n/a")
        lines.append(f"{base['variant']} vs {name}: speed {o['speed_ratio_base_over_this']:.2f}x ({o['time_measure']} "
                     f"time; wall {o['wall_speed_ratio_base_over_this']:.2f}x; medians of paired rounds), peak "
                     f"memory {mem} of {name}'s")
    for r in results:
        if "error" in r:
            lines.append(f"{r.get('variant', '?')}: ERROR {r['error']}")
        if r.get("note"):
            lines.append(f"note: {r['variant']}: {r['note']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.worker:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        if args.threads and not args.device.startswith("cuda"):
            import torch

            torch.set_num_threads(args.threads)
        fn = {"time": worker_time, "memory": worker_memory, "padding": worker_padding, "cache": worker_cache}
        emit(fn[args.worker](args))
        return {}
    info = {"machine": machine(), "command": command_line(), "args": vars(args)}
    if args.ablation in ("padding", "cache"):
        res = run_worker(worker_argv(args, args.ablation))
        info["results"] = res
        print(f"{args.ablation} ablation ({args.backbone}, {args.task}):")
        for k, v in res.items():
            print(f"  {k}: {v}")
    else:
        variants = ABLATIONS[args.ablation] if args.ablation else args.variants.split(",")
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"--variants: unknown variant {unknown}; expected some of {', '.join(VARIANTS)}")
        results = info["results"] = run_steps(args, variants)
        measure = next((r["memory_measure"] for r in results if "memory_measure" in r), "?")
        print(f"{args.backbone} on {args.device} ({args.dtype}), batch {args.batch_size}, prompt "
              f"{args.prompt_length}, text {args.seq_len}, {args.steps} timed rounds; memory = {measure}")
        print(report_steps(results))
    if args.json:
        write_json(args.json, info)
    return info


if __name__ == "__main__":
    main()
