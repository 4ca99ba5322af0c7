"""The study report's data: what the stages logged to MLflow, read back per section as DataFrames and plain values.

No HTML here: `ptx.report` renders what these functions return. Each section function takes a `Store` (the
tracker and experiment the report is about) and returns its section's data, or a `NotRun` when the stage has no
finished run in the experiment. Run records stay in the data (not only their ids) so that the report's footnotes
can describe a run without asking the store again.
"""

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ptx import track, verdicts
from ptx.config import Findings
from ptx.errors import PtxError, suggest
from ptx.findings import Finding, Verdict
from ptx.indicators import EMBEDDING_INDICATORS as EMBEDDING
from ptx.indicators import MAIN_ON as ON
from ptx.transfer import INIT, KIND_TPT, RANDOM, censored_speedups

log = logging.getLogger(__name__)
AT_INIT = 1e9  # the speed-up of a TPT run that starts at vanilla's best: above any finite one
DEFAULT_PRIMARY = Findings().primary  # the paper's claim: ON beats E_concat and E_avg
NO_PREDICTIONS = ("inconclusive: the transfer run logged no per-example predictions (transfer/predictions.parquet); "
                  "the paired test against several seeded random prompts needs them")


@dataclass
class Store:
    """One experiment (= study) of a tracker, and a scratch dir for the artifacts the report downloads."""

    tracker: object
    experiment: str
    exp_id: str
    tmp: Path
    primary: tuple = DEFAULT_PRIMARY  # the spec's primary indicator comparisons (findings.primary)


@dataclass
class NotRun:
    """A stage with no finished run in the experiment; `latest`: its newest unfinished run, if any."""

    stage: str
    latest: object | None = None


def open_store(tracker, experiment: str, tmp: Path, primary=None) -> Store:
    """The Store of `experiment`; a PtxError naming the experiments there when it does not exist."""
    exp_id = tracker.experiment_id_of(experiment)
    if exp_id is None:
        names = tracker.all_experiment_names()
        raise PtxError(f"experiment '{experiment}' does not exist in the MLflow store {tracker.uri}"
                       f"{suggest(experiment, names)} (found: {', '.join(names) or 'none'})")
    return Store(tracker, experiment, exp_id, Path(tmp), tuple(primary) if primary is not None else DEFAULT_PRIMARY)


def find_runs(store: Store, tags: dict, status: str | None = "FINISHED") -> list:
    """Runs of this experiment with these tags, newest first."""
    return store.tracker.find_runs(tags, status=status, order_by=["attributes.start_time DESC"],
                                   experiment_ids=[store.exp_id])


def latest_per_backbone(runs, study: str) -> dict:
    """backbone -> the newest run (runs of another study, e.g. a reference check, left out)."""
    out = {}
    for r in runs:
        if r.tags.get("ptx.study", study) == study:
            out.setdefault(r.tags.get("ptx.backbone", "?"), r)
    return out


def not_run(store: Store, stage: str, tags: dict) -> NotRun:
    """The stage's NotRun, with its newest unfinished run when there is one."""
    others = [r for r in find_runs(store, tags, status=None) if r.status != "FINISHED"]
    return NotRun(stage, others[0] if others else None)


def per_backbone(store: Store, kind: str, stage: str, path: str, read) -> dict | NotRun:
    """backbone -> read(store, backbone, run, folder) for the newest finished run of `kind` per backbone of this
    study (newest first), `folder` its downloaded artifact dir `path` (None when absent); the stage's NotRun when
    there is no such run."""
    tags = {"ptx.kind": kind}
    latest = latest_per_backbone(find_runs(store, tags), store.experiment)
    if not latest:
        return not_run(store, stage, tags)
    return {backbone: read(store, backbone, run, artifacts(store, run, path)) for backbone, run in latest.items()}


def artifacts(store: Store, run, path: str) -> Path | None:
    """Download one artifact directory of a run into the scratch dir (None, logged, when it is absent)."""
    dest = store.tmp / run.run_id / path.replace("/", "_")
    if dest.is_dir():
        return dest
    try:
        return store.tracker.download(run.run_id, path, dest)
    except PtxError as exc:
        log.warning("run %s: no artifact '%s' (%s)", run.run_id, path, exc)
        return None


def parquet(folder: Path | None, name: str) -> pd.DataFrame | None:
    """FOLDER/NAME as a DataFrame, None when there is no such file."""
    if folder is None or not (folder / name).is_file():
        return None
    return pd.read_parquet(folder / name)


def plain(obj):
    """JSON-safe facts: NaN becomes null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, Finding):
        return plain({**dataclasses.asdict(obj), "verdict": obj.verdict.value})
    if isinstance(obj, np.generic):
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


# ---- training -----------------------------------------------------------------------------------------
@dataclass
class Training:
    """The finished vanilla prompt runs, reduced to each seed's best run per (backbone, task)."""

    n_runs: int
    seeds: list  # every seed seen, in display order
    test_seeds: set  # the seeds whose best run logged a test score somewhere
    trials: int  # the most runs one (backbone, task, seed) had (a sweep may run several per seed)
    # one row per (backbone, category, task, seed), tasks sorted and seeds in display order: best_dev, test
    # (NaN when the best run logged none), run_id (the best run), trials
    cells: pd.DataFrame
    # one row per (backbone, category, task), sorted: metric (as its runs name it), mean_dev over its seeds
    tasks: pd.DataFrame
    runs: dict = field(default_factory=dict)  # run id -> record of every best run

    @property
    def facts(self) -> dict:
        return {"prompt_runs": self.n_runs, "tasks": self.tasks.task.nunique()}


def _metric_name(run) -> str:
    return next((k[4:] for k in run.metrics if k.startswith("dev_")), "metric")


def _dev(run) -> float:
    return run.metrics.get("best_dev_metric", -math.inf)


def _seed_order(s: str) -> tuple:
    return len(s), s  # numeric seeds logged as strings: 2 before 10


def training(store: Store) -> Training | NotRun:
    """Per (backbone, task): each seed's best finished vanilla prompt run."""
    runs = [r for r in find_runs(store, {"ptx.kind": track.KIND_PROMPT}) if track.is_vanilla(r)]
    if not runs:
        return not_run(store, "train", {"ptx.kind": track.KIND_PROMPT})
    best: dict = {}  # (backbone, category, task) -> {seed: [best run, trials]}
    for r in runs:
        t = r.tags
        cell = best.setdefault((t.get("ptx.backbone", "?"), t.get("ptx.category", ""), t.get("ptx.task", "?")),
                               {}).setdefault(t.get("ptx.seed", "?"), [r, 0])
        cell[0], cell[1] = max(cell[0], r, key=_dev), cell[1] + 1
    seeds = sorted({s for cells in best.values() for s in cells}, key=_seed_order)
    cells, tasks = [], []
    for (backbone, category, task), by_seed in sorted(best.items()):
        for s in seeds:
            if s in by_seed:
                r, n = by_seed[s]
                test = next((v for k, v in r.metrics.items() if k.startswith("test_")), None)
                cells.append({"backbone": backbone, "category": category, "task": task, "seed": s,
                              "best_dev": r.metrics.get("best_dev_metric", math.nan),
                              "test": math.nan if test is None else test, "has_test": test is not None,
                              "run_id": r.run_id, "trials": n})
        devs = [_dev(r) for r, _ in by_seed.values() if math.isfinite(_dev(r))]
        tasks.append({"backbone": backbone, "category": category, "task": task,
                      "metric": _metric_name(next(iter(by_seed.values()))[0]),
                      "mean_dev": float(np.mean(devs)) if devs else math.nan})
    cells = pd.DataFrame(cells)
    return Training(len(runs), seeds, set(cells.seed[cells.has_test]), int(cells.trials.max()),
                    cells.drop(columns="has_test"), pd.DataFrame(tasks),
                    {r.run_id: r for cells_ in best.values() for r, _ in cells_.values()})


# ---- transfer -----------------------------------------------------------------------------------------
def category_summary(df: pd.DataFrame, split: str) -> dict:
    """Mean relative transfer of same-category vs cross-category (source prompt, target) pairs, diagonal
    excluded, and of the random prompt: {group: {mean, n, mean_value}}."""
    d = df[df["split"] == split]
    bank = d[(d.source_prompt_run != RANDOM) & (d.source_task != d.target_task)]
    groups = {"same": bank[bank.source_category == bank.target_category],
              "cross": bank[bank.source_category != bank.target_category],
              "random": d[d.source_prompt_run == RANDOM]}
    out = {}
    for name, g in groups.items():
        rel = g.relative_value[np.isfinite(g.relative_value)]
        out[name] = {"mean": float(rel.mean()) if len(rel) else math.nan, "n": len(rel),
                     "mean_value": float(g.value.mean()) if len(g) else math.nan, "values": rel.to_numpy()}
    return out


def own_vs_random(df: pd.DataFrame, split: str, predictions: pd.DataFrame | None = None) -> list[dict]:
    """Every task's own prompts (one per seed) against the seeded random prompts on that task, paired on the same
    test examples (ptx.verdicts.own_vs_random: exact McNemar for accuracy, a paired bootstrap for macro-F1).

    `predictions`: long table target_task, split, source_prompt_run (a prompt run or random:<seed>), example,
    pred, label; without it (an older transfer run) every answer is inconclusive and says why.
    """
    d = df[df["split"] == split]
    rand = d[d.source_prompt_run == RANDOM].set_index("target_task")
    p = predictions[predictions.split == split] if predictions is not None else None
    out = []
    for r in d[(d.source_task == d.target_task) & (d.source_prompt_run != RANDOM)].itertuples():
        if r.target_task not in rand.index:
            continue
        base = rand.loc[r.target_task]
        n = int(getattr(r, "n_examples", 0) or 0)
        finding = Finding(float(r.value) - float(base.value), math.nan, math.nan, 0.0, Verdict.INCONCLUSIVE,
                          NO_PREDICTIONS, n)
        vs_init = {}
        if p is not None:
            g = p[p.target_task == r.target_task]
            own = g[g.source_prompt_run == r.source_prompt_run].sort_values("example")
            vs_init = own_vs_init(g, own, r)
            rnd = g[g.source_prompt_run.str.startswith(f"{RANDOM}:")].sort_values(["source_prompt_run", "example"])
            n_rand = rnd.source_prompt_run.nunique()
            if len(own) and n_rand and len(rnd) == n_rand * len(own):
                finding = verdicts.own_vs_random(own.pred.to_numpy(), rnd.pred.to_numpy().reshape(n_rand, -1),
                                                 own.label.to_numpy(), str(getattr(r, "metric", "accuracy")))
        row = {"target_task": r.target_task, "source_prompt_run": r.source_prompt_run, "own": float(r.value),
               "random": float(base.value), "n": n, "finding": finding}
        if vs_init:  # against every baseline family at once: the random prompts and the start
            vs_init["baselines"] = verdicts.own_vs_baselines([finding, vs_init["init_finding"]])
        out.append({**row, **vs_init})
    return sorted(out, key=lambda o: (o["target_task"], o["source_prompt_run"]))


def own_vs_init(g: pd.DataFrame, own: pd.DataFrame, r) -> dict:
    """The own prompt `r` (its answers `own`, by example) against its untrained start in its target's predictions
    `g` (init:<run>, when the transfer stage scored it: transfer.init_baseline), with the same paired test:
    {init, init_finding} or {} without it."""
    start = g[g.source_prompt_run == f"{INIT}:{r.source_prompt_run}"].sort_values("example")
    if not len(own) or len(start) != len(own):
        return {}
    from ptx.metrics import get_metric

    metric = str(getattr(r, "metric", "accuracy"))
    found = verdicts.own_vs_random(own.pred.to_numpy(), start.pred.to_numpy()[None], own.label.to_numpy(), metric,
                                   baseline="untrained start (the prompt's own init)")
    return {"init": float(get_metric(metric)(start.pred.tolist(), start.label.tolist())), "init_finding": found}


def category_finding(df: pd.DataFrame, split: str) -> Finding:
    """Same- vs cross-category transfer at the task level (ptx.verdicts.category_difference)."""
    d = df[(df["split"] == split) & (df.source_prompt_run != RANDOM)]
    cats = {**dict(zip(d.source_task, d.source_category, strict=True)),
            **dict(zip(d.target_task, d.target_category, strict=True))}
    return verdicts.category_difference(verdicts.task_cells(d), cats)


@dataclass
class TransferMatrix:
    """One backbone's latest transfer run; `table` is None when the run has no readable transfer table."""

    backbone: str
    run: object
    table: pd.DataFrame | None = None  # the long transfer table (ptx.transfer.SCHEMA)
    splits: list = field(default_factory=list)  # test and dev first, then any other
    split: str = ""  # the split the summary and verdicts use: test when there is one (dev chose the prompts)
    summary: dict = field(default_factory=dict)  # category_summary on `split`
    facts: dict = field(default_factory=dict)
    metrics: str = ""  # the metric names of the table, for a caption
    n_sources: int = 0  # bank prompts (the random prompt not counted)
    bank: pd.DataFrame | None = None  # one row per source prompt: source_task, source_category, source_prompt_run

    @property
    def missing(self) -> str | None:
        """What the run lacks for its section (None: nothing)."""
        return "no readable transfer/transfer.parquet" if self.table is None or self.table.empty else None


def transfer(store: Store) -> dict[str, TransferMatrix] | NotRun:
    """Per backbone (newest first): the latest transfer matrix, its category summary and verdicts."""
    return per_backbone(store, track.KIND_TRANSFER, "transfer", track.KIND_TRANSFER, _transfer_matrix)


def _transfer_matrix(store: Store, backbone: str, run, folder: Path | None) -> TransferMatrix:
    df = parquet(folder, "transfer.parquet")
    if df is None or df.empty:
        return TransferMatrix(backbone, run)
    splits = [s for s in ("test", "dev") if s in set(df.split)] + sorted(set(df.split) - {"test", "dev"})
    split = splits[0]
    summary = category_summary(df, split)
    facts = {"split": split, "run_id": run.run_id,
             **{f"{k}_{m}": v[m] for k, v in summary.items() for m in ("mean", "n")},
             "same_vs_cross": category_finding(df, split),
             "own_vs_random": own_vs_random(df, split, parquet(folder, "predictions.parquet"))}
    bank = df[(df.source_prompt_run != RANDOM)].drop_duplicates("source_prompt_run")
    return TransferMatrix(backbone, run, df, splits, split, summary, facts,
                          ", ".join(sorted(set(df.metric))) if "metric" in df else "score",
                          df[df.source_prompt_run != RANDOM].source_prompt_run.nunique(),
                          bank.sort_values(["source_category", "source_task"])[
                              ["source_task", "source_category", "source_prompt_run"]])


# ---- TPT ----------------------------------------------------------------------------------------------
def history(store: Store, run_id, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of one metric of a run, the last value per step, NaN dropped; [] for a deleted run."""
    try:
        points = store.tracker.metric_history(run_id, key)
    except Exception as exc:  # a deleted run: the curve is left out, the table still stands
        log.warning("run %s: no metric history '%s' (%s)", run_id, key, exc)
        return []
    by_step = {int(m.step): float(m.value) for m in points if math.isfinite(m.value)}
    return sorted(by_step.items())


def by_source_mode(records: list) -> dict:
    """TPT rows per source mode (tpt.sources), in the order the study listed them; one group for older tables."""
    out: dict = {}
    for r in records:
        out.setdefault(r.get("source_mode") or "source", []).append(r)
    return out


def speedups(records: list, suffix: str = "") -> list:
    """One speed-up per TPT run for the verdict: reached runs at their speed-up, a run that starts at vanilla's
    best far above any (AT_INIT), a run that never reached it at its censoring bound (<= 1); undefined runs out."""
    return [v for v, _ in speedup_runs(records, suffix)]


def speedup_runs(records: list, suffix: str = "") -> list[tuple[float, str]]:
    """(speed-up, target task) per TPT run with a defined speed-up, as `speedups` reads them."""
    out = []
    for r in records:
        flag, target = r.get(f"flag{suffix}"), r.get("target_task", "?")
        if flag == "ok":
            out.append((float(r[f"speedup{suffix}"]), target))
        elif flag == "tpt_at_init":
            out.append((AT_INIT, target))
        elif flag == "tpt_not_reached" and math.isfinite(float(r.get(f"speedup_bound{suffix}", math.nan))):
            out.append((float(r[f"speedup_bound{suffix}"]), target))
    return out


def tpt_verdict(records: list) -> Finding:
    """The TPT question's finding: the median over targets (each target's seeds reduced to their median) with the
    sign test's order-statistic interval (ptx.verdicts.tpt_median_speedup)."""
    runs = speedup_runs(records)
    return verdicts.tpt_median_speedup([v for v, _ in runs], [t for _, t in runs])


@dataclass
class CurvePanel:
    """One target's dev curves: every seed's (vanilla curve, TPT curve, vanilla's best or None)."""

    target: str
    source_task: str
    metric: str
    speedup: tuple | None  # (median_speedup, median_speedup_upper) of the aggregate table, when it has them
    runs: list


@dataclass
class TptResult:
    """One backbone's latest TPT run; `agg` None or empty, or `seeds` without flags: the run is unusable."""

    backbone: str
    run: object
    agg: pd.DataFrame | None  # tpt.parquet: one row per (target, source prompt)
    seeds: pd.DataFrame | None  # tpt_seeds.parquet: one row per (target, source prompt, seed)
    facts: dict = field(default_factory=dict)
    panels: list = field(default_factory=list)  # CurvePanel per target, when the seed table names the runs

    @property
    def missing(self) -> str | None:
        """What the run lacks for its section (None: nothing)."""
        if self.agg is None or self.agg.empty:
            return "no tpt/tpt.parquet"
        return "no per-seed table" if self.seeds is None or "flag" not in self.seeds else None


def curve_panels(store: Store, seeds: pd.DataFrame, agg: pd.DataFrame) -> list[CurvePanel]:
    """Per target: every seed's vanilla and TPT dev curves from the store."""
    panels = []
    for target in dict.fromkeys(seeds.target_task):
        g = seeds[seeds.target_task == target]
        runs = []
        for r in g.itertuples():
            key = f"dev_{r.metric}"
            vanilla, tpt = (history(store, run, key) if isinstance(run, str) else []
                            for run in (getattr(r, "vanilla_run", None), getattr(r, "tpt_run", None)))
            best = getattr(r, "vanilla_best", None)
            runs.append((vanilla, tpt, best if isinstance(best, float) else None))
        a = agg[agg.target_task == target]
        speed = tuple(a[["median_speedup", "median_speedup_upper"]].iloc[0]) if len(a) and "median_speedup" in a \
            else None
        panels.append(CurvePanel(target, g.source_task.iloc[0] if "source_task" in g else "?", g.metric.iloc[0],
                                 speed, runs))
    return panels


def tpt(store: Store) -> dict[str, TptResult] | NotRun:
    """Per backbone (newest first): the latest TPT run's tables, speed-up facts and dev curves."""
    return per_backbone(store, KIND_TPT, "TPT", KIND_TPT, _tpt_result)


def _tpt_result(store: Store, backbone: str, run, folder: Path | None) -> TptResult:
    res = TptResult(backbone, run, parquet(folder, "tpt.parquet"), parquet(folder, "tpt_seeds.parquet"))
    if res.missing:
        return res
    records = res.seeds.to_dict("records")
    overall, overall90 = censored_speedups(records), censored_speedups(records, "_90")
    res.facts = {"run_id": run.run_id, "targets": len(res.agg), **overall,
                 **{f"{k}_90": v for k, v in overall90.items()},
                 "median_range": verdicts.median_range(speedups(records)),
                 "by_source": {mode: {**censored_speedups(g), "finding": tpt_verdict(g)}
                               for mode, g in by_source_mode(records).items()}}
    if {"vanilla_run", "tpt_run", "metric", "target_task"} <= set(res.seeds.columns):
        res.panels = curve_panels(store, res.seeds, res.agg)
    return res


# ---- indicators ---------------------------------------------------------------------------------------
def parse_comparison(text: str) -> tuple[str, str]:
    """'on vs e_avg_cos' -> ('on', 'e_avg_cos')."""
    a, sep, b = text.partition(" vs ")
    if not sep or not a.strip() or not b.strip():
        raise PtxError(f"findings.primary: '{text}' is not a comparison; expected 'INDICATOR vs INDICATOR'")
    return a.strip(), b.strip()


def indicator_findings(pairs: pd.DataFrame, primary=DEFAULT_PRIMARY) -> dict:
    """The declared primary comparisons (Holm across them) and, labelled exploratory, ON vs every other embedding
    similarity, each a ptx.verdicts.correlation_difference over seed-averaged (source task, target) cells."""
    primary = [parse_comparison(c) for c in primary]
    have = [c for c in primary if {*c} <= set(pairs.columns)]
    named = {f"{a} vs {b}": verdicts.correlation_difference(pairs, a, b) for a, b in have}
    explore = {f"on vs {e}": verdicts.correlation_difference(pairs, "on", e) for e in EMBEDDING
               if e in pairs.columns and ("on", e) not in have and "on" in pairs.columns}
    return {"primary": verdicts.holm(named), "exploratory": explore,
            "primary_missing": [f"{a} vs {b}" for a, b in primary if (a, b) not in have]}


def indicator_order(summary: pd.DataFrame) -> list[str]:
    """The indicators of a correlations table in display order: ON, then the embeddings, each beside its
    displacement variant, then the rest sorted."""
    order = [v for n in (*ON, *EMBEDDING) for v in (n, f"{n}_disp") if v in set(summary.indicator)]
    return order + sorted(set(summary.indicator) - set(order))


@dataclass
class IndicatorResult:
    """One backbone's latest indicators run; `summary` None or empty: the run has no correlations table."""

    backbone: str
    run: object
    summary: pd.DataFrame | None  # tables/correlations.parquet
    pairs: pd.DataFrame | None = None  # tables/pairs.parquet: one row per (source prompt, target)
    windows: pd.DataFrame | None = None  # tables/correlations_windows.parquet: ON per layer and layer window
    facts: dict = field(default_factory=dict)

    @property
    def missing(self) -> str | None:
        """What the run lacks for its section (None: nothing)."""
        return "no tables/correlations.parquet" if self.summary is None or self.summary.empty else None


def indicators(store: Store) -> dict[str, IndicatorResult] | NotRun:
    """Per backbone (newest first): the indicator-transfer correlations, the best embedding similarity, the verdicts."""
    return per_backbone(store, track.KIND_INDICATORS, "indicators", "tables", _indicator_result)


def _indicator_result(store: Store, backbone: str, run, folder: Path | None) -> IndicatorResult:
    summary = parquet(folder, "correlations.parquet")
    if summary is None or summary.empty:
        return IndicatorResult(backbone, run, summary)
    sp = summary[summary.method == "spearman"].set_index("indicator")
    emb = sp[sp.index.isin(EMBEDDING)].dropna(subset=["mean_over_targets"])
    fact = {"run_id": run.run_id}
    if "on" in sp.index:
        fact.update(on=float(sp.loc["on", "mean_over_targets"]), on_ci=[float(sp.loc["on", "ci_low"]),
                                                                           float(sp.loc["on", "ci_high"])])
    if len(emb):
        top = emb.mean_over_targets.idxmax()
        fact.update(embedding=top, embedding_rho=float(emb.loc[top, "mean_over_targets"]),
                    embedding_ci=[float(emb.loc[top, "ci_low"]), float(emb.loc[top, "ci_high"])])
    pairs = parquet(folder, "pairs.parquet")
    if pairs is not None and "on" in fact:
        fact.update(indicator_findings(pairs, store.primary))
    return IndicatorResult(backbone, run, summary, pairs, parquet(folder, "correlations_windows.parquet"), fact)


# ---- projector ----------------------------------------------------------------------------------------
@dataclass
class ProjectorResult:
    """The latest finished projector stage run: skipped (with its reason) or its projectors and result tables."""

    run: object
    skipped: str | None = None
    models: list = field(default_factory=list)  # the projector runs of this stage run
    zero_shot: pd.DataFrame | None = None  # test rows when there are any; held_out and same_task as bool
    objectives: list = field(default_factory=list)  # of zero_shot, sorted
    tpt: pd.DataFrame | None = None  # TPT on the target from the held-out projected prompt
    facts: dict = field(default_factory=dict)


def projector(store: Store) -> ProjectorResult | NotRun:
    """The latest projector stage: its skip reason, or projectors, zero-shot results and TPT on the target."""
    stage = [r for r in find_runs(store, {"ptx.stage": "projector"}, status=None)
             if r.tags.get("ptx.kind") in ("stage", track.KIND_PROJECTOR)]
    stage += [r for r in find_runs(store, {"ptx.kind": track.KIND_PROJECTOR}, status=None)
              if "ptx.objective" not in r.tags and r not in stage]  # a stage run logged as kind=projector
    done = sorted((r for r in stage if r.status == "FINISHED"), key=lambda r: -r.start_time)
    if not done:
        return not_run(store, "projector", {"ptx.stage": "projector"})
    run = done[0]
    if run.tags.get("ptx.skipped") == "true":
        reason = run.tags.get("ptx.skip_reason", "no reason recorded")
        return ProjectorResult(run, reason, facts={"skipped": reason, "run_id": run.run_id})
    folder = artifacts(store, run, "tables")
    zs, tpt_ = parquet(folder, "projector_zero_shot.parquet"), parquet(folder, "projector_tpt.parquet")
    models = [r for r in find_runs(store, {"ptx.kind": track.KIND_PROJECTOR}) if "ptx.objective" in r.tags
              and r.tags.get("mlflow.parentRunId") in (None, run.run_id)]
    res = ProjectorResult(run, None, models, facts={"run_id": run.run_id})
    if zs is not None and not zs.empty:
        zs = zs[zs.split == "test"] if (zs.split == "test").any() else zs  # dev picked the objective; test reports
        if "held_out" not in zs:  # a table from before the held-out protocol: none of its rows is known held out
            zs = zs.assign(held_out=False)
        res.zero_shot = zs = zs.assign(held_out=zs.held_out.astype(bool), same_task=zs.same_task.astype(bool))
        res.objectives = sorted(o for o in zs.objective.dropna().unique())
        same = zs[(zs.prompt == "projected") & zs.same_task & zs.held_out]
        res.facts["best_objective"] = run.tags.get("ptx.best_objective")
        res.facts.update(own=float(zs[zs.prompt == "own"].value.mean()),
                         random=float(zs[zs.prompt == "random"].value.mean()),
                         projected={o: float(same[same.objective == o].value.mean()) for o in res.objectives
                                    if (same.objective == o).any()})
    if tpt_ is not None and not tpt_.empty:
        res.tpt = tpt_
        res.facts["tpt"] = censored_speedups(tpt_.to_dict("records"))
    return res
