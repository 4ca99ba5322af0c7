"""Benchmark: activation capture throughput and pairwise ON of a prompt bank.

1. Capture: prompts/s of `capture_activations` (paper probe) on a backbone (default smollm2-135m).
2. ON: all pairwise overlaps of a synthetic bank (default 1,000 prompts x 12 layers x 3,072 neurons, the
   roberta-base shape) as matrix ops, vs a naive per-pair Python loop timed on a subset and extrapolated.

    PTX_CACHE_DIR=/tmp/c .venv/bin/python benchmarks/bench_on.py [--backbone tiny-llama] [--skip-capture]
"""

import argparse
import json
import math
import time

import torch


def bench_capture(backbone_name: str, n_prompts: int, prompt_length: int, per_pass: int, repeats: int) -> dict:
    from ptx.activations import capture_activations
    from ptx.backbones import load_backbone

    t0 = time.perf_counter()
    bb = load_backbone(backbone_name)
    load_s = time.perf_counter() - t0
    emb = bb.input_embeddings().detach()
    gen = torch.Generator().manual_seed(0)
    prompts = emb[torch.randint(0, min(5000, emb.shape[0]), (n_prompts, prompt_length), generator=gen)].float()
    capture_activations(bb, prompts[:per_pass], prompts_per_pass=per_pass)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        masks = capture_activations(bb, prompts, prompts_per_pass=per_pass)
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"backbone": backbone_name, "n_layers": bb.n_layers, "d_ff": bb.d_ff, "prompts": n_prompts,
            "prompt_length": prompt_length, "prompts_per_pass": per_pass, "load_s": round(load_s, 2),
            "capture_s": round(best, 3), "prompts_per_s": round(n_prompts / best, 2),
            "active_fraction": round(masks.float().mean().item(), 4)}


def naive_on(masks: torch.Tensor, pairs: list) -> list:
    """The baseline: one pair at a time in Python (cosine of the two flattened masks)."""
    flat = masks.reshape(masks.shape[0], -1)
    out = []
    for i, j in pairs:
        a, b = flat[i], flat[j]
        inter = (a & b).sum().item()
        na, nb = a.sum().item(), b.sum().item()
        out.append(inter / math.sqrt(na * nb) if na and nb else 0.0)
    return out


def bench_on(n_prompts: int, n_layers: int, d_ff: int, density: float, naive_pairs: int, window: int) -> dict:
    from ptx.activations import overlap_counts, overlap_from_counts, overlap_matrices

    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(n_prompts, n_layers, d_ff, generator=gen) < density
    t = time.perf_counter()
    inter, counts = overlap_counts(masks)
    on = overlap_from_counts(inter.sum(0), counts.sum(0))
    on_s = time.perf_counter() - t
    t = time.perf_counter()
    full = overlap_matrices(masks, k=window)
    full_s = time.perf_counter() - t
    pairs = [(int(i), int(j)) for i, j in torch.randint(0, n_prompts, (naive_pairs, 2), generator=gen)]
    t = time.perf_counter()
    ref = naive_on(masks, pairs)
    naive_s = time.perf_counter() - t
    err = max(abs(on[i, j].item() - r) for (i, j), r in zip(pairs, ref, strict=True))
    n_all = n_prompts * (n_prompts - 1) // 2  # unique pairs the loop would need
    naive_all = naive_s / naive_pairs * n_all
    return {"prompts": n_prompts, "n_layers": n_layers, "d_ff": d_ff, "density": density,
            "on_all_layers_s": round(on_s, 3), "on_full_set_s": round(full_s, 3), "matrices": len(full),
            "naive_pairs_timed": naive_pairs, "naive_s_per_pair": naive_s / naive_pairs,
            "naive_extrapolated_s": round(naive_all, 1), "speedup_vs_naive": round(naive_all / on_s, 1),
            "speedup_full_set_vs_naive": round(naive_all / full_s, 1), "max_abs_diff": err}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--capture-prompts", type=int, default=32)
    ap.add_argument("--prompt-length", type=int, default=100)
    ap.add_argument("--per-pass", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-capture", action="store_true")
    ap.add_argument("--bank", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("--density", type=float, default=0.5, help="fraction of active neurons in the synthetic masks")
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--naive-pairs", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"torch_threads": torch.get_num_threads()}
    if not args.skip_capture:
        result["capture"] = bench_capture(args.backbone, args.capture_prompts, args.prompt_length, args.per_pass,
                                          args.repeats)
        c = result["capture"]
        print(f"capture {c['backbone']}: {c['prompts_per_s']} prompts/s ({c['prompts']} prompts x {c['prompt_length']} "
              f"tokens, {c['n_layers']}x{c['d_ff']} neurons, {c['prompts_per_pass']} per pass)")
    result["on"] = bench_on(args.bank, args.layers, args.d_ff, args.density, args.naive_pairs, args.window)
    o = result["on"]
    print(f"ON {o['prompts']} prompts x {o['n_layers']}x{o['d_ff']}: all-layer matrix {o['on_all_layers_s']} s; "
          f"all {o['matrices']} matrices (per layer, windows, Jaccard) {o['on_full_set_s']} s")
    print(f"naive per-pair loop: {o['naive_s_per_pair'] * 1e6:.0f} us/pair -> {o['naive_extrapolated_s']} s for all "
          f"pairs; speed-up x{o['speedup_vs_naive']} (full set x{o['speedup_full_set_vs_naive']}); "
          f"max |diff| {o['max_abs_diff']:.1e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
