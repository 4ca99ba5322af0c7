"""Cross-task transfer, the library part: the zero-shot matrix (many prompts per forward pass), the bank it reads,
and the convergence speed-up of transfer-initialised prompt tuning (TPT).

The stages that run these live in ptx/stages/: transfer.py (the matrix as resumable Ray units, one MLflow run
each) and tpt.py (source choice, TPT beside vanilla PT).
"""

import dataclasses
import logging
import math
import zlib
from collections import Counter

import pyarrow as pa
import torch

from ptx.errors import PtxError
from ptx.prompt import PromptArtifact, check_compatible, init_prompt, reconstruct_init

log = logging.getLogger(__name__)
KIND_UNIT, KIND_TPT = "transfer_unit", "tpt"
RANDOM = "random"  # source_prompt_run / source_task / source_category of the random-prompt baseline
# the untrained-init baseline: a target's own prompts' starts, scored on the target as sources init:<prompt run>;
# they are kept out of the matrix (whose consumers read every non-random row as a bank prompt) and travel in
# the per-example predictions, where the paired own-vs-baselines test reads them
INIT = "init"
SCHEMA = pa.schema([("backbone", pa.string()), ("source_prompt_run", pa.string()), ("source_task", pa.string()),
                    ("source_category", pa.string()), ("target_task", pa.string()), ("target_category", pa.string()),
                    ("split", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
                    ("relative_value", pa.float64()), ("n_examples", pa.int64())])


@dataclasses.dataclass(frozen=True)
class Source:
    """One bank prompt: its name (MLflow run id or artifact name), tensor [n_tokens, d_model] and lineage."""

    name: str
    prompt: torch.Tensor
    task: str
    category: str
    dev: float | None = None  # its own dev metric: picks a target's own prompt when the task has several


def task_spec(task, max_length: int | None = None):
    """A task given by name (loaded, with this max_length) or as a TaskSpec (returned as is)."""
    from ptx.tasks import load_task

    return load_task(task, max_length=max_length) if isinstance(task, str) else task


def _unpack(name, item) -> tuple:
    """(tensor, meta) of a bank item: a PromptArtifact, a (tensor, meta) pair or {"prompt", "meta"}."""
    if isinstance(item, PromptArtifact):
        return item.prompt, item.meta
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return tuple(item)
    if isinstance(item, dict) and "prompt" in item:
        return item["prompt"], item.get("meta") or {}
    raise PtxError(f"prompt '{name}': expected a PromptArtifact or a (tensor, meta) pair, found {type(item).__name__}")


def bank_sources(prompts: dict, backbone) -> list[Source]:
    """Normalise the bank (PromptArtifact, (tensor, meta) or {"prompt", "meta"}) and check every prompt fits."""
    if not prompts:
        raise PtxError(f"the prompt bank for backbone '{backbone.name}' is empty: train prompts first "
                       "(ptx train / the study's train stage) or pass at least one prompt")
    out = []
    for name, item in prompts.items():
        tensor, meta = _unpack(name, item)
        check_compatible(meta, backbone, where=f"prompt '{name}'")
        if not torch.is_tensor(tensor) or tensor.dim() != 2 or tensor.shape[1] != backbone.d_model:
            raise PtxError(f"prompt '{name}': expected a tensor [n_tokens, {backbone.d_model}] for backbone "
                           f"'{backbone.name}', found {list(getattr(tensor, 'shape', [])) or type(tensor).__name__}")
        if meta.get("insertion", backbone.insertion.value) != backbone.insertion.value:
            raise PtxError(f"prompt '{name}' uses insertion '{meta['insertion']}'; backbone '{backbone.name}' was "
                           f"loaded with '{backbone.insertion.value}'")
        out.append(Source(str(name), tensor.detach().float().cpu(), *describe_prompt(meta, name)))
    return out


def describe_prompt(meta: dict, name: str = "") -> tuple[str, str, float | None]:
    """(task, category, own dev metric) of a bank prompt from its metadata."""
    task = meta.get("task")
    task = task.get("name") if isinstance(task, dict) else task
    if not task:
        raise PtxError(f"prompt '{name}': its metadata names no task (expected meta['task']['name'])")
    return task, meta.get("category") or task_spec(task).category, (meta.get("dev_metric") or {}).get("value")


def check_targets(backbone_name: str, kind: str, targets) -> None:
    """Raise when a target cannot be scored on this backbone kind (generation needs seq2seq)."""
    for spec in targets:
        if spec.kind == "generation" and kind != "seq2seq":
            raise PtxError(f"target task '{spec.name}' is a generation task; backbone '{backbone_name}' is {kind} "
                           "and only scores label words: generation targets need a seq2seq backbone")


def _limit(limits, split: str):
    return limits.get(split) if isinstance(limits, dict) else limits


RANDOM_PROMPTS = 3  # seeded random prompts a target: the baseline is a distribution, not one draw


def transfer_matrix(backbone, prompts: dict, targets: list, splits=("dev", "test"), limits=None,
                    prompts_per_pass: int = 8, batch_size: int = 32, random_baseline: bool = True, seed: int = 0,
                    progress: bool = False, random_prompts: int = RANDOM_PROMPTS,
                    predictions: list | None = None, init_baseline: bool = False) -> pa.Table:
    """Zero-shot score of every bank prompt [n, d] on every target split, as a long table, beside the target's own
    `random_prompts` seeded random prompts (one `random` row: their mean score).

    `predictions`, when a list: per classification target and split, one row per test example for each of the
    target's own prompts and each random prompt (target_task, split, source_prompt_run, example, pred, label;
    the random prompts as random:<i>), for the paired own-vs-random test (ptx.verdicts.own_vs_random).
    `init_baseline`: also score each target's own prompts' untrained starts (init:<name>; `init_sources`); they
    appear in `predictions` only, not as matrix rows.
    """
    targets = [task_spec(t) for t in targets]
    if not targets:
        raise PtxError("transfer_matrix: no target tasks given")
    check_targets(backbone.name, backbone.kind.value, targets)
    sources = bank_sources(prompts, backbone)
    n_tok = random_length(s.prompt.shape[0] for s in sources)
    listed = sources + ([Source(RANDOM, None, RANDOM, RANDOM)] if random_baseline and random_prompts else [])
    rows = []
    for spec in targets:
        randoms = random_sources(backbone, n_tok, seed, spec.name, random_prompts if random_baseline else 0)
        inits = init_sources(backbone, prompts, spec.name) if init_baseline else []
        scores, sizes = score_sources(backbone, sources + randoms + inits, spec, splits, limits, prompts_per_pass,
                                      batch_size, progress, predictions)
        add_random_mean(scores, len(randoms), splits)
        rows += matrix_rows(backbone.name, listed, spec, splits, scores, sizes)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def random_length(lengths) -> int:
    """The random prompts' length: the bank's commonest, so they stack with most prompts."""
    return Counter(int(n) for n in lengths).most_common(1)[0][0]


def random_prompt_seed(seed: int, target: str, i: int) -> int:
    """The seed of a target's i-th random prompt: its own draw per target, reproducible from the study's seed."""
    return (seed * 1_000_003 + zlib.crc32(target.encode()) * 31 + i) % 2**32


def random_sources(backbone, n_tokens: int, seed: int, target: str, count: int = RANDOM_PROMPTS) -> list[Source]:
    """A target's random-prompt baseline as sources random:0 .. random:<count-1> (seeded per target: every worker
    that draws them draws the same prompts)."""
    return [Source(f"{RANDOM}:{i}", init_prompt(backbone, n_tokens, "random", seed=random_prompt_seed(seed, target, i)),
                   RANDOM, RANDOM) for i in range(count)]


def init_sources(backbone, prompts: dict, target: str) -> list[Source]:
    """The untrained starts of `target`'s own prompts in `prompts` (the bank's form) as sources init:<name>, rebuilt
    from each prompt's record (ptx.prompt.reconstruct_init: the same call that made the start). A prompt whose start
    cannot be rebuilt (imported, transfer-initialised) has none; the paired test then says so."""
    out = []
    for name, item in prompts.items():
        _, meta = _unpack(name, item)
        if describe_prompt(meta, name)[0] != target:
            continue
        start = reconstruct_init(meta, backbone)
        if start is None:
            log.info("prompt '%s' records no rebuildable init: no untrained baseline for it", name)
            continue
        out.append(Source(f"{INIT}:{name}", start.float(), INIT, INIT))
    return out


def add_random_mean(scores: dict, count: int, splits) -> None:
    """scores[(random, split)]: the mean of the target's random prompts' scores (the matrix's one random row)."""
    if count:
        for split in splits:
            scores[(RANDOM, split)] = sum(scores[(f"{RANDOM}:{i}", split)] for i in range(count)) / count


def score_sources(backbone, sources: list, spec, splits, limits=None, prompts_per_pass: int = 8,
                  batch_size: int = 32, progress: bool = False,
                  predictions: list | None = None) -> tuple[dict, dict]:
    """({(source name, split): value}, {split: n_examples}): `sources` scored on one target, prompts of one length
    stacked `prompts_per_pass` to a forward pass. Each split is tokenized once.

    `predictions`, when a list, receives the per-example answers of the target's own prompts and of the random
    prompts (classification targets only; see transfer_matrix)."""
    from ptx.data import encode_split
    from ptx.evaluate import predict_labels, score_prompts
    from ptx.metrics import METRICS

    groups = []  # prompts of one length stack into one pass
    for n_tok in sorted({s.prompt.shape[0] for s in sources}):
        same = [s for s in sources if s.prompt.shape[0] == n_tok]
        groups += [same[i:i + max(1, prompts_per_pass)] for i in range(0, len(same), max(1, prompts_per_pass))]
    kept = {s.name for s in sources if s.task in (spec.name, RANDOM, INIT)}  # whose answers the paired test reads
    scores, sizes = {}, {}
    for split in splits:
        encoded = encode_split(spec, backbone, split, limit=_limit(limits, split))
        sizes[split] = len(encoded)
        for group in groups:
            stacked = torch.stack([s.prompt for s in group])
            if spec.kind == "generation" or predictions is None:
                values = score_prompts(backbone, stacked, spec, encoded, batch_size, progress=progress)
            else:  # label predictions once: the scores, and the examples the paired test reads
                label_ids = backbone.label_ids(spec.label_words(backbone.kind))
                preds, golds = predict_labels(backbone, stacked, encoded, label_ids, batch_size, progress)
                gold = golds.tolist()
                values = [float(METRICS[spec.metric](p.tolist(), gold)) for p in preds]
                for s, p in zip(group, preds, strict=True):
                    if s.name in kept:
                        predictions += [{"target_task": spec.name, "split": split, "source_prompt_run": s.name,
                                         "example": i, "pred": int(v), "label": int(g)}
                                        for i, (v, g) in enumerate(zip(p.tolist(), gold, strict=True))]
            scores.update({(s.name, split): v for s, v in zip(group, values, strict=True)})
    return scores, sizes


def matrix_rows(backbone_name: str, sources: list, spec, splits, scores: dict, sizes: dict) -> list[dict]:
    """The long-format rows of one target from its scores; relative values divide by the target's own prompt (the
    best on dev when the task has several). `sources` need only name, task and category (and dev)."""
    own = [s for s in sources if s.task == spec.name and s.name != RANDOM]
    if len(own) > 1:  # best dev: this matrix's dev score when it has one, else the prompt's own record
        own.sort(key=lambda s: -(scores.get((s.name, "dev")) if "dev" in splits else (s.dev or -math.inf)))
    rows = []
    for split in splits:
        ref = scores[(own[0].name, split)] if own else math.nan
        for s in sources:
            value = scores[(s.name, split)]
            rel = value / ref if ref and math.isfinite(ref) else math.nan
            rows.append({"backbone": backbone_name, "source_prompt_run": s.name, "source_task": s.task,
                         "source_category": s.category, "target_task": spec.name,
                         "target_category": spec.category, "split": split, "metric": spec.metric,
                         "value": float(value), "relative_value": float(rel), "n_examples": sizes[split]})
    return rows


def chunk_sizes(n_sources: int, n_targets: int, slots: int, prompts_per_pass: int, waves: int = 3) -> list[int]:
    """How one target's sources are cut into work units: sizes (largest first, differing by at most one).

    A unit (a source chunk on one target) is at most one forward pass wide, and there are enough of them that
    every slot (a task the cluster runs at once) gets about `waves` units: the last wave is then short, so no slot
    idles for long at the end, and the progress line moves as units finish rather than once per target.
    """
    if n_sources < 1 or n_targets < 1:
        return []
    per_target = max(math.ceil(n_sources / max(1, prompts_per_pass)), math.ceil(waves * max(1, slots) / n_targets))
    per_target = min(per_target, n_sources)
    base, extra = divmod(n_sources, per_target)
    return [base + 1] * extra + [base] * (per_target - extra)


# ---- transfer-initialised prompt tuning (TPT) -----------------------------------------------------------
def score_curve(points) -> list[tuple[int, float]]:
    """[(step, score)] from tuples, {step, dev_metric} dicts or MLflow metrics; last value per step, NaN dropped."""
    by_step = {}
    for p in points:
        if isinstance(p, dict):
            step, value = p["step"], p.get("dev_metric", p.get("value"))
        else:
            step, value = (p.step, p.value) if hasattr(p, "step") else p
        if value is not None and math.isfinite(value):
            by_step[int(step)] = float(value)  # a resumed run logs some steps twice: the later one stands
    return sorted(by_step.items())


def _first_reach(curve, goal: float) -> int | None:
    return next((s for s, v in curve if v >= goal - 1e-12), None)


def _ratio(v_steps: int, t_steps: int | None) -> tuple[float, str]:
    if v_steps == 0:  # first: whether or not TPT gets there, there is no convergence to speed up
        return math.nan, "vanilla_at_init"  # vanilla's best is its init: no convergence to speed up
    if t_steps is None:
        return math.nan, "tpt_not_reached"
    if t_steps == 0:
        return math.nan, "tpt_at_init"  # the transferred prompt starts there: an infinite speed-up
    return v_steps / t_steps, "ok"


def convergence_speedup(vanilla_curve, tpt_curve, fraction: float = 0.9) -> dict:
    """Steps for vanilla PT to reach its best dev score ÷ steps for TPT to reach it; also at `fraction` of it.

    A TPT run that never reaches the goal gets `speedup_bound`: vanilla's steps ÷ the last step TPT ran, an upper
    bound on its (censored) speed-up, since it would have needed more steps than it ran.
    """
    v, t = score_curve(vanilla_curve), score_curve(tpt_curve)
    if not v or not t:
        raise PtxError(f"convergence_speedup: empty learning curve (vanilla {len(v)} points, TPT {len(t)})")
    best = max(x for _, x in v)
    out = {"vanilla_best": best, "tpt_best": max(x for _, x in t)}
    budget = t[-1][0]
    for suffix, goal in (("", best), ("_90", fraction * best)):
        vs, ts = _first_reach(v, goal), _first_reach(t, goal)
        speed, flag = _ratio(vs, ts)
        bound = (vs / budget if budget else math.inf) if flag == "tpt_not_reached" else math.nan
        out.update({f"vanilla_steps{suffix}": float(vs), f"tpt_steps{suffix}": math.nan if ts is None else float(ts),
                    f"speedup{suffix}": speed, f"flag{suffix}": flag, f"speedup_bound{suffix}": bound})
    return out


def _lower_median(values: list) -> float:
    """The lower median (the ceil(n/2)-th smallest): defined with infinite values and never averages two."""
    s = sorted(values)
    return s[(len(s) - 1) // 2] if s else math.nan


def censored_speedups(rows, suffix: str = "") -> dict:
    """Speed-ups of a set of TPT runs with none dropped: counts, the median with censoring, the mean of reachers.

    Each row is a `convergence_speedup` result. A run that reached vanilla's best counts with its speed-up (one
    that starts there, `tpt_at_init`, with +inf); a run that never reached it is censored: its speed-up lies in
    (0, speedup_bound). The median is the lower median of all reached and censored runs, with every censored run
    at 0 (`median_speedup`, a lower bound on the true median) and at its bound (`median_speedup_upper`, an upper
    bound); equal bounds mean the censoring does not touch the median. Runs where no speed-up is defined
    (vanilla's best is its init, a missing run) are only counted.
    """
    flags = [r.get(f"flag{suffix}") for r in rows]
    ok = [float(r[f"speedup{suffix}"]) for r, f in zip(rows, flags, strict=True) if f == "ok"]
    at_init = flags.count("tpt_at_init")
    bounds = [float(r.get(f"speedup_bound{suffix}", math.inf)) for r, f in zip(rows, flags, strict=True)
              if f == "tpt_not_reached"]
    bounds = [math.inf if math.isnan(b) else b for b in bounds]  # a NaN bound (an old table): no information
    reached = ok + [math.inf] * at_init
    return {"n_runs": len(rows), "n_reached": len(reached), "n_at_init": at_init, "n_censored": len(bounds),
            "n_undefined": len(rows) - len(reached) - len(bounds),
            "median_speedup": _lower_median(reached + [0.0] * len(bounds)),
            "median_speedup_upper": _lower_median(reached + bounds),
            "mean_speedup_reached": sum(ok) / len(ok) if ok else math.nan}
