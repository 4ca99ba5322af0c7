"""The transfer stage's work plan: (source chunk, target) Ray tasks against the baseline of one task per target
(ptx before 2026-12-07), the same stage code, bank, data and local Ray, in one process.

    .venv/bin/python benchmarks/bench_transfer_units.py --backbone smollm2-135m --repeats 2

The bank is one briefly trained prompt per task (the demo's four tasks), scored with the demo's settings (dev 48,
test 80 examples by default, 48 tokens, 4 prompts a pass, batch 16) plus the random prompt. A warm-up run first loads the
backbone into both Ray workers and tokenizes every split, so the timed runs differ only in the plan; the two plans
alternate (A B A B) so that a change of load on a shared machine falls on both. For each run it prints the
stage's wall time, the slot utilisation (the Ray tasks' own seconds / (wall x slots): 1.0 means both cores
scored prompts from the first second to the last) and how many times the progress line moved.
"""

import argparse
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

from common import machine

TASKS = ("tweet_sentiment", "drug_sentiment", "bbc_topic", "drug_condition")


def one_task_per_target(targets, sources, random_baseline, slots, prompts_per_pass):
    """The baseline plan: every target's whole bank (and the random prompt) in one Ray task."""
    return [(t, list(sources), bool(random_baseline)) for t in targets]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="training steps of each bank prompt")
    ap.add_argument("--dev-limit", type=int, default=48, help="dev examples a target (the demo's 48)")
    ap.add_argument("--test-limit", type=int, default=80, help="test examples a target (the demo's 80)")
    args = ap.parse_args()

    from ptx import progress, sweep, track
    from ptx.config import DataLimits, Resources, StudySpec, TransferStage
    from ptx.prompt_runs import PromptRequest, run_prompt
    from ptx.stages import transfer as stage
    from ptx.train import TrainSettings

    workdir = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    spec = StudySpec(name="bench-transfer", backbones=(args.backbone,), tasks=TASKS, seeds=(0,), prompt_length=20,
                     data=DataLimits(train_limit=64, dev_limit=args.dev_limit, test_limit=args.test_limit,
                                     max_length=48),
                     transfer=TransferStage(prompts_per_pass=4, batch_size=16, resources=Resources(cpu=1)),
                     workdir=str(workdir))
    tracker = track.MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}", spec.name, workdir=workdir)
    settings = TrainSettings(steps=args.steps, eval_every=args.steps, batch_size=8, lr=0.01, seed=0)
    for task in TASKS:  # the bank: one prompt per task, the train stage's code path
        run_prompt(PromptRequest(task=task, backbone=args.backbone, prompt_length=20, init="random", train_limit=64,
                                 dev_limit=16, max_length=48, settings=settings), workdir, tracker)
    sweep.connect(num_cpus=2)
    planned = stage.plan_units

    def run(plan) -> dict:
        for kind in (track.KIND_TRANSFER, "transfer_unit"):  # a fresh matrix each time: nothing reused
            for r in tracker.find_runs({"ptx.kind": kind}):
                tracker.client.delete_run(r.run_id)
        stage.plan_units = plan
        shown = io.StringIO()
        t0 = time.perf_counter()
        with progress.watching(progress.Display(shown, interactive=False, interval=0)), \
                progress.stage("transfer", 0, "pairs"):
            stage.run_transfer_stage(spec, tracker, workdir)
        wall = time.perf_counter() - t0
        busy = sum(r.metrics["seconds"] for r in tracker.find_runs({"ptx.kind": "transfer_unit"}))
        moves = len({m for m in re.findall(r"^\[transfer\] (\d+)/\d+ pairs", shown.getvalue(), re.M)}) - 1
        return {"wall_s": round(wall, 1), "task_s": round(busy, 1), "utilisation": round(busy / (2 * wall), 3),
                "progress_moves": moves}

    try:
        run(planned)  # warm-up: workers load the backbone, splits are tokenized into the cache
        rows = {"one task per target (baseline)": [], "(source chunk, target) units": []}
        for _ in range(args.repeats):
            rows["one task per target (baseline)"].append(run(one_task_per_target))
            rows["(source chunk, target) units"].append(run(planned))
    finally:
        stage.plan_units = planned
        sweep.shutdown()
    mean = {k: {f: sum(r[f] for r in v) / len(v) for f in ("wall_s", "utilisation")} for k, v in rows.items()}
    print(json.dumps({"machine": machine(), "backbone": args.backbone, "runs": rows, "mean": mean,
                      "wall_ratio_units_over_baseline": round(mean[list(rows)[1]]["wall_s"]
                                                              / mean[list(rows)[0]]["wall_s"], 3),
                      "load_average_1m_after": round(os.getloadavg()[0], 1)}, indent=1))


if __name__ == "__main__":
    main()
