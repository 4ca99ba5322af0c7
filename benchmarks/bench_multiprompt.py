"""Many prompts, one backbone: K prompts trained in one stacked pass vs the same K one at a time (ptx, PEFT).

Variants, all on the same frozen backbone, per-prompt batch --batch-size (the paper's 16), prompt --prompt-length
(the paper's 100), synthetic text of --seq-len tokens (bench_train_step.make_batches), AdamW per prompt:
- grouped:   train_group's step: one batch per member through `ptx.train_group.group_backward` (the members in
             backbone passes of --members-per-pass, default train_group's rule: all on a GPU, one at a time on CPU;
             each pass's mean losses summed, one backward per pass), then K AdamW steps.
- ptx:       train_prompt's step for one prompt (bench_train_step.ptx_step); K prompts one after another run K of
             these, so their aggregate examples/s is one run's examples/s.
- peft:      the PEFT user's step for one prompt (bench_train_step.peft_step), likewise.

Time: rounds of one grouped step, one ptx step and one PEFT step back to back (the order rotated each round), so
load from other processes hits every variant alike; a round's ratio is K x t(ptx) / t(grouped); the reported
ratio is the median over rounds. On CPU the time is process CPU time with one torch thread (see common.timed_loop).
Memory: each variant alone in a fresh process (CPU: peak RSS growth; CUDA: max_memory_allocated growth), the
grouped step against one ptx run's step; the figure is the median of --repeats fresh processes. On CPU the peak RSS
is an allocator high-water mark, not the tensors' peak: glibc malloc serves freed blocks again without returning
them to the system and raises its mmap threshold (up to 32 MiB) after large frees, so later activation-sized
tensors come from the heap and stay resident; how much does depends on the order of frees, which is why one process
is not a robust figure. `--allocator fixed` pins the threshold (MALLOC_MMAP_THRESHOLD_=64 KiB): every tensor above
it is its own mapping, unmapped when freed, so the RSS peak is close to the live tensors' peak. Beside each peak: the
memory model's prediction (ptx.memory.predict, the working memory above the loaded weights) and their ratio.
`--memory-only` skips the timing. MFU (CUDA): model FLOPs (bench_train_step.step_flops) per second / peak.

The last line: `multi-prompt K=<K>: <ratio>x examples/s vs one at a time, peak memory <ratio>x`.
"""

import argparse
import sys
from pathlib import Path

from bench_train_step import (
    VARIANTS,
    autocast_ctx,
    init_prompt,
    label_word_ids,
    load,
    make_batches,
    peft_step,
    ptx_step,
    runs_prompt_once,
    step_flops,
)
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


def grouped_step(backbone, k: int, batch_size: int, seq_len: int, n_tokens: int, n_batches: int, device: str, ctx,
                 per_pass: int | None = None):
    """train_group's inner step over K members; returns step(i) -> the members' losses."""
    import torch

    from ptx.prompt import SoftPrompt
    from ptx.train_group import group_backward, members_per_pass

    prompts, opts, scheds, data = [], [], [], []
    for m in range(k):
        g = torch.Generator().manual_seed(m)
        init = init_prompt(backbone, n_tokens) + 0.01 * torch.randn(n_tokens, backbone.d_model, generator=g)
        prompt = SoftPrompt(init).to(backbone.device)
        opt = torch.optim.AdamW([prompt.weight], lr=1e-3)
        prompts.append(prompt)
        opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
        data.append(make_batches(backbone, n_batches, batch_size, seq_len, device, seed=m))  # own data per member
    label_ids = label_word_ids(backbone)
    per_pass = per_pass or members_per_pass(backbone, k)

    def step(i):
        batches = [d[i % len(d)] for d in data]
        losses = group_backward(backbone, [(p.weight, b, label_ids) for p, b in zip(prompts, batches, strict=True)],
                                per_pass, ctx())
        for opt, sched in zip(opts, scheds, strict=True):
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return [loss.item() for loss in losses]

    return step


def _build(args, variant: str, backbone, ctx, n_batches: int):
    if variant == "grouped":
        return grouped_step(backbone, args.prompts, args.batch_size, args.seq_len, args.prompt_length, n_batches,
                            args.device, ctx, args.members_per_pass)
    batches = make_batches(backbone, n_batches, args.batch_size, args.seq_len, args.device)
    fn = ptx_step if variant == "ptx" else peft_step
    return fn(backbone, batches, args.prompt_length, VARIANTS[variant], ctx)[0]


def worker_memory(args) -> dict:
    """One variant alone in this process: its peak extra memory over a few steps."""
    import torch

    torch.manual_seed(0)
    backbone = load(args.backbone, args.device, torch.float32)
    with torch.no_grad():  # page memory-mapped weights in before the meter starts
        for t in (*backbone.model.parameters(), *backbone.model.buffers()):
            t.sum()
    meter = PeakMemory(args.device)
    meter.start()
    step = _build(args, args.variant, backbone, autocast_ctx(args.device, args.dtype), 2)
    for i in range(2):
        step(i)
    peak = meter.peak()
    return {"variant": args.variant, "peak_bytes": peak, "peak_mib": mib(peak), "memory_measure": meter.what()}


def predicted_working(args, k: int, per_pass: int) -> int:
    """ptx.memory's prediction of the measured figure: a step's working memory above the loaded weights."""
    from ptx.memory import Attention, Precision, TrialShape, backbone_shape, predict

    # SDPA runs fused kernels on both devices (CPU: its flash kernel, which keeps q, k, v, the output and the
    # log-sum-exp: counted with saved_tensors_hooks); T5's eager attention is the model's business
    attention = Attention.FUSED
    shape = backbone_shape(args.backbone)
    trial = TrialShape(batch=args.batch_size, prompt_tokens=args.prompt_length, text_tokens=args.seq_len,
                       group_size=k, per_pass=per_pass, precision=Precision(args.dtype), attention=attention)
    return predict(shape, trial).working


def memory_figures(args, variants) -> dict:
    """{variant: record} of each variant's peak: the median of --repeats fresh processes, and the model's figure."""
    env = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)} if args.allocator == "fixed" else None
    out = {}
    for v in variants:
        runs = [run_worker(worker_argv(args, "memory", v), timeout=1800, env=env) for _ in range(args.repeats)]
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            out[v] = {"memory_error": errors[0]}
            continue
        peaks = sorted(r["peak_bytes"] for r in runs)
        k = args.prompts if v == "grouped" else 1
        per_pass = (args.members_per_pass or (k if args.device.startswith("cuda") else 1)) if v == "grouped" else 1
        rec = {"peak_bytes": median(peaks), "peak_mib": mib(median(peaks)), "peak_mib_runs": [mib(p) for p in peaks],
               "memory_measure": runs[0]["memory_measure"] + f", median of {len(peaks)} fresh processes, allocator "
               f"{args.allocator}"}
        if v != "peft":
            try:
                pred = predicted_working(args, k, per_pass)
                rec.update(predicted_mib=mib(pred), measured_vs_predicted=median(peaks) / pred)
            except Exception as exc:  # noqa: BLE001 - a shape the model does not know: the measurement still stands
                rec["prediction_error"] = str(exc)
        out[v] = rec
    return out


def worker_time(args) -> dict:
    """grouped, ptx and peft in this one process (each its own model copy), timed in interleaved rounds."""
    import torch

    torch.manual_seed(0)
    ctx = autocast_ctx(args.device, args.dtype)
    variants = ["grouped", "ptx", "peft"]
    steps, records = {}, {}
    for v in variants:
        backbone = load(args.backbone, args.device, torch.float32)
        n_ex = args.batch_size * (args.prompts if v == "grouped" else 1)
        once = runs_prompt_once(backbone, {"impl": "peft" if v == "peft" else "ptx"})
        flops = step_flops(backbone, args.batch_size, args.prompt_length, args.seq_len, prompt_once=once)
        records[v] = {"variant": v, "examples_per_step": n_ex, "prompt_once": once,
                      "model_tflops_per_step": flops * (args.prompts if v == "grouped" else 1) / 1e12}
        if v == "grouped":
            from ptx.train_group import members_per_pass

            records[v]["members_per_pass"] = args.members_per_pass or members_per_pass(backbone, args.prompts)
        meter = PeakMemory(args.device)
        meter.start()
        steps[v] = _build(args, v, backbone, ctx, min(args.warmup + args.steps, 8))
        timed_loop(steps[v], args.warmup, args.device)
        if args.device.startswith("cuda"):
            records[v].update(peak_bytes=meter.peak(), peak_mib=mib(meter.peak()), memory_measure=meter.what())
    wall, cpu = rotated_rounds(steps, variants, args.steps, args.warmup, args.device)
    on_gpu = args.device.startswith("cuda")
    times = wall if on_gpu else cpu
    for v, rec in records.items():
        sec = median(times[v])
        rec.update(step_s=sec, examples_per_s=rec["examples_per_step"] / sec, wall_step_s=median(wall[v]),
                   times=[round(t, 4) for t in times[v]], time_measure="wall" if on_gpu else "cpu",
                   threads=torch.get_num_threads(), achieved_tflops=rec["model_tflops_per_step"] / sec)
        if on_gpu:
            rec["mfu"] = rec["achieved_tflops"] / args.peak_tflops
    # paired per-round ratios: the aggregate examples/s of the group over one run's (= K runs one after another)
    for base in ("ptx", "peft"):
        ratios = [args.prompts * b / g for g, b in zip(times["grouped"], times[base], strict=True)]
        records["grouped"][f"speed_vs_{base}"] = median(ratios)
        wall_ratios = [args.prompts * b / g for g, b in zip(wall["grouped"], wall[base], strict=True)]
        records["grouped"][f"wall_speed_vs_{base}"] = median(wall_ratios)
    return {"results": [records[v] for v in variants]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny-roberta", help="ptx alias/path, or random:NAME (real shape, random weights)")
    p.add_argument("--prompts", type=int, default=8, help="K: prompts trained together")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (each: one grouped step, one ptx, one PEFT)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="per prompt (the paper's 16)")
    p.add_argument("--prompt-length", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=48, help="text tokens per example (synthetic, no padding)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="default: bf16 autocast on CUDA (ptx's training path), fp32 on CPU")
    p.add_argument("--members-per-pass", type=int, default=0,
                   help="grouped: members per backbone pass (0: train_group's rule, all on a GPU, 1 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU: H100/H200 SXM bf16 dense peak")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per memory figure (the median is kept)")
    p.add_argument("--allocator", choices=["default", "fixed"], default="default",
                   help="CPU: glibc malloc as is, or with a fixed mmap threshold (module doc)")
    p.add_argument("--memory-only", action="store_true", help="measure the peaks only (no timing rounds)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.prompts < 1:
        p.error(f"--prompts: expected K >= 1, found {args.prompts}")
    if args.repeats < 1:
        p.error(f"--repeats: expected a whole number >= 1, found {args.repeats}")
    if args.members_per_pass < 0:
        p.error(f"--members-per-pass: expected a whole number >= 0, found {args.members_per_pass}")
    return args


def worker_argv(args, mode: str, variant: str | None = None) -> list[str]:
    keep = ["backbone", "prompts", "steps", "warmup", "batch_size", "prompt_length", "seq_len", "device", "dtype",
            "threads", "peak_tflops", "members_per_pass", "repeats", "allocator"]
    argv = [str(Path(__file__).resolve()), "--worker", mode]
    for k in keep:
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return argv + (["--variant", variant] if variant else [])


def main(argv=None) -> dict:
    args = parse(argv)
    if args.worker:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        if args.threads and not args.device.startswith("cuda"):
            import torch

            torch.set_num_threads(args.threads)
        emit({"time": worker_time, "memory": worker_memory}[args.worker](args))
        return {}
    info = {"machine": machine(), "command": command_line(), "args": vars(args)}
    if args.memory_only:
        return memory_only(args, info)
    timing = run_worker(worker_argv(args, "time"), timeout=3600)
    if "error" in timing:
        raise SystemExit(f"bench_multiprompt: the timing worker failed: {timing['error']}")
    results = info["results"] = timing["results"]
    by = {r["variant"]: r for r in results}
    if not args.device.startswith("cuda"):
        mem = memory_figures(args, [r["variant"] for r in results])
        for rec in results:
            rec.update(mem[rec["variant"]])
    else:  # the timing worker measured the peaks; the model's figure beside them
        for rec in results:
            if rec.get("peak_bytes") and rec["variant"] != "peft":
                k = args.prompts if rec["variant"] == "grouped" else 1
                pred = predicted_working(args, k, rec.get("members_per_pass", 1))
                rec.update(predicted_mib=mib(pred), measured_vs_predicted=rec["peak_bytes"] / pred)
    g, one = by["grouped"], by["ptx"]
    mem_ratio = g["peak_bytes"] / one["peak_bytes"] if g.get("peak_bytes") and one.get("peak_bytes") else float("nan")
    g["memory_vs_one_run"] = mem_ratio
    info["load_average_1m_after"] = machine()["load_average_1m"]
    cols = ["variant", "examples_per_step", "examples_per_s", "step_s", "wall_step_s", "peak_mib", "predicted_mib",
            "achieved_tflops"]
    if "mfu" in g:
        cols.append("mfu")
    print(f"{args.backbone} on {args.device} ({args.dtype}), K={args.prompts} prompts x batch {args.batch_size}, "
          f"prompt {args.prompt_length}, text {args.seq_len}, {g['members_per_pass']} member(s) per backbone pass, "
          f"{args.steps} rounds; time = {g['time_measure']}; "
          f"memory = {g.get('memory_measure', '?')}")
    print(table(results, cols))
    print(f"grouped vs ptx one at a time: {g['speed_vs_ptx']:.2f}x ({g['time_measure']} time; wall "
          f"{g['wall_speed_vs_ptx']:.2f}x); vs PEFT one at a time: {g['speed_vs_peft']:.2f}x (wall "
          f"{g['wall_speed_vs_peft']:.2f}x)")
    if args.json:
        write_json(args.json, info)
    print(f"multi-prompt K={args.prompts}: {g['speed_vs_ptx']:.2f}x examples/s vs one at a time, "
          f"peak memory {mem_ratio:.2f}x")
    return info


def memory_only(args, info: dict) -> dict:
    """Peaks of the grouped step and of one ptx run, each the median of --repeats fresh processes, and the model's."""
    mem = memory_figures(args, ["grouped", "ptx"])
    per_pass = args.members_per_pass or (args.prompts if args.device.startswith("cuda") else 1)
    info["results"] = [{"variant": v, **mem[v]} for v in ("grouped", "ptx")]
    info["results"][0]["members_per_pass"] = per_pass
    g, one = mem["grouped"], mem["ptx"]
    ratio = g["peak_bytes"] / one["peak_bytes"] if g.get("peak_bytes") and one.get("peak_bytes") else float("nan")
    info["results"][0]["memory_vs_one_run"] = ratio
    print(f"{args.backbone} on {args.device} ({args.dtype}), K={args.prompts} x batch {args.batch_size}, prompt "
          f"{args.prompt_length}, text {args.seq_len}, {per_pass} member(s) per pass; memory = "
          f"{g.get('memory_measure', one.get('memory_measure', '?'))}")
    print(table(info["results"], ["variant", "peak_mib", "peak_mib_runs", "predicted_mib", "measured_vs_predicted"]))
    if args.json:
        write_json(args.json, info)
    print(f"multi-prompt K={args.prompts} memory: grouped {g.get('peak_mib', float('nan')):.0f} MiB "
          f"(model {g.get('predicted_mib', float('nan')):.0f}), one run {one.get('peak_mib', float('nan')):.0f} MiB "
          f"(model {one.get('predicted_mib', float('nan')):.0f}), peak memory {ratio:.2f}x")
    return info


if __name__ == "__main__":
    main()
