"""Ray Tune overhead: trivial trials vs a plain loop, GPU-fraction packing, and ptx's real trainable vs run_prompt.

Parts (each runs in this one process, Ray started once with --cpus CPUs and one GPU resource):
  trivial  N trials of a trainable that reports R times (sleeping --work seconds per report), as Tune trials on
           a local Ray (1 CPU each; with Tune's default reuse_actors=False and with True) and as plain calls in
           a loop: trials per minute for each. Overhead per trial = (Tune wall - work / CPUs) x CPUs / N.
  packing  4 trials requesting {gpu: 0.25} each: on a CPU-only machine the GPU is *logical* (declared with
           ray.init(num_gpus=1), nothing runs on it); the trials record their start/end times and the maximum
           number running at once is counted from those timestamps.
  ptx      ptx's real Tune trainable (sweep.build_tuner -> sweep.prompt_trainable, MLflow logging, checkpoints)
           vs stages.run_prompt called directly, on tiny-llama with the same requests and steps, one at a time
           (max_concurrent=1), so the difference is the per-trial overhead of Ray Tune; then again with
           TuneConfig(reuse_actors=True) (not sweep.build_tuner's setting today: set on the built Tuner here).
"""

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, machine, table, write_json


def trivial_body(config: dict, report) -> None:
    """The trivial trainable: R reports, optional sleep per report."""
    for i in range(config["reports"]):
        if config["work"]:
            time.sleep(config["work"])
        report({"score": config["x"] * (i + 1), "i": i})


def trivial_trainable(config: dict) -> None:
    from ray import tune

    trivial_body(config, tune.report)


def packing_trainable(config: dict) -> None:
    import ray
    from ray import tune

    start = time.time()
    for i in range(config["reports"]):
        time.sleep(config["hold"] / config["reports"])
        tune.report({"i": i, "start": start, "now": time.time(), "gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
                     "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")})


def _tuner(trainable, space: dict, resources: dict, storage: str, name: str, reuse_actors: bool = False):
    from ray import tune

    return tune.Tuner(tune.with_resources(trainable, resources), param_space=space,
                      tune_config=tune.TuneConfig(reuse_actors=reuse_actors),
                      run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))


def part_trivial(args, storage: str) -> dict:
    from ray import tune

    space = {"x": tune.grid_search(list(range(args.trials))), "reports": args.reports, "work": args.work}
    ideal = args.trials * args.reports * args.work / args.cpus  # the work alone, spread over the CPUs
    out = {"trials": args.trials, "reports_per_trial": args.reports, "work_s_per_report": args.work,
           "concurrency": args.cpus}
    for label, reuse in (("tune", False), ("tune_reuse", True)):
        t0 = time.perf_counter()
        grid = _tuner(trivial_trainable, space, {"cpu": 1}, storage, f"trivial-{label}", reuse).fit()
        took = out[f"{label}_s"] = time.perf_counter() - t0
        assert all(r.metrics and r.metrics["i"] == args.reports - 1 for r in grid), "a trivial trial did not finish"
        out[f"{label}_trials_per_min"] = 60 * args.trials / took
        out[f"{label}_overhead_s_per_trial"] = (took - ideal) * args.cpus / args.trials
    t0 = time.perf_counter()
    seen = []
    for x in range(args.trials):
        trivial_body({"x": x, "reports": args.reports, "work": args.work}, seen.append)
    out["loop_s"] = time.perf_counter() - t0
    assert len(seen) == args.trials * args.reports
    out["loop_trials_per_min"] = 60 * args.trials / out["loop_s"]
    return out


def part_packing(args, storage: str) -> dict:
    from ray import tune

    space = {"k": tune.grid_search(list(range(4))), "reports": 4, "hold": args.hold}
    t0 = time.perf_counter()
    grid = _tuner(packing_trainable, space, {"cpu": args.cpus / 4, "gpu": 0.25}, storage, "packing").fit()
    wall = time.perf_counter() - t0
    spans = [(r.metrics["start"], r.metrics["now"]) for r in grid]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda t: (t[0], t[1]))
    running = best = 0
    for _, delta in events:
        running += delta
        best = max(best, running)
    return {"trials": 4, "gpu_per_trial": 0.25, "gpu": "logical (ray.init(num_gpus=1) on a CPU-only machine)",
            "hold_s": args.hold, "wall_s": wall, "max_concurrent_observed": best,
            "gpu_ids_seen": sorted({r.metrics["gpu_ids"] for r in grid}),
            "cuda_visible_devices_seen": sorted({r.metrics["cuda_visible"] for r in grid})}


def part_ptx(args, root: Path) -> dict:
    from dataclasses import replace

    from ptx import sweep, track
    from ptx.prompt_runs import PromptRequest, run_prompt
    from ptx.train import TrainSettings

    settings = TrainSettings(steps=args.ptx_steps, eval_every=max(1, args.ptx_steps // 2), batch_size=8, lr=0.05)
    reqs = [PromptRequest(task="tweet_sentiment", backbone="tiny-llama", prompt_length=8, train_limit=64,
                          dev_limit=32, settings=replace(settings, seed=s)) for s in range(args.ptx_trials)]
    import torch

    # a Tune trial with 1 CPU runs with OMP_NUM_THREADS=1; the direct calls get the same, or on a loaded machine
    # two spinning threads per tiny op would make the direct side look slow for reasons that are not Ray's
    torch.set_num_threads(1)
    run_prompt(reqs[0], root / "warm")  # build the model cache and the tokenized splits once, untimed
    out = {"backbone": "tiny-llama", "trials": len(reqs), "steps": args.ptx_steps, "torch_threads_direct": 1}

    work = root / "direct"
    tracker = track.MlflowTracker(f"sqlite:///{work}/mlflow.db", "bench", workdir=work)
    parent = tracker.start_run("direct", {"ptx.kind": "sweep"})
    t0 = time.perf_counter()
    inner = [run_prompt(r, work, tracker=tracker, parent_run_id=parent).seconds for r in reqs]
    out["direct_s"] = time.perf_counter() - t0
    out["direct_train_s"] = sum(inner)  # train_prompt's own time (the rest is loading and MLflow)

    for label, reuse in (("tune", False), ("tune_reuse", True)):
        work = root / label
        uri = f"sqlite:///{work}/mlflow.db"
        tracker = track.MlflowTracker(uri, "bench", workdir=work)
        parent = tracker.start_run(label, {"ptx.kind": "sweep"})
        tuner = sweep.build_tuner(reqs, f"ptx-{label}", work, uri, "bench", parent, str(work / "ray_results"),
                                  max_concurrent=1)
        if reuse:  # what TuneConfig(reuse_actors=True) in sweep.build_tuner would do (Tuner's private field)
            internal = tuner._local_tuner
            internal._tune_config = replace(internal._tune_config, reuse_actors=True)
        t0 = time.perf_counter()
        grid = tuner.fit()
        out[f"{label}_s"] = time.perf_counter() - t0
        out[f"{label}_errors"] = sum(r.error is not None for r in grid)
        out[f"{label}_trial_s"] = [round(r.metrics.get("time_total_s", float("nan")), 2) for r in grid]
        out[f"{label}_overhead_s_per_trial"] = (out[f"{label}_s"] - out["direct_s"]) / len(reqs)
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="trivial,packing,ptx", help="comma list of trivial, packing, ptx")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--reports", type=int, default=5)
    p.add_argument("--work", type=float, default=0.1, help="seconds of sleep per report in the trivial trainable")
    p.add_argument("--hold", type=float, default=4.0, help="seconds each packing trial runs")
    p.add_argument("--ptx-trials", type=int, default=3)
    p.add_argument("--ptx-steps", type=int, default=20)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    parts = args.parts.split(",")
    import ray

    info = {"machine": machine(), "command": command_line(), "args": vars(args), "results": {}}
    root = Path(tempfile.mkdtemp(prefix="ptx-bench-tune-"))
    os.environ.setdefault("PTX_CACHE_DIR", str(root / "cache"))
    env = {k: os.environ[k] for k in ("PTX_CACHE_DIR",) if k in os.environ}
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": env})
    info["results"]["ray_init_s"] = time.perf_counter() - t0
    try:
        if "trivial" in parts:
            r = info["results"]["trivial"] = part_trivial(args, str(root / "ray"))
            print(f"trivial: {r['trials']} trials x {r['reports_per_trial']} reports of {r['work_s_per_report']}s "
                  f"work on {r['concurrency']} CPUs (1 CPU per trial)")
            print(table([{"how": "ray tune", "seconds": r["tune_s"], "trials_per_min": r["tune_trials_per_min"],
                          "overhead_s_per_trial": r["tune_overhead_s_per_trial"]},
                         {"how": "ray tune, reuse_actors", "seconds": r["tune_reuse_s"],
                          "trials_per_min": r["tune_reuse_trials_per_min"],
                          "overhead_s_per_trial": r["tune_reuse_overhead_s_per_trial"]},
                         {"how": "plain loop (1 process)", "seconds": r["loop_s"],
                          "trials_per_min": r["loop_trials_per_min"]}],
                        ["how", "seconds", "trials_per_min", "overhead_s_per_trial"]))
        if "packing" in parts:
            r = info["results"]["packing"] = part_packing(args, str(root / "ray"))
            print(f"packing: 4 trials x gpu 0.25 on one {r['gpu']}: max concurrent {r['max_concurrent_observed']}, "
                  f"wall {r['wall_s']:.1f}s for {r['hold_s']}s trials; ray.get_gpu_ids {r['gpu_ids_seen']}")
        if "ptx" in parts:
            r = info["results"]["ptx"] = part_ptx(args, root)
            print(f"ptx trainable vs run_prompt ({r['trials']} tiny-llama trials, {r['steps']} steps, one at a time): "
                  f"direct {r['direct_s']:.1f}s (train_prompt itself {r['direct_train_s']:.1f}s); tune "
                  f"{r['tune_s']:.1f}s ({r['tune_overhead_s_per_trial']:.1f}s overhead per trial, trials "
                  f"{r['tune_trial_s']}); tune with reuse_actors {r['tune_reuse_s']:.1f}s "
                  f"({r['tune_reuse_overhead_s_per_trial']:.1f}s per trial, trials {r['tune_reuse_trial_s']}); errors "
                  f"{r['tune_errors'] + r['tune_reuse_errors']}")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        write_json(args.json, info)
    return info


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
