"""Transfer-matrix evaluation: ptx (backbone loaded once, target split tokenized once, P prompts per forward pass)
against (a) one process per (prompt, target) pair that reloads the backbone (the paper code's way) and (b) one pair
at a time in one process (backbone loaded once, one prompt per pass). Same machine, same prompts, same data.

    .venv/bin/python benchmarks/bench_matrix.py --backbone smollm2-135m --limit 64

Tokenized splits are warmed into the Arrow cache first, and every method reads them from there, so (a) is a
lower bound on the paper code's cost (it also re-tokenizes per pair). Wall and CPU seconds are both printed:
on a shared machine wall time includes waiting for the CPU.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["tweet_sentiment", "drug_sentiment", "drug_condition", "bbc_topic"]

# (a): the whole job of one pair, in a fresh interpreter: load the backbone, one prompt, one target
PAIR_SCRIPT = """
import json, sys
from ptx.backbones import load_backbone
from ptx.data import encode_split
from ptx.evaluate import score_prompts
from ptx.prompt import load_prompt
from ptx.tasks import load_task
name, prompt_dir, task, split, limit, batch = sys.argv[1:7]
bb = load_backbone(name)
prompt = load_prompt(prompt_dir, backbone=bb).prompt
spec = load_task(task)
score = score_prompts(bb, prompt, spec, encode_split(spec, bb, split, limit=int(limit)), int(batch))[0]
print(json.dumps({"score": score}))
"""


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_ptx(args, names, bank, tasks) -> dict:
    from ptx.backbones import load_backbone
    from ptx.transfer import transfer_matrix

    bb = load_backbone(args.backbone)
    table = transfer_matrix(bb, bank, tasks, splits=(args.split,), limits=args.limit, batch_size=args.batch_size,
                            prompts_per_pass=args.prompts_per_pass, random_baseline=False).to_pandas()
    return {(r.source_prompt_run, r.target_task): r.value for r in table.itertuples()}


def run_one_process(args, names, bank, tasks) -> dict:
    from ptx.backbones import load_backbone
    from ptx.data import encode_split
    from ptx.evaluate import score_prompts
    from ptx.tasks import load_task

    bb = load_backbone(args.backbone)
    out = {}
    for task in tasks:
        spec = load_task(task)
        for name in names:  # the naive loop: re-read the split and score one prompt per pass
            data = encode_split(spec, bb, args.split, limit=args.limit)
            out[(name, task)] = score_prompts(bb, bank[name][0], spec, data, args.batch_size)[0]
    return out


def run_subprocesses(args, names, dirs, tasks) -> dict:
    out = {}
    for task in tasks:
        for name in names:
            res = subprocess.run([sys.executable, "-c", PAIR_SCRIPT, args.backbone, str(dirs[name]), task, args.split,
                                  str(args.limit), str(args.batch_size)], capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise SystemExit(f"pair ({name}, {task}) failed:\n{res.stderr[-2000:]}")
            out[(name, task)] = json.loads(res.stdout.strip().splitlines()[-1])["score"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--limit", type=int, default=64, help="examples per target split")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--n-prompts", type=int, default=2, help="random prompts in the bank")
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prompts-per-pass", type=int, default=8)
    ap.add_argument("--skip-subprocess", action="store_true", help="skip (a), the slowest")
    args = ap.parse_args()
    os.environ.setdefault("PTX_CACHE_DIR", str(Path(".ptx-cache").resolve()))

    import torch

    from ptx.backbones import load_backbone
    from ptx.data import encode_split
    from ptx.errors import PtxError
    from ptx.prompt import backbone_meta, init_prompt, save_prompt
    from ptx.tasks import load_task

    t0 = time.perf_counter()
    bb = load_backbone(args.backbone)  # the first use of a real backbone may convert it once (not timed below)
    tasks = []
    for task in args.tasks:
        spec = load_task(task)
        try:
            encode_split(spec, bb, args.split, limit=args.limit)  # warm the Arrow cache every method reads
            tasks.append(task)
        except PtxError as exc:
            print(f"skipping {task}: {exc}")
    bank, dirs, tmp = {}, {}, Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    for i in range(args.n_prompts):
        source = tasks[i % len(tasks)]
        prompt = init_prompt(bb, args.prompt_length, "vocab", seed=i)
        meta = {"backbone": backbone_meta(bb), "task": {"name": source}, "insertion": bb.insertion.value}
        name = f"p{i}-{source}"
        bank[name] = (prompt, meta)
        dirs[name] = save_prompt(tmp / name, prompt, meta)
    names = list(bank)
    del bb
    print(f"setup {time.perf_counter() - t0:.1f} s; backbone {args.backbone}, {len(names)} prompts x {len(tasks)} "
          f"targets = {len(names) * len(tasks)} pairs, {args.limit} {args.split} examples each, prompt length "
          f"{args.prompt_length}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    methods = [("ptx matrix (load once, P prompts/pass)", run_ptx, bank),
               ("(b) one process, one pair at a time", run_one_process, bank)]
    if not args.skip_subprocess:
        methods.append(("(a) one process per pair (reload)", run_subprocesses, dirs))
    results = {}
    for label, fn, arg in methods:
        w0, c0 = time.perf_counter(), _cpu()
        scores = fn(args, names, arg, tasks)
        results[label] = (time.perf_counter() - w0, _cpu() - c0, scores)
        print(f"  {label:<42} wall {results[label][0]:8.1f} s   cpu {results[label][1]:8.1f} s", flush=True)

    ptx_wall, ptx_cpu, ptx_scores = results[methods[0][0]]
    print("\nratios (ptx / other; below 1 means ptx is faster)")
    for label, (wall, cpu, scores) in list(results.items())[1:]:
        diff = max(abs(scores[k] - ptx_scores[k]) for k in ptx_scores)
        print(f"  ptx / {label:<38} wall {ptx_wall / wall:5.2f}   cpu {ptx_cpu / cpu:5.2f}   "
              f"max |score diff| {diff:.2e} -> {'agree' if diff < 1e-6 else 'DISAGREE'}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
