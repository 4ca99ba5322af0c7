"""Study planning without Ray: a study's prompt requests, how they group into trials, what a sweep would run, the
trials it plans, and the settings the Ray adapter (ptx.sweep) runs requests with.

Kept out of ptx.sweep so that planning (`ptx run --dry-run`, the stages building their requests) never reaches the
Ray adapter; tests/test_layers.py holds this module to that.
"""

import dataclasses
from pathlib import Path

from ptx.packing import MAX_AUTO_GROUP
from ptx.prompt_runs import PromptRequest
from ptx.train import TrainSettings


def study_request(spec, task: str, backbone: str, seed: int, settings=None, **changes) -> PromptRequest:
    """The vanilla prompt-tuning request a study makes for (task, backbone, seed); later stages (TPT, projector)
    build theirs here too, so the same request hashes the same and its finished run is reused."""
    req = PromptRequest(task=task, backbone=backbone, insertion=spec.insertion, prompt_length=spec.prompt_length,
                        init=spec.init, init_text=spec.init_text, train_limit=spec.data.train_limit,
                        dev_limit=spec.data.dev_limit, max_length=spec.data.max_length,
                        settings=dataclasses.replace(settings or spec.train, seed=seed))
    return dataclasses.replace(req, **changes)


def sweep_requests(spec) -> list[PromptRequest]:
    """The grid of base requests of a study's training stage: backbones x tasks x seeds."""
    return [study_request(spec, task, backbone, seed)
            for backbone in spec.backbones for task in spec.tasks for seed in spec.seeds]


def plan(spec) -> dict:
    """What a sweep would run: trial count, resources, concurrency (nothing is started)."""
    reqs = sweep_requests(spec)
    grid_points = search_points(spec.search.space, spec.search.algorithm)
    n = len(reqs) * grid_points * spec.search.num_samples
    per_trial = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu, **spec.resources.custom}
    size = group_size(spec)
    if size > 1:  # a trial is a group: members per group, and how many groups share one GPU
        groups = len(group_requests(reqs, size))
        n = groups * grid_points * spec.search.num_samples
        grouping = {"group_size": size, "groups": groups, "members_per_group": [len(g) for g in group_requests(reqs, size)],
                    "groups_per_gpu": round(1 / spec.resources.gpu, 2) if spec.resources.gpu else None}
    else:
        grouping = {"group_size": 1}
    return {**grouping, "study": spec.name, "trials": n, "base_runs": len(reqs), "search_points": grid_points,
            "samples": spec.search.num_samples, "scheduler": spec.scheduler.type, "resources_per_trial": per_trial,
            "max_concurrent": spec.max_concurrent, "steps_per_trial": spec.train.steps, "stages": list(spec.stages)}


# train.group_size null or auto on GPUs: the largest group whose trial fits its GPU share (ptx.memory's model of the
# peak, ptx.packing) and leaves at least as many trials as the cluster's GPU slots, at most GPU_GROUP_SIZE (the
# largest group benchmarks/gpu.sh measures); on CPU, where time follows FLOPs and grouping measured no faster, 1.
GPU_GROUP_SIZE = MAX_AUTO_GROUP


def group_size(spec) -> int:
    """Prompts per trial: train.group_size when a number, else on GPUs the memory plan's (smallest over the
    backbones; ptx.config.gpu_plans), else 1."""
    if isinstance(spec.train.group_size, int):
        return spec.train.group_size
    sizes = [p.group_size for p in spec.gpu_plans()] if spec.resources.gpu > 0 else []
    return min(sizes) if sizes else 1


def group_requests(requests: list[PromptRequest], size: int) -> list[list[PromptRequest]]:
    """Requests in groups of at most `size` that can share one pass (same backbone, insertion, prompt length, bf16,
    dropout); a generation task (scored by decoding) or a full-vocabulary loss is a group of one, trained by
    train_prompt."""
    from ptx.tasks import load_task

    by: dict = {}
    for i, r in enumerate(requests):
        alone = load_task(r.task).kind == "generation" or r.settings.label_loss != "label_words"
        key = (r.backbone, r.insertion, r.prompt_length, r.settings.bf16, r.settings.dropout)
        by.setdefault(("alone", i) if alone else key, []).append(r)
    return [reqs[i:i + size] for reqs in by.values() for i in range(0, len(reqs), size)]


def grid_entries(requests: list[PromptRequest], group_size: int) -> list:
    """A sweep's grid: each trial's request as a dict, or with group_size > 1 each group as a list of them."""
    if group_size > 1:
        return [[dataclasses.asdict(r) for r in g] for g in group_requests(requests, group_size)]
    return [dataclasses.asdict(r) for r in requests]


def search_points(space: dict | None, algorithm: str) -> int:
    """How many points a search space holds per base request: the product of its grids (and choices) for a grid
    search, 1 for a searcher that draws them."""
    from math import prod

    return prod(len(d.get("grid", d.get("choice", [None]))) if algorithm == "grid" else 1
                for d in space.values()) if space else 1


def request_from(config: dict) -> PromptRequest:
    """Trial config (a base request + searched fields) -> PromptRequest."""
    base = dict(config["request"])
    settings = dict(base.pop("settings"))
    for key, value in config.items():
        if key in {f.name for f in dataclasses.fields(TrainSettings)}:
            settings[key] = value
        elif key in ("prompt_length", "init"):
            base[key] = value
    return PromptRequest(**base, settings=TrainSettings(**settings))


# ---- what Tune never started ------------------------------------------------------------------------------
# With max_concurrent, Tune creates a grid's trials only as slots free up, and its saved experiment state lists
# only the trials created so far; the rest live in its searcher's state, a second file saved after the trial list.
# A sweep restored without it (a lost file, or one cut short: check_tune_state drops it) finishes the trials it
# lists and nothing else, with no error. So the state file names every planned trial, and `ptx resume` runs the missing
# ones itself, as a second experiment beside the first.
def planned_trials(bases: list, search: dict | None, num_samples: int) -> list[dict]:
    """Every trial a sweep plans: its request (or group) and the values of its grid-searched fields, num_samples
    times each. Fields drawn from a distribution are left out: any draw is as good as the one never made."""
    import itertools

    grid_keys = sorted(k for k, dist in (search or {}).items() if "grid" in dist)
    combos = list(itertools.product(*[search[k]["grid"] for k in grid_keys]))
    return [{"base": b, "grid": dict(zip(grid_keys, c, strict=True))} for b in bases for c in combos for _ in range(num_samples)]


def unstarted_trials(planned: list[dict], configs: list[dict]) -> list[dict]:
    """The planned trials no trial config covers (counted: num_samples repeats a point)."""
    import json
    from collections import Counter

    def key(base, grid) -> str:
        return json.dumps({"base": base, "grid": grid}, sort_keys=True, default=str)

    grid_keys = sorted(planned[0]["grid"]) if planned else []
    have = Counter(key(c.get("group", c.get("request")), {k: c.get(k) for k in grid_keys}) for c in configs)
    missing = []
    for p in planned:
        k = key(p["base"], p["grid"])
        if have[k]:
            have[k] -= 1
        else:
            missing.append(p)
    return missing


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """How the Ray adapter (ptx.sweep.run_requests) runs a list of requests as one Tune experiment."""

    name: str  # the Tune experiment's name (its directory under storage_path)
    experiment: str  # the MLflow experiment the sweep's runs go to (the study's)
    storage_path: str  # a resolved local directory or a storage URI
    config_hash: str  # ptx.config_hash of the sweep's own run
    plan: dict  # what the sweep's own run logs as its plan (ptx.plan.plan)
    resources: dict  # per trial: {cpu, gpu, custom}, as in a spec
    storage_shared: bool = False  # a local storage_path that every node mounts
    search: dict = dataclasses.field(default_factory=dict)  # the spec's search space
    algorithm: str = "grid"
    num_samples: int = 1
    scheduler: dict = dataclasses.field(default_factory=dict)  # the spec's scheduler as a dict
    max_concurrent: int | None = None
    max_failures: int = 2
    group_size: int = 1  # prompts per trial (group_size)
    tags: dict = dataclasses.field(default_factory=dict)  # tags on every trial's run (e.g. ptx.stage)
    force: bool = False  # retrain configs that already have a finished run
    study_file: str | None = None  # the spec file, kept in the sweep's state file


def sweep_settings(spec, workdir: Path, name: str | None = None, storage_path: str | None = None,
                   max_concurrent: int | None = None, force: bool = False, tags: dict | None = None,
                   search=None, scheduler=None) -> SweepSettings:
    """A study's sweep settings; `search`/`scheduler` (ptx.config.Search/Scheduler) replace the spec's for this
    sweep, and the sweep's run then carries the hash and plan of the spec as the sweep runs it."""
    runs_as = spec if search is None and scheduler is None else dataclasses.replace(
        spec, search=spec.search if search is None else search, scheduler=spec.scheduler if scheduler is None
        else scheduler)
    storage = storage_path or runs_as.storage_path or str(Path(workdir) / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return SweepSettings(
        name=name or runs_as.name, experiment=runs_as.name, storage_path=storage, config_hash=runs_as.hash(),
        plan=plan(runs_as), resources=dataclasses.asdict(runs_as.resources), storage_shared=runs_as.storage_shared,
        search=runs_as.search.space, algorithm=runs_as.search.algorithm, num_samples=runs_as.search.num_samples,
        scheduler=dataclasses.asdict(runs_as.scheduler), max_concurrent=max_concurrent or runs_as.max_concurrent,
        max_failures=runs_as.max_failures, group_size=group_size(runs_as), tags=tags or {}, force=force,
        study_file=runs_as.source_file)
