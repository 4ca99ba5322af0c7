"""Simulated studies for the verdict methods: false-verdict rates under the null, power, the smallest effect.

A design is the study's shape (tasks, their categories, seeds, TPT runs, test examples). Each simulator draws
one study's data with effects shared the way a real study shares them (a source task's effect on every target
and across its seeds, a target's effect on every source, a (source task, target) effect across seeds, an
example's difficulty across prompts) plus an `effect` of the size the question asks about (0: the null), and
returns the verdict `ptx.verdicts` gives it. The calibration tests and `ptx run --dry-run`'s power line both run
these, so the planner's numbers come from the same verdict code the report uses.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ptx import verdicts
from ptx.findings import Verdict


@dataclass(frozen=True)
class Design:
    """A study's shape as far as its verdicts are concerned."""

    categories: tuple[str, ...]  # one per task, in task order
    seeds: int = 3  # prompts a task
    tpt_seeds: int = 1  # TPT runs per target (one source mode)
    n_examples: int = 300  # test examples a target
    n_random: int = 3  # seeded random prompts a target

    @property
    def tasks(self) -> list[str]:
        return [f"t{i}" for i in range(len(self.categories))]


def design_of(spec) -> Design:
    """The design a study spec runs (categories from its task files, sizes from its stages)."""
    from ptx.tasks import load_task

    cats = tuple(load_task(t).category for t in spec.tasks)
    n_examples = spec.data.test_limit or 1000  # a full test split: assumed 1000 examples
    return Design(cats, len(spec.seeds), len(spec.tpt.seeds or spec.seeds), int(n_examples))  # per source mode


# the findings study's design (experiments/findings_cpu.yaml) and the paper's 13 tasks on roberta-base
FINDINGS_DESIGN = Design(("sentiment", "sentiment", "topic", "topic"), seeds=3, tpt_seeds=1, n_examples=300)
PAPER_DESIGN = Design(("sentiment",) * 6 + ("nli",) * 3 + ("ethics",) * 2 + ("paraphrase",) * 2, seeds=3,
                      tpt_seeds=3, n_examples=1000)


# ---- one simulated study per question -----------------------------------------------------------------------
def simulate_tpt(design: Design, rng, effect: float = 0.0) -> Verdict:
    """TPT speed-ups: log speed-up = effect + a target's effect (shared by its seeds) + a run's noise; runs whose
    speed-up is below 0.7 never reached vanilla's best and enter at their bound (0.7)."""
    n_t = len(design.categories)
    logs = effect + rng.normal(0, 0.5, n_t)[:, None] + rng.normal(0, 0.4, (n_t, design.tpt_seeds))
    s = np.exp(logs)
    s = np.where(s < 0.7, 0.7, s)  # censored: only "below the bound" is known
    targets = np.repeat(np.arange(n_t), design.tpt_seeds)
    return verdicts.tpt_median_speedup(s.ravel(), targets).verdict


def _cells(design: Design, rng, effect: float):
    """Relative transfer per (source prompt, target) with task-level effects, seeds kept separate."""
    n_t, cats = len(design.categories), np.array(design.categories)
    src = rng.normal(0, 0.05, n_t)  # how well a source task's prompts transfer anywhere
    tgt = rng.normal(0, 0.05, n_t)  # how easy a target is to transfer to
    pair = rng.normal(0, 0.08, (n_t, n_t))  # a (source task, target) effect every seed of the source shares
    same = (cats[:, None] == cats[None, :]).astype(float)
    seed = rng.normal(0, 0.05, (n_t, n_t, design.seeds))
    return 0.6 + src[:, None, None] + tgt[None, :, None] + pair[:, :, None] + effect * same[:, :, None] + seed


def simulate_category(design: Design, rng, effect: float = 0.0, n_resamples: int = 999) -> Verdict:
    """Same- vs cross-category transfer, `effect` added to every same-category cell."""
    v = _cells(design, rng, effect)
    tasks = design.tasks
    n_t, n_s = v.shape[0], v.shape[2]
    s, t, _ = np.meshgrid(np.arange(n_t), np.arange(n_t), np.arange(n_s), indexing="ij")
    pairs = pd.DataFrame({"source_task": np.array(tasks)[s.ravel()], "target_task": np.array(tasks)[t.ravel()],
                          "relative_value": v.ravel()})
    cells = verdicts.task_cells(pairs)
    return verdicts.category_difference(cells, dict(zip(tasks, design.categories, strict=True)),
                                        n_resamples=n_resamples, seed=int(rng.integers(2**31))).verdict


def simulate_indicators(design: Design, rng, effect: float = 0.0, n_boot: int = 500) -> Verdict:
    """Two indicators of transfer with the same noise structure (a source task's offset shared across targets, a
    cell's noise, a seed's noise); `effect` shrinks the first one's noise (sd 0.3 -> 0.3 * (1 - effect))."""
    v = _cells(design, rng, 0.0)
    n_t, n_s = v.shape[0], v.shape[2]
    xs = []
    for sd in (0.3 * (1 - effect), 0.3):
        xs.append(v + rng.normal(0, sd, n_t)[:, None, None] + rng.normal(0, sd, (n_t, n_t))[:, :, None]
                  + rng.normal(0, sd / 2, v.shape))
    tasks = np.array(design.tasks)
    s, t, _ = np.meshgrid(np.arange(n_t), np.arange(n_t), np.arange(n_s), indexing="ij")
    pairs = pd.DataFrame({"source_task": tasks[s.ravel()], "target_task": tasks[t.ravel()], "y": v.ravel(),
                          "x1": xs[0].ravel(), "x2": xs[1].ravel()})
    return verdicts.correlation_difference(pairs, "x1", "x2", n_boot=n_boot, seed=int(rng.integers(2**31))).verdict


def simulate_own_vs_random(design: Design, rng, effect: float = 0.0, metric: str = "accuracy",
                           n_boot: int = 500) -> Verdict:
    """One target: the own prompt and `n_random` random prompts answer the same examples; an example's difficulty
    is shared by every prompt; `effect` raises the own prompt's log-odds of the right answer."""
    n, k = design.n_examples, 3
    labels = rng.integers(0, k, n)
    difficulty = rng.normal(0, 1.5, n)

    def answers(shift):
        right = rng.random(n) < 1 / (1 + np.exp(-(difficulty + shift)))
        return np.where(right, labels, (labels + rng.integers(1, k, n)) % k)

    own = answers(effect)
    rand = np.stack([answers(0.0) for _ in range(design.n_random)])
    return verdicts.own_vs_random(own, rand, labels, metric, n_boot=n_boot, seed=int(rng.integers(2**31))).verdict


QUESTIONS = {  # question -> (simulator, the stage that answers it, what `effect` means)
    "tpt": (simulate_tpt, "tpt", "median speed-up over targets"),
    "category": (simulate_category, "transfer", "same- minus cross-category transfer"),
    "indicators": (simulate_indicators, "indicators", "noise share the better indicator lacks"),
    "own_vs_random": (simulate_own_vs_random, "transfer", "own prompt's log-odds gain over random prompts"),
}


def verdict_rates(question: str, design: Design, n_studies: int, effect: float = 0.0, seed: int = 0,
                  **kw) -> dict:
    """{yes, no, inconclusive} fractions over `n_studies` simulated studies (fixed seed)."""
    sim = QUESTIONS[question][0]
    rng = np.random.default_rng(seed)
    got = [sim(design, rng, effect, **kw) for _ in range(n_studies)]
    return {v.value: got.count(v) / n_studies for v in Verdict}


def effect_scale(question: str, effect: float) -> float:
    """The effect in the units a reader knows (a speed-up for TPT; the simulator's units otherwise)."""
    return math.exp(effect) if question == "tpt" else effect


GRIDS = {"tpt": (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),  # log speed-ups: 1.1x to 20x
         "category": (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5),
         "indicators": (0.2, 0.4, 0.6, 0.8, 0.95), "own_vs_random": (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)}


PLAN_FAST = {"tpt": {}, "category": {"n_resamples": 199}, "indicators": {"n_boot": 200},
             "own_vs_random": {"n_boot": 50}}  # fewer resamples than the report: the planner is an estimate


def detectable_effect(question: str, design: Design, power: float = 0.8, n_studies: int = 40,
                      seed: int = 0) -> float | None:
    """The smallest effect on the question's grid whose "yes" rate reaches `power` (None: none on the grid).
    Power grows with the effect, so the grid is bisected: about three simulated batches a question."""
    grid = GRIDS[question]
    lo, hi, found = 0, len(grid) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if verdict_rates(question, design, n_studies, grid[mid], seed, **PLAN_FAST[question])["yes"] >= power:
            found, hi = grid[mid], mid - 1
        else:
            lo = mid + 1
    return found


def plan_lines(spec, n_studies: int = 40) -> list[str]:
    """Per question the spec's stages answer: the smallest effect detected with 80% power (by simulation, with
    the verdict code the report uses)."""
    design = design_of(spec)
    out = []
    for q, (_, stage, unit) in QUESTIONS.items():
        if stage not in spec.stages:
            continue
        e = detectable_effect(q, design, n_studies=n_studies)
        shown = "cannot answer it (no simulated effect gets 80% power)" if e is None else \
            f"80% power from {effect_scale(q, e):.3g}" + ("x" if q == "tpt" else "")
        out.append(f"{q} ({unit}): {shown}")
    if "transfer" in spec.stages and getattr(spec.transfer, "init_baseline", False):
        # each own prompt against its one untrained start: the same paired test with one baseline prompt
        e = detectable_effect("own_vs_random", dataclasses.replace(design, n_random=1), n_studies=n_studies)
        shown = "cannot answer it (no simulated effect gets 80% power)" if e is None else f"80% power from {e:.3g}"
        out.append(f"own_vs_init (own prompt's log-odds gain over its untrained start): {shown}")
    return out


ALTERNATIVES = {"tpt": math.log(2.0), "category": 0.1, "indicators": 0.6, "own_vs_random": 0.5}  # docs/findings.md


def calibration_table(n_studies: int = 400, seed: int = 11) -> list[dict]:
    """Per question and design: the false-verdict rate under the null and the "yes" rate at ALTERNATIVES."""
    rows = []
    for q in QUESTIONS:
        for name, design in (("findings", FINDINGS_DESIGN), ("paper", PAPER_DESIGN)):
            null = verdict_rates(q, design, n_studies, 0.0, seed)
            alt = verdict_rates(q, design, n_studies, ALTERNATIVES[q], seed + 1)
            rows.append({"question": q, "design": name, "false_verdict": null["yes"] + null["no"],
                         "alternative": effect_scale(q, ALTERNATIVES[q]), "power": alt["yes"]})
    return rows


if __name__ == "__main__":  # python -m ptx.power: the table in docs/findings.md
    for row in calibration_table():
        print(f"{row['question']:14s} {row['design']:9s} false verdicts {row['false_verdict']:.3f}  "
              f"power at {row['alternative']:.3g}: {row['power']:.3f}")
