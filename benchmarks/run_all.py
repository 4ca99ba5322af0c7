"""Run every CPU benchmark with modest sizes and print a summary (JSON of each run under --out).

    .venv/bin/python benchmarks/run_all.py [--out DIR] [--only NAME,...] [--list]

Each benchmark is its own command (see benchmarks/README.md); this only strings them together. The engineers'
other benchmarks (bench_matrix.py, bench_on.py) run too when they exist. Nothing here is a test: no figure is
asserted, every one is printed and written down.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEP = "bench_train_step.py"
SHAPE = ["--batch-size", "8", "--prompt-length", "50", "--seq-len", "48", "--steps", "5"]
SMOL = ["--backbone", "smollm2-135m", "--batch-size", "4", "--prompt-length", "50", "--seq-len", "48", "--steps", "5"]
MINILM = ["--backbone", "minilm-l6", *SHAPE]

# name -> (script, arguments); ours take --json PATH, the other engineers' print their figures (tail kept)
BENCHMARKS = {
    "step-causal-smollm2": (STEP, [*SMOL, "--variants", "ptx,ptx-onepass,peft,peft-lean"]),
    "step-masked-minilm": (STEP, MINILM),
    "step-seq2seq-tiny-t5": (STEP, ["--backbone", "tiny-t5", *SHAPE]),
    "ablation-head-minilm": (STEP, [*MINILM, "--ablation", "head"]),
    "ablation-attn-minilm": (STEP, [*MINILM, "--ablation", "attn"]),
    "ablation-grads-minilm": (STEP, [*MINILM, "--ablation", "grads"]),
    "ablation-compile-smollm2": (STEP, ["--backbone", "smollm2-135m", "--batch-size", "4", "--prompt-length", "20",
                                        "--seq-len", "48", "--steps", "5", "--warmup", "2", "--ablation", "compile"]),
    "ablation-padding-minilm": (STEP, ["--backbone", "minilm-l6", "--ablation", "padding", "--task", "drug_sentiment",
                                       "--limit", "256", "--batch-size", "16", "--prompt-length", "20"]),
    "ablation-cache-smollm2": (STEP, ["--backbone", "smollm2-135m", "--ablation", "cache", "--task",
                                      "tweet_sentiment", "--limit", "2000"]),
    "tune-overhead": ("bench_tune_overhead.py", []),
    "transfer-matrix": ("bench_matrix.py", []),  # another engineer's; run when present, with its defaults
    "on-indicator": ("bench_on.py", []),  # another engineer's; run when present, with its defaults
}
OURS = {STEP, "bench_tune_overhead.py"}


def summarise(name: str, data: dict) -> list[str]:
    """A few lines per benchmark from its JSON."""
    res = data.get("results")
    if isinstance(res, list):  # train-step runs: ratios against the first variant
        lines = []
        for r in res:
            if "error" in r:
                lines.append(f"{r.get('variant')}: ERROR {r['error'][:200]}")
                continue
            line = f"{r['variant']}: {r['examples_per_s']:.3g} ex/s ({r.get('time_measure')} time), peak {r.get('peak_mib')} MiB"
            if r.get("base"):
                line += f"; {r['base']} is {r['speed_ratio_base_over_this']:.2f}x faster"
            lines.append(line)
        return lines
    if isinstance(res, dict) and "bucketed" in res:
        b, r = res["bucketed"], res["random"]
        return [f"padding fraction bucketed {b['padding_fraction']:.1%} vs random {r['padding_fraction']:.1%}; "
                f"epoch {b['epoch_s']:.1f}s vs {r['epoch_s']:.1f}s ({res['speedup']:.2f}x)"]
    if isinstance(res, dict) and "cold_s" in res:
        return [f"encode_split {res['rows']} rows: cold {res['cold_s']:.2f}s, warm {res['warm_s']:.3f}s "
                f"({res['speedup_warm_vs_cold']:.0f}x), no cache {res['no_cache_s']:.2f}s"]
    if isinstance(res, dict) and {"trivial", "packing", "ptx"} & set(res):
        lines = []
        if "trivial" in res:
            t = res["trivial"]
            lines.append(f"trivial trials/min: tune {t['tune_trials_per_min']:.1f}, tune+reuse_actors "
                         f"{t['tune_reuse_trials_per_min']:.1f}, plain loop {t['loop_trials_per_min']:.1f}")
        if "packing" in res:
            lines.append(f"packing 4 x gpu 0.25 (logical GPU): max concurrent {res['packing']['max_concurrent_observed']}")
        if "ptx" in res:
            x = res["ptx"]
            lines.append(f"ptx trainable: direct {x['direct_s']:.1f}s, tune {x['tune_s']:.1f}s, tune+reuse "
                         f"{x['tune_reuse_s']:.1f}s for {x['trials']} runs")
        return lines
    return [json.dumps(res, default=str)[:600]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "ptx-bench"), help="directory for the JSON")
    p.add_argument("--only", help="comma list of benchmark names")
    p.add_argument("--list", action="store_true", help="print the benchmark names and commands, run nothing")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"--only: unknown {unknown}; expected some of {', '.join(BENCHMARKS)}")
    out = Path(args.out)
    summary, failed = {}, []
    for name in names:
        script, extra = BENCHMARKS[name]
        ours = script in OURS
        cmd = [sys.executable, str(HERE / script), *extra, *(["--json", str(out / f"{name}.json")] if ours else [])]
        if args.list:
            print(f"{name}: {' '.join(cmd[1:])}")
            continue
        if not (HERE / script).exists():
            summary[name] = [f"skipped: {script} not present"]
            continue
        out.mkdir(parents=True, exist_ok=True)
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=None if ours else subprocess.PIPE, text=True)
        took = time.perf_counter() - t0
        if not ours:
            print(proc.stdout, end="", flush=True)
            (out / f"{name}.log").write_text(proc.stdout or "")
        if proc.returncode != 0 or (ours and not (out / f"{name}.json").exists()):
            failed.append(name)
            summary[name] = [f"FAILED (exit {proc.returncode}) after {took:.0f}s"]
            continue
        tail = (proc.stdout or "").strip().splitlines()[-3:]
        summary[name] = [f"({took:.0f}s)"] + (summarise(name, json.loads((out / f"{name}.json").read_text()))
                                              if ours else [t[:300] for t in tail])
    if args.list:
        return 0
    print(f"(JSON and logs in {out})")
    print("\n# summary")
    for name, lines in summary.items():
        print(f"{name} {lines[0]}")
        for line in lines[1:]:
            print(f"    {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
