"""What `ptx run --dry-run` and `ptx sweep --dry-run` print: the plan of a study (trials, groups, GPU memory,
resources, power) and, on a live cluster, what its nodes run at once. Nothing is started."""

import os

import click


def print_plan(spec, max_concurrent):
    """What a study would run: trials, stages, groups, GPU memory, resources, concurrency and power."""
    from ptx.plan import plan

    p = plan(spec)
    cap = max_concurrent or spec.max_concurrent
    res = p["resources_per_trial"]
    click.echo(f"study {p['study']}: {p['trials']} trials = {p['base_runs']} runs (backbones x tasks x seeds) "
               f"x {p['search_points']} search points x {p['samples']} samples")
    click.echo(f"  stages: {', '.join(p['stages'])}; scheduler: {p['scheduler']}; {p['steps_per_trial']} steps per trial")
    if p.get("group_size", 1) > 1:  # a trial is a group of prompts trained together on one backbone copy
        per_gpu = f", {p['groups_per_gpu']:g} group(s) per GPU" if p.get("groups_per_gpu") else ""
        click.echo(f"  groups: {p['groups']} trial(s) of up to {p['group_size']} prompts, one backbone copy each "
                   f"(members per group {p['members_per_group']}{per_gpu})")
    _print_gpu_memory(spec)
    click.echo(f"  resources per trial: {res}; max concurrent: {cap or 'as resources allow'}")
    if res.get("gpu"):
        per_gpu = int(1 / res["gpu"]) if res["gpu"] < 1 else 1
        click.echo(f"  packing: {per_gpu} trial(s) per GPU; N GPUs run up to {per_gpu}*N trials at once")
    else:
        click.echo(f"  concurrency on this machine (CPU): up to {int((os.cpu_count() or 1) // res['cpu'])} trials")
    _print_power(spec)


def _print_power(spec):
    """Per question the spec's stages answer: the smallest effect its design detects with 80% power."""
    from ptx.power import plan_lines

    lines = plan_lines(spec)
    if lines:
        click.echo("  power (simulated with the report's verdict code; docs/findings.md):")
        for line in lines:
            click.echo(f"    {line}")


def print_packing(spec, address):
    """What the live cluster's nodes run at once for this spec's trials (and its stages' tasks)."""
    from dataclasses import asdict

    from ptx import sweep
    from ptx.packing import packing

    sweep.connect(address)
    try:
        nodes = sweep.live_nodes()
    finally:
        sweep.shutdown()
    blocks = {"trial": asdict(spec.resources)}
    blocks.update({f"{s} task": asdict(getattr(spec, s).resources) for s in ("transfer", "indicators")
                   if s in spec.stages})
    click.echo(f"  packing on the live cluster at {address} ({len(nodes)} node(s) alive; the autoscaler may add more):")
    for label, res in blocks.items():
        total = 0
        for node in sorted(nodes, key=lambda n: (n["ip"] or "", n["id"])):
            p = packing(res, node["resources"])
            total += p["trials"]
            offer = ", ".join(f"{k} {v:g}" for k, v in sorted(node["resources"].items()))
            per_gpu = f" = {p['per_gpu']:g} per GPU" if p["per_gpu"] is not None else ""
            click.echo(f"    {label} {res['cpu']:g} CPU / {res['gpu']:g} GPU on {node['ip']} {node['id']} ({offer}): "
                       f"{p['trials']} at once{per_gpu} (bounded by {p['limit']})")
        click.echo(f"    {label}s at once on the whole cluster: {total}")


def _print_gpu_memory(spec):
    """Per backbone: a trial's predicted GPU memory against its share, trials per GPU, slots used, GPU-hours."""
    from ptx.memory import GIB
    from ptx.packing import gpu_hours

    plans = spec.gpu_plans()
    if not plans:
        return
    c = spec.cluster
    per_gpu = int(1 / spec.resources.gpu + 1e-9) if spec.resources.gpu < 1 else 1
    click.echo(f"  GPU plan: {c.gpus} GPU(s) of {c.gpu_memory_mib} MiB, {per_gpu} trial(s) per GPU "
               f"(--set cluster.gpus=N --set cluster.gpu_memory_mib=MIB)")
    for plan in plans:
        used = min(plan.trials, plan.slots)
        hours = gpu_hours(plan.backbone, plan.runs, spec.train.steps, spec.train.batch_size, plan.tokens)
        gpus_busy = max(1, min(c.gpus, -(-used // per_gpu)))
        click.echo(f"    {plan.backbone}: groups of {plan.group_size} ({plan.per_pass} per pass), {plan.trials} trials; "
                   f"memory per trial {plan.need / GIB:.1f} GiB (predicted peak {plan.estimate.total / GIB:.1f} GiB "
                   f"+ CUDA context) of a {plan.share / GIB:.1f} GiB share: {'fits' if plan.fits else 'DOES NOT FIT'}; "
                   f"GPU slots used {used} of {plan.slots}")
        click.echo(f"      about {hours:.0f} H100/H200 GPU-h for {spec.train.steps} steps per prompt (the step-time "
                   f"model: measured one-prompt MFU; early stopping ends most runs sooner), about "
                   f"{hours / gpus_busy:.1f} h on {gpus_busy} GPU(s)")


