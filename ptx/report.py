"""The study report: one static index.html built from what the stages logged to MLflow.

Everything is local: figures are PNGs beside index.html (fig/), CSS is inline, there is no external URL and no
JS framework (one inline script only counts the images that loaded, for the headless-browser check). Figures are
drawn here from the logged tables, not copied from the stages, so they share one style. Every number names the
MLflow run it came from: the run id is printed beside it and the footnotes say how to fetch that run.
"""

import dataclasses
import html
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ptx import __version__, figures, track, verdicts
from ptx.config import Findings
from ptx.errors import PtxError, suggest
from ptx.findings import Finding, Verdict
from ptx.indicators import EMBEDDING_INDICATORS as EMBEDDING
from ptx.indicators import MAIN_ON as ON
from ptx.io import atomic_dir, write_json
from ptx.projector import NOT_TESTABLE
from ptx.transfer import INIT, KIND_TPT, RANDOM, censored_speedups

log = logging.getLogger(__name__)
MARKER = '<meta name="generator" content="ptx report">'  # an existing out dir is only replaced when it is a report
esc = html.escape


# ---- small helpers ------------------------------------------------------------------------------------
def _num(v, digits: int = 3, suffix: str = "") -> str:
    """A number for a table or sentence ('—' when missing)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}{suffix}" if isinstance(v, float | np.floating) else f"{v}{suffix}"


def _speed(lo, hi=None) -> str:
    """A censored median speed-up: one figure when both bounds agree, else the interval it lies in."""
    def one(v):
        return "∞×" if isinstance(v, float | np.floating) and v >= AT_INIT else _num(v, 2, "×")
    if hi is None or lo == hi or (isinstance(lo, float) and isinstance(hi, float) and math.isnan(lo) and math.isnan(hi)):
        return one(lo)
    return f"{one(lo)} to {one(hi)}"


AT_INIT = 1e9  # the speed-up of a TPT run that starts at vanilla's best: above any finite one


def _bound(v) -> str:
    """An interval end: '∞' for a TPT speed-up at init, else the number."""
    return "∞" if isinstance(v, float | np.floating) and v >= AT_INIT else _num(v)


def _ci(mean, lo, hi) -> str:
    return f"{_bound(mean)} [{_bound(lo)}, {_bound(hi)}]"


def _table(head: list[str], rows: list[list], source: str | None = None) -> str:
    """An HTML table; str cells are HTML already (escape text with esc), numbers are formatted right-aligned;
    `source`: the cited run every number of the table came from (a caption)."""
    caption = f"<caption>all numbers from run {source}</caption>" if source else ""
    out = [f"<div class='scroll'><table>{caption}<thead><tr>", *(f"<th>{h}</th>" for h in head),
           "</tr></thead><tbody>"]
    for row in rows:
        cells = [f"<td class='n'>{_num(c)}</td>" if isinstance(c, int | float | np.number) and not isinstance(c, bool)
                 else f"<td>{c}</td>" for c in row]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table></div>"


def _figure(ctx, fig, name: str, caption: str) -> str:
    """Save a matplotlib Figure as fig/NAME.png; returns the <figure> HTML."""
    figures.save(fig, ctx.fig / name)
    return f"<figure><img src='fig/{esc(name)}' alt='{esc(caption)}'><figcaption>{caption}</figcaption></figure>"


def _slug(*parts) -> str:
    return "_".join("".join(c if c.isalnum() or c in "-." else "-" for c in str(p)) for p in parts)


@dataclass
class Sources:
    """The runs the report cites, numbered in order of first citation (the footnotes)."""

    known: dict = field(default_factory=dict)  # run id -> MLflow run, to describe it in its footnote
    cited: dict = field(default_factory=dict)  # run id -> footnote number

    def cite(self, run) -> str:
        """Inline HTML: the run id linked to its footnote."""
        rid = run if isinstance(run, str) else run.run_id
        if not isinstance(run, str):
            self.known.setdefault(rid, run)
        n = self.cited.setdefault(rid, len(self.cited) + 1)
        return f"<a class='run' href='#run-{esc(rid)}'>{esc(rid)}</a><sup>{n}</sup>"

    def footnotes(self, tracker) -> str:
        """The numbered list of cited runs, each with the command that fetches it."""
        items, uri = [], tracker.uri
        for rid, n in sorted(self.cited.items(), key=lambda kv: kv[1]):
            run = self.known.get(rid)
            if run is None:  # cited by id from a table (a source prompt, a TPT run): ask the store what it is
                try:
                    run = tracker.get_run(rid)
                except PtxError:
                    log.warning("cited run %s is not in the store %s", rid, uri)
            tags = run.tags if run is not None else {}
            kind = tags.get("ptx.kind", "")
            what = ", ".join(esc(x) for x in (kind, run.name if run else "", tags.get("ptx.backbone"))
                             if x)
            cmd = (f"ptx prompts get {rid} -o prompt-{rid[:8]} --tracking-uri {uri}" if kind == track.KIND_PROMPT
                   else f"MLFLOW_TRACKING_URI={uri} mlflow artifacts download -r {rid} -d run-{rid[:8]}")
            items.append(f"<li id='run-{esc(rid)}' value='{n}'><code>{esc(rid)}</code> {what}<br>"
                         f"<span class='cmd'>{esc(cmd)}</span></li>")
        return "<ol class='sources'>" + "".join(items) + "</ol>"


@dataclass
class _Ctx:
    tracker: object
    experiment: str
    exp_id: str
    tmp: Path
    fig: Path
    sources: Sources = field(default_factory=Sources)
    facts: dict = field(default_factory=dict)  # headline numbers (summary.json and the Findings box)
    status: dict = field(default_factory=dict)  # section id -> (state, one line)
    primary: tuple = ()  # the spec's primary indicator comparisons (findings.primary); set by build_report


def _runs(ctx, tags: dict, status: str | None = "FINISHED") -> list:
    """Runs of this experiment with these tags, newest first."""
    return ctx.tracker.find_runs(tags, status=status, order_by=["attributes.start_time DESC"],
                                 experiment_ids=[ctx.exp_id])


def _latest_per_backbone(runs, study: str) -> dict:
    """backbone -> the newest run (runs of another study, e.g. a reference check, left out)."""
    out = {}
    for r in runs:
        if r.tags.get("ptx.study", study) == study:
            out.setdefault(r.tags.get("ptx.backbone", "?"), r)
    return out


def _not_run(ctx, section: str, stage: str, tags: dict) -> str:
    """The 'not run' notice, naming an unfinished run of the stage when there is one."""
    others = [r for r in _runs(ctx, tags, status=None) if r.status != "FINISHED"]
    why = f"not run: the {stage} stage has no finished run in this experiment"
    if others:
        why += f" (latest: a {others[0].status} run, {ctx.sources.cite(others[0])})"
    ctx.status[section] = ("missing", "not run")
    return f"<p class='notrun'>{why}.</p>"


def _artifacts(ctx, run, path: str) -> Path | None:
    """Download one artifact directory of a run into the scratch dir (None, logged, when it is absent)."""
    dest = ctx.tmp / run.run_id / path.replace("/", "_")
    if dest.is_dir():
        return dest
    try:
        return ctx.tracker.download(run.run_id, path, dest)
    except PtxError as exc:
        log.warning("run %s: no artifact '%s' (%s)", run.run_id, path, exc)
        return None


def _parquet(folder: Path | None, name: str) -> pd.DataFrame | None:
    if folder is None or not (folder / name).is_file():
        return None
    return pd.read_parquet(folder / name)


# ---- training -----------------------------------------------------------------------------------------
def _metric_name(run) -> str:
    return next((k[4:] for k in run.metrics if k.startswith("dev_")), "metric")


def _dev(run) -> float:
    return run.metrics.get("best_dev_metric", -math.inf)


def training_section(ctx) -> str:
    """Per (backbone, task): each seed's best dev score (and test score) from the finished vanilla prompt runs."""
    runs = [r for r in _runs(ctx, {"ptx.kind": track.KIND_PROMPT}) if track.is_vanilla(r)]
    if not runs:
        return _not_run(ctx, "training", "train", {"ptx.kind": track.KIND_PROMPT})
    best: dict = {}  # (backbone, category, task) -> {seed: [best run, trials]}: a sweep may run several per seed
    for r in runs:
        t = r.tags
        cell = best.setdefault((t.get("ptx.backbone", "?"), t.get("ptx.category", ""), t.get("ptx.task", "?")),
                               {}).setdefault(t.get("ptx.seed", "?"), [r, 0])
        cell[0], cell[1] = max(cell[0], r, key=_dev), cell[1] + 1
    seeds = sorted({s for cells in best.values() for s in cells}, key=lambda s: (len(s), s))
    tests = {s for cells in best.values() for s, (r, _) in cells.items() if any(k.startswith("test_") for k in
                                                                                r.metrics)}
    rows = []
    for (backbone, category, task), cells in sorted(best.items()):
        row = [esc(backbone), esc(task), esc(category), esc(_metric_name(next(iter(cells.values()))[0]))]
        for s in seeds:
            m = cells[s][0].metrics if s in cells else {}
            row.append(m.get("best_dev_metric", math.nan))
            if s in tests:
                row.append(next((v for k, v in m.items() if k.startswith("test_")), math.nan))
        devs = [_dev(r) for r, _ in cells.values() if math.isfinite(_dev(r))]
        rows.append([*row, float(np.mean(devs)) if devs else math.nan,
                     "<br>".join(f"s{s}: {ctx.sources.cite(cells[s][0])}" for s in seeds if s in cells)])
    head = ["backbone", "task", "category", "metric"]
    for s in seeds:
        head += [f"seed {esc(s)}<br>best dev", *([f"seed {esc(s)}<br>test"] if s in tests else [])]
    trials = max(n for cells in best.values() for _, n in cells.values())
    n_tasks = len({k[2] for k in best})
    ctx.status["training"] = ("ok", f"{len(runs)} prompt runs")
    ctx.facts["training"] = {"prompt_runs": len(runs), "tasks": n_tasks}
    return (f"<p>{len(runs)} finished prompt runs over {n_tasks} tasks and {len(seeds)} seed(s). Per (backbone, task):"
            " each seed's best dev score" + (f" (the best of up to {trials} trials of that seed)" if trials > 1 else "")
            + ("; test scores where the run logged one" if tests else "; no run logged a test score") + ".</p>"
            + _table([*head, "mean dev", "runs"], rows))


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


NO_PREDICTIONS = ("inconclusive: the transfer run logged no per-example predictions (transfer/predictions.parquet); "
                  "the paired test against several seeded random prompts needs them")


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
        if p is not None:
            g = p[p.target_task == r.target_task]
            own = g[g.source_prompt_run == r.source_prompt_run].sort_values("example")
            rnd = g[g.source_prompt_run.str.startswith(f"{RANDOM}:")].sort_values(["source_prompt_run", "example"])
            n_rand = rnd.source_prompt_run.nunique()
            if len(own) and n_rand and len(rnd) == n_rand * len(own):
                finding = verdicts.own_vs_random(own.pred.to_numpy(), rnd.pred.to_numpy().reshape(n_rand, -1),
                                                 own.label.to_numpy(), str(getattr(r, "metric", "accuracy")))
        row = {"target_task": r.target_task, "source_prompt_run": r.source_prompt_run, "own": float(r.value),
               "random": float(base.value), "n": n, "finding": finding}
        vs_init = _own_vs_init(p, r)
        if vs_init:  # against every baseline family at once: the random prompts and the start
            vs_init["baselines"] = verdicts.own_vs_baselines([finding, vs_init["init_finding"]])
        out.append({**row, **vs_init})
    return sorted(out, key=lambda o: (o["target_task"], o["source_prompt_run"]))


def _init_paragraph(bb: str, f: dict, own: list) -> list[str]:
    """The own prompts against their untrained starts and against every baseline at once (a list of one
    paragraph, or none when the transfer run scored no starts)."""
    with_init = [o for o in own if "init_finding" in o]
    if not with_init:
        return []
    esc = html.escape
    beat = [o for o in with_init if o["init_finding"].verdict == Verdict.YES]
    every = [o for o in with_init if o["baselines"] == Verdict.YES]
    lost = [o for o in with_init if o["init_finding"].verdict == Verdict.NO]
    word = ("Yes" if len(beat) == len(with_init) else "No" if len(lost) == len(with_init) else "Partly" if beat
            else "Inconclusive")
    rest = "; ".join(f"{esc(o['target_task'])} {_num(o['own'])} vs its start {_num(o['init'])}, difference "
                     f"{_finding(o['init_finding'])}" for o in with_init if o not in beat)
    return [f"<b>Did tuning improve on the untrained start? {word}</b> on {esc(bb)} ({esc(f['split'])} split): "
            f"{len(beat)} of {len(with_init)} own-task prompts beat their own untrained start on the same test "
            f"examples ({esc(with_init[0]['init_finding'].test)}); {len(every)} of {len(with_init)} beat every "
            "baseline (the seeded random prompts and the start; yes only when each family is beaten)"
            + (f"; not: {rest}" if rest else "") + "."]


def _own_vs_init(p: pd.DataFrame | None, r) -> dict:
    """The own prompt `r` against its untrained start (predictions' init:<run>, when the transfer stage scored it:
    transfer.init_baseline), with the same paired test: {init, init_finding} or {} without it."""
    if p is None:
        return {}
    g = p[p.target_task == r.target_task]
    own = g[g.source_prompt_run == r.source_prompt_run].sort_values("example")
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


def transfer_section(ctx) -> str:
    """Per backbone: heatmaps of the latest transfer matrix, and same- vs cross-category transfer."""
    tags = {"ptx.kind": track.KIND_TRANSFER}
    latest = _latest_per_backbone(_runs(ctx, tags), ctx.experiment)
    if not latest:
        return _not_run(ctx, "transfer", "transfer", tags)
    parts, facts = [], {}
    for backbone, run in sorted(latest.items()):
        df = _parquet(_artifacts(ctx, run, track.KIND_TRANSFER), "transfer.parquet")
        cite = ctx.sources.cite(run)
        if df is None or df.empty:
            parts.append(f"<h3>{esc(backbone)}</h3><p class='notrun'>transfer run {cite} has no readable "
                         "transfer/transfer.parquet.</p>")
            continue
        splits = [s for s in ("test", "dev") if s in set(df.split)] + sorted(set(df.split) - {"test", "dev"})
        split = splits[0]  # test when there is one: dev chose the prompts
        summary = category_summary(df, split)
        facts[backbone] = {"split": split, "run_id": run.run_id,
                           **{f"{k}_{m}": v[m] for k, v in summary.items() for m in ("mean", "n")},
                           "same_vs_cross": category_finding(df, split),
                           "own_vs_random": own_vs_random(df, split, _parquet(_artifacts(ctx, run, track.KIND_TRANSFER),
                                                                              "predictions.parquet"))}
        metrics = ", ".join(sorted(set(df.metric))) if "metric" in df else "score"
        n_src = df[df.source_prompt_run != RANDOM].source_prompt_run.nunique()
        parts.append(f"<h3>{esc(backbone)}</h3><p>Zero-shot transfer of every bank prompt (columns) to every task "
                     f"(rows), from transfer run {cite}; {n_src} source prompts, {df.target_task.nunique()} targets, "
                     f"metric: {esc(metrics)}. Outlined cells: a task's own prompt; black lines separate categories."
                     "</p>")
        for i, s in enumerate(splits):
            d = df[df.split == s]
            figs = []
            for column, kind, cbar, centre in figures.HEATMAP_PANELS:  # the transfer stage's PNG has the same two
                n_c = d.source_task.nunique()
                fig = figures.new_figure(*figures.heatmap_size(d))
                figures.heatmap(fig.subplots(), d, column, f"{backbone} · {s} split · {kind} transfer",
                                cbar.format(metric=metrics), centre)
                figs.append(_figure(ctx, fig, f"transfer_{_slug(backbone, s, kind)}.png",
                                    f"{esc(backbone)}, {esc(s)} split, {kind} (run {esc(run.run_id)})"))
            block = f"<div class='{'grid2' if n_c <= 6 else 'stack'}'>" + "".join(figs) + "</div>"
            parts.append(block if i == 0 else f"<details><summary>{esc(s)} split heatmaps</summary>{block}</details>")
        rows = [[label, summary[k]["mean"], summary[k]["n"], summary[k]["mean_value"]]
                for k, label in (("same", "same category (off-diagonal)"), ("cross", "cross category"),
                                 ("random", "random prompt"))]
        fig = figures.new_figure(5.2, 3.4)
        figures.group_bars(fig.subplots(), summary, f"{backbone} · {split} split")
        parts.append(f"<h4>Same-category vs cross-category transfer ({esc(split)} split)</h4><div class='grid2'>"
                     + _table(["source → target pairs", "mean relative", "pairs", "mean score"], rows, cite)
                     + _figure(ctx, fig, f"categories_{_slug(backbone, split)}.png",
                               "relative transfer per (source prompt, target) pair; bars: means") + "</div>")
        bank = df[(df.source_prompt_run != RANDOM)].drop_duplicates("source_prompt_run")
        parts.append("<details><summary>source prompts of this matrix</summary>" + _table(
            ["source task", "category", "prompt run"],
            [[esc(r.source_task), esc(r.source_category), ctx.sources.cite(r.source_prompt_run)]
             for r in bank.sort_values(["source_category", "source_task"]).itertuples()]) + "</details>")
    ctx.facts["transfer"] = facts
    ctx.status["transfer"] = ("ok", ", ".join(latest))
    return "".join(parts)


# ---- TPT ----------------------------------------------------------------------------------------------
def _history(ctx, run_id, key: str) -> list[tuple[int, float]]:
    try:
        points = ctx.tracker.metric_history(run_id, key)
    except Exception as exc:  # a deleted run: the curve is left out, the table still stands
        log.warning("run %s: no metric history '%s' (%s)", run_id, key, exc)
        return []
    by_step = {int(m.step): float(m.value) for m in points if math.isfinite(m.value)}
    return sorted(by_step.items())


def _curve_panels(ctx, seeds: pd.DataFrame, agg: pd.DataFrame) -> list:
    """figures.convergence_grid's panels: per target, every seed's vanilla and TPT dev curves from MLflow."""
    panels = []
    for target in dict.fromkeys(seeds.target_task):
        g = seeds[seeds.target_task == target]
        runs = []
        for r in g.itertuples():
            key = f"dev_{r.metric}"
            vanilla, tpt = (_history(ctx, run, key) if isinstance(run, str) else []
                            for run in (getattr(r, "vanilla_run", None), getattr(r, "tpt_run", None)))
            best = getattr(r, "vanilla_best", None)
            runs.append((vanilla, tpt, best if isinstance(best, float) else None))
        a = agg[agg.target_task == target]
        speed = _speed(*a[["median_speedup", "median_speedup_upper"]].iloc[0]) if len(a) and "median_speedup" in a else "—"
        src = g.source_task.iloc[0] if "source_task" in g else "?"
        panels.append((f"{target} ← {src}: median {speed}", g.metric.iloc[0], runs))
    return panels


def _by_source_mode(records: list) -> dict:
    """TPT rows per source mode (tpt.sources), in the order the study listed them; one group for older tables."""
    out: dict = {}
    for r in records:
        out.setdefault(r.get("source_mode") or "source", []).append(r)
    return out


def _speedups(records: list, suffix: str = "") -> list:
    """One speed-up per TPT run for the verdict: reached runs at their speed-up, a run that starts at vanilla's
    best far above any (AT_INIT), a run that never reached it at its censoring bound (<= 1); undefined runs out."""
    return [v for v, _ in _speedup_runs(records, suffix)]


def _speedup_runs(records: list, suffix: str = "") -> list[tuple[float, str]]:
    """(speed-up, target task) per TPT run with a defined speed-up, as `_speedups` reads them."""
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
    runs = _speedup_runs(records)
    return verdicts.tpt_median_speedup([v for v, _ in runs], [t for _, t in runs])


def _median_cell(records: list, suffix: str = "") -> str:
    """The table's median speed-up: the same statistic as the finding's (a range for an even count)."""
    return _speed(*verdicts.median_range(_speedups(records, suffix))) if _speedups(records, suffix) else "—"


def tpt_section(ctx) -> str:
    """Per backbone: the TPT speed-up table and the dev curves of its vanilla and TPT runs."""
    tags = {"ptx.kind": KIND_TPT}
    latest = _latest_per_backbone(_runs(ctx, tags), ctx.experiment)
    if not latest:
        return _not_run(ctx, "tpt", "TPT", tags)
    parts, facts = [], {}
    for backbone, run in sorted(latest.items()):
        folder = _artifacts(ctx, run, KIND_TPT)
        agg, seeds = _parquet(folder, "tpt.parquet"), _parquet(folder, "tpt_seeds.parquet")
        cite = ctx.sources.cite(run)
        if agg is None or agg.empty:
            parts.append(f"<h3>{esc(backbone)}</h3><p class='notrun'>TPT run {cite} has no tpt/tpt.parquet.</p>")
            continue
        if seeds is None or "flag" not in seeds:
            parts.append(f"<h3>{esc(backbone)}</h3><p class='notrun'>TPT run {cite} has no per-seed table.</p>")
            continue
        records = seeds.to_dict("records")
        overall, overall90 = censored_speedups(records), censored_speedups(records, "_90")
        facts[backbone] = {"run_id": run.run_id, "targets": len(agg), **overall,
                           **{f"{k}_90": v for k, v in overall90.items()},
                           "median_range": verdicts.median_range(_speedups(records)),
                           "by_source": {mode: {**censored_speedups(g), "finding": tpt_verdict(g)}
                                         for mode, g in _by_source_mode(records).items()}}
        parts.append(f"<h3>{esc(backbone)}</h3><p>Prompt tuning started from a transferred prompt (TPT) beside "
                     f"vanilla prompt tuning, same seeds; TPT run {cite}. Speed-up = steps vanilla needs to reach "
                     "its best dev score ÷ steps TPT needs to reach it. No run is dropped: a TPT run that never "
                     "reaches vanilla's best is censored (its speed-up is below vanilla's steps ÷ TPT's budget) and "
                     "enters the median at that bound, which keeps its side of 1; one that starts there counts as "
                     "infinitely fast. An even count's median is the range between its two middle runs; the table "
                     "and the findings print the same median. The mean is over the runs that reached it after step "
                     f"0 only. Overall: reached in {overall['n_reached']} of {overall['n_runs']} runs, median "
                     f"{_speed(*facts[backbone]['median_range'])}, mean over reaching runs "
                     f"{_num(overall['mean_speedup_reached'], 2, '×')}.</p>")
        rows = []
        for r in agg.itertuples():
            runs = seeds[(seeds.target_task == r.target_task) & (seeds.source_prompt_run == r.source_prompt_run)]
            ids = " ".join(ctx.sources.cite(x) for c in ("vanilla_run", "tpt_run") if c in runs
                           for x in runs[c].dropna())
            per = censored_speedups(runs.to_dict("records"))
            rows.append([esc(r.target_task), esc(r.source_task), ctx.sources.cite(r.source_prompt_run),
                         r.vanilla_best, r.tpt_best, f"{per['n_reached']}/{per['n_runs']}",
                         _median_cell(runs.to_dict("records")), _num(per["mean_speedup_reached"], 2, "×"),
                         _median_cell(runs.to_dict("records"), "_90"),
                         esc(str(getattr(r, "flags", ""))), ids or cite])
        parts.append(_table(["target", "source task", "source prompt", "vanilla best", "TPT best", "reached",
                             "median speed-up", "mean speed-up (reaching runs)", "median @90%", "flags",
                             "runs (vanilla, TPT)"], rows))
        if seeds is not None and {"vanilla_run", "tpt_run", "metric", "target_task"} <= set(seeds.columns):
            n = seeds.target_task.nunique()
            fig = figures.new_figure(*figures.convergence_size(n))
            if figures.convergence_grid(fig, _curve_panels(ctx, seeds, agg), f"{backbone}: dev score while tuning, "
                                        "vanilla PT vs TPT (dashed: vanilla's best)"):
                parts.append(_figure(ctx, fig, f"tpt_{_slug(backbone)}.png",
                                     f"dev curves of the runs in the table above (TPT run {esc(run.run_id)})"))
    ctx.facts["tpt"] = facts
    ctx.status["tpt"] = ("ok", ", ".join(latest))
    return "".join(parts)


# ---- indicators ---------------------------------------------------------------------------------------
DEFAULT_PRIMARY = Findings().primary  # the paper's claim: ON beats E_concat and E_avg


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


def indicators_section(ctx) -> str:
    """Per backbone: the indicator-transfer correlations with CIs, scatter plots and per-layer ON."""
    tags = {"ptx.kind": track.KIND_INDICATORS}
    latest = _latest_per_backbone(_runs(ctx, tags), ctx.experiment)
    if not latest:
        return _not_run(ctx, "indicators", "indicators", tags)
    parts, facts = [], {}
    for backbone, run in sorted(latest.items()):
        folder = _artifacts(ctx, run, "tables")
        summary = _parquet(folder, "correlations.parquet")
        cite = ctx.sources.cite(run)
        if summary is None or summary.empty:
            parts.append(f"<h3>{esc(backbone)}</h3><p class='notrun'>indicators run {cite} has no "
                         "tables/correlations.parquet.</p>")
            continue
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
        facts[backbone] = fact
        parts.append(f"<h3>{esc(backbone)}</h3><p>Correlation of each indicator with zero-shot transfer, per target "
                     "task over its source prompts and then averaged (95% bootstrap CI), and pooled over all pairs; "
                     "<i>_disp</i>: the same measure of each prompt's displacement from its own init (ON: of the "
                     "neurons training switched), which a shared start cannot inflate; <i>within one seed</i>: "
                     f"sources and targets' own prompts of one seed only (docs/fidelity.md); from indicators run {cite}.</p>")
        methods = [m for m in ("spearman", "pearson", "kendall") if m in set(summary.method)]
        order = [v for n in (*ON, *EMBEDDING) for v in (n, f"{n}_disp") if v in set(summary.indicator)]
        order += sorted(set(summary.indicator) - set(order))
        seeded = "within_seed" in summary.columns
        rows = []
        for name in order:
            by = summary[summary.indicator == name].set_index("method")
            row = [f"<b>{esc(name)}</b>" if name in ON else esc(name)]
            row += [_ci(*(by.loc[m, c] for c in ("mean_over_targets", "ci_low", "ci_high"))) if m in by.index
                    else "—" for m in methods]
            s = by.loc["spearman"] if "spearman" in by.index else by.iloc[0]
            row += [_ci(s.get("pooled"), s.get("pooled_ci_low"), s.get("pooled_ci_high"))]
            row += [_num(s.get("within_seed"), 2)] if seeded else []
            row += [f"{s.get('n_targets_defined', '')}/{s.get('n_targets', '')}", s.get("n_pairs", "")]
            rows.append(row)
        parts.append(_table(["indicator", *(f"{m} (mean over targets) [CI]" for m in methods), "Spearman pooled [CI]",
                             *(["Spearman within one seed"] if seeded else []), "targets defined", "pairs"], rows, cite))
        pairs = _parquet(folder, "pairs.parquet")
        if pairs is not None and "on" in fact:
            fact.update(indicator_findings(pairs, ctx.primary))
        names = [n for n in order if pairs is not None and n in pairs.columns and not n.endswith("_disp")]
        if names:
            valid = pairs.dropna(subset=["y"])
            ncol = min(4, len(names))
            fig = figures.new_figure(3.3 * ncol, 0.9 + 2.9 * math.ceil(len(names) / ncol))
            figures.indicator_grid(fig, valid, names, summary, backbone, bold=ON)
            parts.append(_figure(ctx, fig, f"indicators_{_slug(backbone)}.png",
                                 f"indicator vs transfer (run {esc(run.run_id)}; pairs.parquet)"))
        win = _parquet(folder, "correlations_windows.parquet")
        if win is not None and not win.empty:
            win = win[win.method == "spearman"]
            keys = [(k[0], k[1] != k[2], k[1]) if (k := figures.layer_of(n)) else (n, False, 0) for n in win.indicator]
            win = win.iloc[sorted(range(len(win)), key=keys.__getitem__)]  # per base: layers, then windows
            fig = figures.new_figure(6.4, 3.4)
            figures.layer_profile(fig.subplots(), win, summary, backbone, ON)
            rows = [[esc(r.indicator), _ci(r.mean_over_targets, r.ci_low, r.ci_high),
                     f"{r.n_targets_defined}/{r.n_targets}"] for r in win.itertuples()]
            parts.append("<h4>Per-layer ON</h4><div class='grid2'>" + _figure(
                ctx, fig, f"layers_{_slug(backbone)}.png", f"ON per layer and window (run {esc(run.run_id)})")
                + _table(["indicator", "Spearman (mean over targets) [CI]", "targets defined"], rows, cite)
                + "</div>")
    ctx.facts["indicators"] = facts
    ctx.status["indicators"] = ("ok", ", ".join(latest))
    return "".join(parts)


# ---- projector ----------------------------------------------------------------------------------------
def projector_section(ctx) -> str:
    """The latest projector stage: its skip reason, or projectors, zero-shot results and TPT on the target."""
    stage = [r for r in _runs(ctx, {"ptx.stage": "projector"}, status=None)
             if r.tags.get("ptx.kind") in ("stage", track.KIND_PROJECTOR)]
    stage += [r for r in _runs(ctx, {"ptx.kind": track.KIND_PROJECTOR}, status=None)
              if "ptx.objective" not in r.tags and r not in stage]  # a stage run logged as kind=projector
    done = sorted((r for r in stage if r.status == "FINISHED"), key=lambda r: -r.start_time)
    if not done:
        return _not_run(ctx, "projector", "projector", {"ptx.stage": "projector"})
    run = done[0]
    cite = ctx.sources.cite(run)
    if run.tags.get("ptx.skipped") == "true":
        reason = run.tags.get("ptx.skip_reason", "no reason recorded")
        ctx.status["projector"] = ("skipped", "skipped")
        ctx.facts["projector"] = {"skipped": reason, "run_id": run.run_id}
        return f"<p class='notrun'>skipped: {esc(reason)} (projector stage run {cite}).</p>"
    folder = _artifacts(ctx, run, "tables")
    zs, tpt = _parquet(folder, "projector_zero_shot.parquet"), _parquet(folder, "projector_tpt.parquet")
    models = [r for r in _runs(ctx, {"ptx.kind": track.KIND_PROJECTOR}) if "ptx.objective" in r.tags
              and r.tags.get("mlflow.parentRunId") in (None, run.run_id)]
    tags = run.tags
    parts = [f"<p>Prompts of <b>{esc(tags.get('ptx.source_backbone', '?'))}</b> projected onto "
             f"<b>{esc(tags.get('ptx.target_backbone', '?'))}</b> and scored zero-shot there beside a random prompt "
             f"and the target backbone's own prompt; projector stage run {cite}.</p>"]
    if models:
        parts.append(_table(["objective", "form", "trained without", "training tasks", "initial loss", "final loss",
                             "projector run"],
                            [[esc(r.tags["ptx.objective"]), esc(r.tags.get("ptx.form", "")),
                              esc(r.tags.get("ptx.projector_unit", "")), esc(r.params.get("train_tasks", "")),
                              r.metrics.get("initial_loss", math.nan), r.metrics.get("final_loss", math.nan),
                              ctx.sources.cite(r)] for r in models]))
    facts = {"run_id": run.run_id}
    if zs is not None and not zs.empty:
        zs = zs[zs.split == "test"] if (zs.split == "test").any() else zs  # dev picked the objective; test reports
        if "held_out" not in zs:  # a table from before the held-out protocol: none of its rows is known held out
            zs = zs.assign(held_out=False)
        zs = zs.assign(held_out=zs.held_out.astype(bool), same_task=zs.same_task.astype(bool))
        parts.append("<p>Each projected prompt is scored with a projector that never saw its task (leave-one-task-"
                     "out, or an explicit train/eval split): the <i>held-out</i> columns and the headline use only "
                     "such rows; the objective was picked on the dev split.</p>")
        objectives = sorted(o for o in zs.objective.dropna().unique())
        rows = []
        for target, g in zs.groupby("target_task", sort=True):
            own, rnd = g[g.prompt == "own"], g[g.prompt == "random"]
            row = [esc(target), own.value.mean() if len(own) else g.own_value.iloc[0], rnd.value.mean()]
            for o in objectives:
                p = g[(g.prompt == "projected") & (g.objective == o)]
                same, cross = p[p.same_task & p.held_out], p[~p.same_task]
                row += [same.value.mean() if len(same) else math.nan,
                        same.relative_value.mean() if len(same) else math.nan, cross.value.mean()]
            mine = g[(g.prompt == "own") | ((g.prompt == "projected") & g.same_task & g.held_out)]
            ids = [x for c in ("source_prompt_run", "projector_run") if c in g for x in mine[c].dropna().unique()]
            rows.append([*row, "<br>".join(ctx.sources.cite(x) for x in ids)])
        head = ["target task", "own prompt", "random prompt"]
        for o in objectives:
            head += [f"projected ({esc(o)}), same task, held out", "÷ own", "projected, other tasks (mean)"]
        src = zs[zs.prompt == "projected"].drop_duplicates("source_task").sort_values("source_task")
        parts.append(f"<h4>Zero-shot on the target backbone ({esc(str(zs.split.iloc[0]))} split)</h4>"
                     + _table([*head, "runs (own prompt, same-task source prompt, projector)"], rows)
                     + "<details><summary>projected source prompts</summary>" + _table(
                         ["source task", "prompt run (source backbone)"],
                         [[esc(r.source_task), ctx.sources.cite(r.source_prompt_run)] for r in src.itertuples()
                          if isinstance(r.source_prompt_run, str)]) + "</details>")
        same = zs[(zs.prompt == "projected") & zs.same_task & zs.held_out]
        objectives = [o for o in objectives if (same.objective == o).any()]
        facts["best_objective"] = tags.get("ptx.best_objective")
        facts.update(own=float(zs[zs.prompt == "own"].value.mean()), random=float(zs[zs.prompt == "random"].value.mean()),
                     projected={o: float(same[same.objective == o].value.mean()) for o in objectives})
    if tpt is not None and not tpt.empty:
        c = censored_speedups(tpt.to_dict("records"))
        facts["tpt"] = c

        def bound(r):
            return f"&lt; {_num(r.speedup_bound, 2, '×')}" if "speedup_bound" in tpt and r.flag == "tpt_not_reached" else ""
        parts.append("<h4>Prompt tuning on the target from the held-out projected prompt (TPT) vs from scratch</h4>"
                     f"<p>Reached vanilla's best in {c['n_reached']} of {c['n_runs']} runs; median speed-up "
                     f"{_speed(c['median_speedup'], c['median_speedup_upper'])} (non-reaching runs censored below "
                     f"vanilla's steps ÷ TPT's budget); mean over the reaching runs "
                     f"{_num(c['mean_speedup_reached'], 2, '×')}.</p>" + _table(
                         ["task", "objective", "vanilla best", "TPT best", "speed-up", "speed-up @90%", "flag", "runs"],
                         [[esc(r.task), esc(r.objective), r.vanilla_best, r.tpt_best,
                           bound(r) or _num(r.speedup, 2, "×"), _num(r.speedup_90, 2, "×"), esc(r.flag),
                           ctx.sources.cite(r.vanilla_run) + " " + ctx.sources.cite(r.tpt_run)]
                          for r in tpt.itertuples()]))
    if len(parts) == 1:
        parts.append(f"<p class='notrun'>projector stage run {cite} logged no result tables.</p>")
    ctx.facts["projector"] = facts
    ctx.status["projector"] = ("ok", "finished")
    return "".join(parts)


# ---- findings and the page ----------------------------------------------------------------------------
def _missing(stage: str) -> str:
    return f"<span class='muted'>not available: the {stage} stage has no finished run in this experiment.</span>"


def _verdict(f: Finding | None) -> str:
    """The verdict word of a finding, from its interval (ptx.findings)."""
    v = f.verdict if f else Verdict.INCONCLUSIVE
    return {Verdict.YES: "Yes", Verdict.NO: "No", Verdict.INCONCLUSIVE: "Inconclusive"}[v]


def _finding(f: Finding) -> str:
    """The effect, its interval when the method gives one, the method's name and p."""
    p = f", p = {f.p_value:.3f}" if math.isfinite(f.p_value) else ""
    shown = _ci(f.estimate, f.ci_low, f.ci_high) if math.isfinite(f.ci_low) else _bound(f.estimate)
    return f"{shown} ({esc(f.test)}{p})"


def findings(ctx) -> list[str]:
    """Plain-language answers to the study's questions, each sentence carrying its numbers and runs."""
    out = []
    transfer = ctx.facts.get("transfer") or {}
    for bb, f in transfer.items():
        d = f["same_vs_cross"]
        out.append(f"<b>Does same-category transfer beat cross-category? {_verdict(d)}</b> on "
                   f"{esc(bb)} ({esc(f['split'])} split): a source prompt reaches {_num(f['same_mean'])} of the "
                   f"target's own-prompt score on other tasks of its category (n = {f['same_n']} pairs) vs "
                   f"{_num(f['cross_mean'])} on tasks of other categories (n = {f['cross_n']}); task-level "
                   f"difference (seeds averaged per cell) {_finding(d)}. Beside it, a random prompt reaches "
                   f"{_num(f['random_mean'])} (n = {f['random_n']}; descriptive, no verdict). "
                   f"Run {ctx.sources.cite(f['run_id'])}.")
    for bb, f in transfer.items():
        own = f.get("own_vs_random") or []
        if not own:
            continue
        beat = [o for o in own if o["finding"].verdict == Verdict.YES]
        rest = "; ".join(f"{esc(o['target_task'])} {_num(o['own'])} vs {_num(o['random'])}, difference "
                         f"{_finding(o['finding'])} ({ctx.sources.cite(o['source_prompt_run'])})"
                         for o in own if o not in beat)
        lost = [o for o in own if o["finding"].verdict == Verdict.NO]
        word = ("Yes" if len(beat) == len(own) else "No" if len(lost) == len(own) else "Partly" if beat
                else "Inconclusive")  # no verdict is not a "no"
        methods = sorted({o["finding"].test for o in beat})
        out.append(f"<b>Does every prompt beat a random prompt on its own task? {word}</b> on {esc(bb)} "
                   f"({esc(f['split'])} split): {len(beat)} of {len(own)} own-task prompts beat the seeded random "
                   f"prompts on the same test examples (n = {min(o['n'] for o in own)} to "
                   f"{max(o['n'] for o in own)} examples a target"
                   + (f"; {esc(', '.join(methods))}" if methods else "") + ")"
                   + (f"; not: {rest}" if rest else "") + ".")
        out += _init_paragraph(bb, f, own)
    if not transfer:
        out.append("<b>Does same-category transfer beat cross-category?</b> " + _missing("transfer"))
    ind = ctx.facts.get("indicators") or {}
    for bb, f in ind.items():
        if "on" not in f or "embedding" not in f:
            continue
        prim, expl = f.get("primary") or {}, f.get("exploratory") or {}
        got = [g.verdict for g in prim.values()]
        word = ("Yes" if got and all(v == Verdict.YES for v in got) else "No" if got and all(v == Verdict.NO for v in got)
                else "Partly" if Verdict.YES in got else "Inconclusive")
        detail = "; ".join(f"{esc(k)}: {_verdict(g)}, difference {_finding(g)}" for k, g in prim.items())
        out.append(f"<b>Does ON predict transfer better than embedding similarity? {word}</b> on {esc(bb)}: mean "
                   f"Spearman over targets {_ci(f['on'], *f['on_ci'])} for ON vs "
                   f"{_ci(f['embedding_rho'], *f['embedding_ci'])} for the best embedding similarity "
                   f"({esc(f['embedding'])}, picked on these data: descriptive only). Primary comparisons declared in "
                   f"the spec, Holm-adjusted: " + (detail or "none computed (no pairs table or columns)")
                   + (f" (declared but not in the pairs table: {esc(', '.join(f['primary_missing']))})"
                      if f.get("primary_missing") else "")
                   + ("; exploratory (unadjusted, no verdict): " + "; ".join(
                       f"{esc(k)} {_ci(g.estimate, g.ci_low, g.ci_high)}" for k, g in expl.items()) if expl else "")
                   + f". Run {ctx.sources.cite(f['run_id'])}.")
    if not any("on" in f and "embedding" in f for f in ind.values()):
        out.append("<b>Does ON predict transfer better than embedding similarity?</b> " + (
            _missing("indicators") if not ind else "<span class='muted'>not available: the indicators run has no "
                                                   "Spearman row for ON and an embedding similarity.</span>"))
    tpt = ctx.facts.get("tpt") or {}
    for bb, f in tpt.items():
        for mode, g in (f.get("by_source") or {}).items():
            d = g["finding"]
            out.append(f"<b>Does TPT from the {esc(mode.replace('_', ' '))} source converge faster? {_verdict(d)}"
                       f"</b> on {esc(bb)}: it reached vanilla's best dev score in {g['n_reached']} of "
                       f"{g['n_runs']} runs (reach rate {_num(g['n_reached'] / max(g['n_runs'], 1))}); "
                       f"median speed-up {_speed(d.estimate, d.estimate_high)}"
                       + (f" [{_bound(d.ci_low)}, {_bound(d.ci_high)}]" if math.isfinite(d.ci_low) else "")
                       + f" against 1× ({esc(d.test)}, n = {d.n}). Run {ctx.sources.cite(f['run_id'])}.")
        out.append(f"<b>How fast is TPT, all sources together?</b> On {esc(bb)}, transfer-initialised prompt tuning "
                   f"reached vanilla's best dev score in {f['n_reached']} of {f['n_runs']} runs; median speed-up over "
                   f"runs {_speed(*f['median_range'])} with the {f['n_censored']} non-reaching runs at their bound "
                   f"(vanilla's steps to its best dev score ÷ TPT's steps to that score); mean over the reaching "
                   f"runs only {_num(f['mean_speedup_reached'], 2, '×')}"
                   + (f"; {f['n_undefined']} run(s) with no defined speed-up (vanilla's best at its init)"
                      if f["n_undefined"] else "")
                   + f". Run {ctx.sources.cite(f['run_id'])}.")
    if not tpt:
        out.append("<b>How fast is TPT?</b> " + _missing("TPT"))
    proj = ctx.facts.get("projector") or {}
    if proj.get("projected"):
        best = proj.get("best_objective")  # picked on dev by the stage: the test figures never choose it
        best = best if best in proj["projected"] else max(proj["projected"], key=lambda o: proj["projected"][o])
        out.append(f"<b>Do projected prompts transfer across models?</b> Projected prompts ({esc(best)} objective), "
                   f"each carried by a projector trained without its task, "
                   f"score {_num(proj['projected'][best])} on their own task on the target backbone, vs "
                   f"{_num(proj['random'])} for a random prompt and {_num(proj['own'])} for the target's own prompt. "
                   f"Run {ctx.sources.cite(proj['run_id'])}.")
    elif "skipped" in proj:  # a study that declared the question not testable says so, with no verdict
        said = proj["skipped"] if proj["skipped"].startswith(NOT_TESTABLE) else f"skipped: {proj['skipped']}"
        out.append(f"<b>Do projected prompts transfer across models?</b> <span class='muted'>{esc(said)} "
                   "(no verdict).</span>")
    return out


CSS = """
:root{--ink:#1c2230;--muted:#667085;--line:#e2e6ee;--accent:#2f5da8;--bg:#f4f6fa}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
 font:15px/1.55 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1140px;margin:0 auto;padding:28px 28px 64px}
h1{font-size:28px;margin:0 0 4px;letter-spacing:-.01em}
h2{font-size:20px;margin:0 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:16.5px;margin:18px 0 6px;color:#24324d} h4{font-size:14.5px;margin:16px 0 6px}
.meta{color:var(--muted);font-size:13px}
nav{display:flex;flex-wrap:wrap;gap:8px;margin:14px 0 4px}
nav a{text-decoration:none;font-size:13px;padding:4px 11px;border-radius:999px;border:1px solid var(--line);
 background:#fff;color:var(--ink)}
nav a.ok{border-color:#9cd3b0;background:#edf8f1} nav a.missing{border-color:#e7cf8a;background:#fff8e6}
nav a.skipped{border-color:#c9cfdb;background:#f0f2f6}
section{background:#fff;border:1px solid var(--line);border-radius:12px;padding:18px 24px;margin:18px 0;
 box-shadow:0 1px 2px rgba(16,24,40,.05)}
section.findings{border-left:6px solid var(--accent);background:#f0f5fd}
.findings ul{margin:0;padding-left:20px} .findings li{margin:8px 0}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums;margin:6px 0}
th{text-align:left;background:#f1f3f8;font-weight:600}
caption{caption-side:bottom;text-align:left;font-size:12px;color:var(--muted);padding-top:4px}
td,th{padding:5px 10px;border-bottom:1px solid var(--line);vertical-align:top}
td.n{text-align:right} tbody tr:nth-child(even) td{background:#fafbfd}
.scroll{overflow-x:auto;max-width:100%}
a.run{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11px;color:var(--accent);
 text-decoration:none;word-break:break-all}
sup{font-size:9px;color:var(--muted)}
.notrun{background:#fff8e6;border:1px solid #efd48c;padding:10px 14px;border-radius:8px;color:#6b5210}
.muted{color:var(--muted)}
figure{margin:10px 0} figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:8px;
 background:#fff} figcaption{font-size:12px;color:var(--muted)}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px;align-items:start}
.stack figure img{display:block;margin:0 auto}
details{margin:8px 0} summary{cursor:pointer;color:var(--accent);font-size:13.5px}
code,.cmd{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px}
code{background:#f1f3f8;padding:1px 5px;border-radius:4px} .cmd{color:#3d4a5f;background:#f6f7fa;padding:1px 5px}
ol.sources li{font-size:12.5px;margin:4px 0}
"""
# counts the images that loaded into <html data-images="ok:N/M"> (read back by the headless-browser test)
IMAGE_CHECK = """<script>window.addEventListener("load",function(){var m=document.images,k=0;
for(var i=0;i<m.length;i++){if(m[i].complete&&m[i].naturalWidth>0){k++;}}
document.documentElement.setAttribute("data-images","ok:"+k+"/"+m.length);});</script>"""

SECTIONS = (("training", "Training", training_section), ("transfer", "Zero-shot transfer", transfer_section),
            ("tpt", "Transfer-initialised prompt tuning (TPT)", tpt_section),
            ("indicators", "Transferability indicators", indicators_section),
            ("projector", "Cross-model projector", projector_section))


def render(ctx, uri: str) -> str:
    """The whole page as one HTML string (figures are written to ctx.fig as a side effect)."""
    bodies = []
    for sid, title, fn in SECTIONS:
        try:
            body = fn(ctx)
        except Exception as exc:  # one broken table must not cost the rest of the report: say so in its place
            log.exception("report section %s failed", sid)
            ctx.status[sid] = ("missing", "failed")
            body = f"<p class='notrun'>this section could not be built: {esc(type(exc).__name__)}: {esc(str(exc))}</p>"
        bodies.append(f"<section id='{sid}'><h2>{esc(title)}</h2>{body}</section>")
    facts = "".join(f"<li>{s}</li>" for s in findings(ctx))
    nav = "".join(f"<a class='{ctx.status.get(sid, ('missing',))[0]}' href='#{sid}'>{esc(title.split(' (')[0])}: "
                  f"{esc(ctx.status.get(sid, ('', 'not run'))[1])}</a>" for sid, title, _ in SECTIONS)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{MARKER}"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>ptx report: {esc(ctx.experiment)}</title><style>{CSS}</style>{IMAGE_CHECK}</head><body><main>"
            f"<header><h1>ptx report: {esc(ctx.experiment)}</h1><div class='meta'>MLflow store <code>{esc(uri)}</code>"
            f" · experiment <code>{esc(ctx.experiment)}</code> (id {esc(ctx.exp_id)}) · built {esc(when)} by ptx "
            f"{esc(__version__)}</div><nav>{nav}<a href='#sources'>Sources</a></nav></header>"
            f"<section id='findings' class='findings'><h2>Findings</h2><ul>{facts}</ul></section>"
            + "".join(bodies)
            + "<section id='sources'><h2>Sources</h2><p class='meta'>Every number above names the MLflow run it came "
              "from (the superscript is its footnote here). Fetch a prompt run with <code>ptx prompts get RUN_ID -o DIR"
              "</code> and any run's artifacts with <code>mlflow artifacts download -r RUN_ID -d DIR</code> "
              f"(tracking URI <code>{esc(uri)}</code>); browse them with <code>mlflow ui --backend-store-uri "
              f"{esc(uri)}</code>.</p>{ctx.sources.footnotes(ctx.tracker)}</section></main></body></html>")


# ---- entry points -------------------------------------------------------------------------------------
def _experiment_id(tracker, experiment: str) -> str:
    exp_id = tracker.experiment_id_of(experiment)
    if exp_id is None:
        names = tracker.all_experiment_names()
        raise PtxError(f"experiment '{experiment}' does not exist in the MLflow store {tracker.uri}"
                       f"{suggest(experiment, names)} (found: {', '.join(names) or 'none'})")
    return exp_id


def _plain(obj):
    """JSON-safe facts: NaN becomes null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Finding):
        return _plain({**dataclasses.asdict(obj), "verdict": obj.verdict.value})
    if isinstance(obj, np.generic):
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def build_report(tracker, experiment: str, out_dir, primary=None) -> Path:
    """Write OUT_DIR/index.html (+ fig/*.png, summary.json) for one MLflow experiment (= study); returns index.html.
    `primary`: the spec's declared primary indicator comparisons (findings.primary; default DEFAULT_PRIMARY)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (
            (out / "index.html").is_file() and MARKER in (out / "index.html").read_text(errors="replace")[:2000]))):
        raise PtxError(f"report directory {out}: exists and is not empty or a previous ptx report; choose a new -o")
    exp_id = _experiment_id(tracker, experiment)
    with tempfile.TemporaryDirectory(prefix="ptx-report-") as scratch, atomic_dir(out) as tmp:
        ctx = _Ctx(tracker, experiment, exp_id, Path(scratch), tmp / "fig",
                   primary=tuple(primary) if primary is not None else DEFAULT_PRIMARY)
        ctx.fig.mkdir()
        page = render(ctx, tracker.uri)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        write_json(tmp / "summary.json", {"experiment": experiment, "tracking_uri": tracker.uri,
                                          "sections": {k: v[0] for k, v in ctx.status.items()},
                                          "facts": _plain(ctx.facts), "runs": list(ctx.sources.cited)})
    return out / "index.html"
