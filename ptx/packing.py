"""How many trials a node runs at once, from the node's declared Ray resources and a trial's request, and whether
a trial fits the GPU memory of its share.

Pure arithmetic, no Ray: the same numbers for the cluster files (tests read aws.yaml, gcp.yaml and the KubeRay
manifests) and for a live cluster (`ptx run --dry-run --address ...` reads the alive nodes). Memory: a trial's GPU
share (its `resources.gpu` fraction of one GPU of the node type, whose memory every GPU node type in cluster/
declares) must hold the trial's predicted peak (ptx.memory) plus its process's CUDA context.
"""

import math
from dataclasses import dataclass, replace

from ptx.memory import MIB, MemoryEstimate, TrialShape, backbone_shape, predict, step_flops, trial_need

EPS = 1e-9  # Ray keeps resource amounts in 1/10000 units: 0.25 * 4 must count as exactly 1


def ray_request(resources: dict) -> dict:
    """A spec's `resources` ({cpu, gpu, custom}) -> Ray resource names and amounts, zero amounts dropped."""
    need = {"CPU": float(resources.get("cpu", 1)), "GPU": float(resources.get("gpu", 0) or 0)}
    need.update({k: float(v) for k, v in (resources.get("custom") or {}).items()})
    return {k: v for k, v in need.items() if v > 0}


def trials_per_node(need: dict, node: dict) -> tuple[int, str | None]:
    """(trials that fit at once on `node`, the resource that bounds them); a fractional GPU stays on one GPU."""
    best, limit = math.inf, None
    for name, amount in sorted(need.items(), key=lambda kv: kv[0] != "GPU"):  # a tie names the GPU
        have = float(node.get(name, 0))
        if name == "GPU" and amount < 1:
            fit = math.floor(1 / amount + EPS) * math.floor(have + EPS)  # fractions never span two GPUs
        else:
            fit = math.floor(have / amount + EPS)
        if fit < best:
            best, limit = fit, name
    return (0, limit) if best is math.inf else (int(best), limit)


def packing(resources: dict, node: dict) -> dict:
    """Trials at once, trials per GPU (None on a GPU-less node) and the bounding resource, for one node."""
    trials, limit = trials_per_node(ray_request(resources), node)
    gpus = float(node.get("GPU", 0))
    return {"trials": trials, "per_gpu": trials / gpus if gpus else None, "limit": limit}


# ---- memory: what a trial needs of its GPU share (ptx.memory), and the group size that fits ---------------------
# Largest group `train.group_size: auto` picks: the GPU figures stop at K=16 (benchmarks/gpu.sh measures K=4, 8, 16)
MAX_AUTO_GROUP = 16
# Model FLOPs utilisation of one prompt's training step, measured on an H200 with bf16 autocast at batch 16-32
# (benchmarks/RESULTS.md, GPU: roberta-base 10.2%, roberta-large 13.9%, t5-base 2.8%): the GPU-hours estimate
STEP_MFU = {"encoder": 0.10, "seq2seq": 0.028, "decoder": 0.23}
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the GPU those rates were measured on


@dataclass(frozen=True)
class GroupPlan:
    """One backbone's trials: group size, members per pass, trial count, and what a trial needs of its GPU share."""

    backbone: str
    group_size: int
    per_pass: int
    trials: int
    slots: int  # trials the cluster runs at once: GPUs x trials per GPU
    need: int  # bytes: predicted peak with the allocator margin, plus the CUDA context
    share: int  # bytes of one trial's GPU share
    estimate: MemoryEstimate
    max_fit: int | None  # the largest group that fits the share (None: not even one prompt)
    largest: int  # prompts in the trial that needs the most (a group, or a run trained alone)
    runs: int  # prompt runs of this backbone (all trials' members)
    tokens: int  # prompt + text tokens of the grouped runs' examples (else of the largest single run)

    @property
    def fits(self) -> bool:
        return self.need <= self.share


def gpu_slots(gpus: int, gpu: float) -> int:
    """Trials a cluster of `gpus` GPUs runs at once when each asks `gpu` (a fraction stays on one GPU)."""
    if gpu <= 0:
        return 0
    if gpu < 1:
        return math.floor(1 / gpu + EPS) * gpus
    return math.floor(gpus / gpu + EPS)


def share_bytes(gpu: float, gpu_memory_mib: int) -> int:
    """GPU memory of a trial asking `gpu` GPUs: its fraction of one GPU (a trial trains on one device)."""
    return int(min(gpu, 1.0) * gpu_memory_mib * MIB)


def trial_count(groupable: int, alone: int, size: int, repeats: int = 1) -> int:
    """Trials of `groupable` runs in groups of `size` plus `alone` runs of one each, `repeats` times (search points)."""
    return (math.ceil(groupable / size) + alone) * repeats


def choose_group_size(groupable: int, alone: int, repeats: int, slots: int, fits, cap: int = MAX_AUTO_GROUP) -> int | None:
    """`train.group_size: auto`: the largest group that fits (`fits(k)`) and leaves at least `slots` trials; when
    even groups of one leave fewer, 1 (the most trials); None when not even one prompt fits."""
    sizes = [k for k in range(1, max(1, min(cap, groupable)) + 1) if fits(k)]
    if not sizes:
        return None
    enough = [k for k in sizes if trial_count(groupable, alone, k, repeats) >= slots]
    return max(enough) if enough else min(sizes)


def plan_backbone(backbone: str, grouped: TrialShape | None, groupable: int, singles: list[TrialShape], alone: int,
                  repeats: int, group_size: int | None, gpu: float, gpus: int, gpu_memory_mib: int) -> GroupPlan:
    """A backbone's plan on GPUs of `gpu_memory_mib` MiB: `grouped` is the shape of its groupable runs (None when
    there are none), `singles` the shapes of the runs trained alone (generation tasks, the full-vocabulary loss);
    `group_size` None means auto (1 when nothing fits: the plan then does not fit and the caller refuses it)."""
    shape = backbone_shape(backbone)
    share, slots = share_bytes(gpu, gpu_memory_mib), gpu_slots(gpus, gpu)
    estimates = [predict(shape, t) for t in singles]
    if not estimates and grouped is None:
        raise ValueError("plan_backbone: no runs to plan")

    def trials(k: int) -> list[tuple[MemoryEstimate, int]]:  # (estimate, prompts) of each kind of trial
        group = [(predict(shape, replace(grouped, group_size=k, per_pass=k)), k)] if grouped is not None else []
        return [*group, *((e, 1) for e in estimates)]  # a GPU runs all members in one pass (train_group)

    def worst(k: int) -> MemoryEstimate:
        return max(trials(k), key=lambda t: t[0].total)[0]

    def fits(k: int) -> bool:
        return trial_need(worst(k)) <= share

    top = max(1, min(MAX_AUTO_GROUP, groupable)) if grouped is not None else 1
    max_fit = next((k for k in range(top, 0, -1) if fits(k)), None)
    if group_size is None:
        group_size = choose_group_size(groupable, alone, repeats, slots, fits) or 1
    estimate, largest = max(trials(group_size), key=lambda t: t[0].total)
    per_pass = group_size if grouped is not None else 1
    tokens = (grouped or max(singles, key=lambda t: predict(shape, t).total))
    return GroupPlan(backbone, group_size, per_pass, trial_count(groupable, alone, group_size, repeats), slots,
                     trial_need(estimate), share, estimate, max_fit, largest, (groupable + alone) * repeats,
                     tokens.prompt_tokens + tokens.text_tokens)


def gpu_hours(backbone: str, prompts: int, steps: int, batch: int, tokens: int) -> float:
    """H100/H200 GPU-hours to train `prompts` prompts `steps` steps each at the measured one-prompt MFU (an upper
    bound for groups, which a GPU runs at a higher utilisation; early stopping ends most runs sooner)."""
    shape = backbone_shape(backbone)
    flops = step_flops(shape, batch, tokens) * steps * prompts
    return flops / (PEAK_TFLOPS * 1e12 * STEP_MFU[shape.family]) / 3600
