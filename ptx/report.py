"""The study report: one static index.html built from what the stages logged to MLflow.

`ptx.report_data` reads each section's data (DataFrames and plain values); this module renders it. Everything is
local: figures are PNGs beside index.html (fig/), CSS is inline, there is no external URL and no JS framework
(one inline script only counts the images that loaded, for the headless-browser check). Figures are drawn here from
the logged tables, not copied from the stages, so they share one style. Every number names the MLflow run it came
from: the run id is printed beside it and the footnotes say how to fetch that run.
"""

import html
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptx import __version__, figures, track, verdicts
from ptx import report_data as data
from ptx.errors import PtxError
from ptx.findings import Finding, Verdict
from ptx.indicators import MAIN_ON as ON
from ptx.io import atomic_dir, write_json
from ptx.projector import NOT_TESTABLE
from ptx.report_data import AT_INIT, NotRun, Store
from ptx.transfer import censored_speedups

log = logging.getLogger(__name__)
MARKER = '<meta name="generator" content="ptx report">'  # an existing out dir is only replaced when it is a report
esc = html.escape
CSS = Path(__file__).with_name("report.css")  # the page's one stylesheet, inlined into it


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


def _bound(v) -> str:
    """An interval end: '∞' for a TPT speed-up at init, else the number."""
    return "∞" if isinstance(v, float | np.floating) and v >= AT_INIT else _num(v)


def ci_text(mean, lo, hi) -> str:
    """'mean [lo, hi]' with open-ended bounds for speed-ups at init."""
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
    store: Store
    fig: Path
    sources: Sources = field(default_factory=Sources)
    facts: dict = field(default_factory=dict)  # headline numbers (summary.json and the Findings box)
    status: dict = field(default_factory=dict)  # section id -> (state, one line)


def _not_run(ctx, section: str, missing: NotRun) -> str:
    """The 'not run' notice, naming an unfinished run of the stage when there is one."""
    why = f"not run: the {missing.stage} stage has no finished run in this experiment"
    if missing.latest is not None:
        why += f" (latest: a {missing.latest.status} run, {ctx.sources.cite(missing.latest)})"
    ctx.status[section] = ("missing", "not run")
    return f"<p class='notrun'>{why}.</p>"


# ---- training -----------------------------------------------------------------------------------------
def training_section(ctx) -> str:
    """Per (backbone, task): each seed's best dev score (and test score) from the finished vanilla prompt runs."""
    d = data.training(ctx.store)
    if isinstance(d, NotRun):
        return _not_run(ctx, "training", d)
    seeds, tests = d.seeds, d.test_seeds
    rows = []
    for t in d.tasks.itertuples():
        cells = d.cells[(d.cells.backbone == t.backbone) & (d.cells.category == t.category) & (d.cells.task == t.task)]
        by_seed = {c.seed: c for c in cells.itertuples()}
        row = [esc(t.backbone), esc(t.task), esc(t.category), esc(t.metric)]
        for s in seeds:
            c = by_seed.get(s)
            row.append(c.best_dev if c is not None else math.nan)
            if s in tests:
                row.append(c.test if c is not None else math.nan)
        rows.append([*row, t.mean_dev,
                     "<br>".join(f"s{s}: {ctx.sources.cite(d.runs[by_seed[s].run_id])}" for s in seeds if s in by_seed)])
    head = ["backbone", "task", "category", "metric"]
    for s in seeds:
        head += [f"seed {esc(s)}<br>best dev", *([f"seed {esc(s)}<br>test"] if s in tests else [])]
    n_tasks = d.facts["tasks"]
    ctx.status["training"] = ("ok", f"{d.n_runs} prompt runs")
    ctx.facts["training"] = d.facts
    return (f"<p>{d.n_runs} finished prompt runs over {n_tasks} tasks and {len(seeds)} seed(s). Per (backbone, task):"
            " each seed's best dev score" + (f" (the best of up to {d.trials} trials of that seed)" if d.trials > 1
                                              else "")
            + ("; test scores where the run logged one" if tests else "; no run logged a test score") + ".</p>"
            + _table([*head, "mean dev", "runs"], rows))


def _per_backbone(ctx, sid: str, what: str, results, block) -> str:
    """A section of one block per backbone (sorted): block(ctx, result, cite) -> (HTML, facts), `cite` the
    result's run, cited first; a notice for a run that lacks its tables (`what`: the stage's name in it), and the
    'not run' notice when the stage has no finished run."""
    if isinstance(results, NotRun):
        return _not_run(ctx, sid, results)
    parts, facts = [], {}
    for backbone, res in sorted(results.items()):
        cite = ctx.sources.cite(res.run)
        if res.missing:
            parts.append(f"<h3>{esc(backbone)}</h3><p class='notrun'>{what} run {cite} has {res.missing}.</p>")
            continue
        part, facts[backbone] = block(ctx, res, cite)
        parts.append(part)
    ctx.facts[sid] = facts
    ctx.status[sid] = ("ok", ", ".join(results))
    return "".join(parts)


# ---- transfer -----------------------------------------------------------------------------------------
def transfer_section(ctx) -> str:
    """Per backbone: heatmaps of the latest transfer matrix, and same- vs cross-category transfer."""
    return _per_backbone(ctx, "transfer", "transfer", data.transfer(ctx.store), _transfer_block)


def _transfer_block(ctx, m, cite: str) -> tuple[str, dict]:
    backbone, run, df = m.backbone, m.run, m.table
    parts = []
    split, summary, metrics = m.split, m.summary, m.metrics
    parts.append(f"<h3>{esc(backbone)}</h3><p>Zero-shot transfer of every bank prompt (columns) to every task "
                 f"(rows), from transfer run {cite}; {m.n_sources} source prompts, {df.target_task.nunique()} "
                 f"targets, metric: {esc(metrics)}. Outlined cells: a task's own prompt; black lines separate "
                 "categories.</p>")
    for i, s in enumerate(m.splits):
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
    parts.append("<details><summary>source prompts of this matrix</summary>" + _table(
        ["source task", "category", "prompt run"],
        [[esc(r.source_task), esc(r.source_category), ctx.sources.cite(r.source_prompt_run)]
         for r in m.bank.itertuples()]) + "</details>")
    return "".join(parts), m.facts


# ---- TPT ----------------------------------------------------------------------------------------------
def _median_cell(records: list, suffix: str = "") -> str:
    """The table's median speed-up: the same statistic as the finding's (a range for an even count)."""
    got = data.speedups(records, suffix)
    return _speed(*verdicts.median_range(got)) if got else "—"


def tpt_section(ctx) -> str:
    """Per backbone: the TPT speed-up table and the dev curves of its vanilla and TPT runs."""
    return _per_backbone(ctx, "tpt", "TPT", data.tpt(ctx.store), _tpt_block)


def _tpt_block(ctx, res, cite: str) -> tuple[str, dict]:
    backbone, run, agg, seeds = res.backbone, res.run, res.agg, res.seeds
    parts = []
    f = res.facts
    parts.append(f"<h3>{esc(backbone)}</h3><p>Prompt tuning started from a transferred prompt (TPT) beside "
                 f"vanilla prompt tuning, same seeds; TPT run {cite}. Speed-up = steps vanilla needs to reach "
                 "its best dev score ÷ steps TPT needs to reach it. No run is dropped: a TPT run that never "
                 "reaches vanilla's best is censored (its speed-up is below vanilla's steps ÷ TPT's budget) and "
                 "enters the median at that bound, which keeps its side of 1; one that starts there counts as "
                 "infinitely fast. An even count's median is the range between its two middle runs; the table "
                 "and the findings print the same median. The mean is over the runs that reached it after step "
                 f"0 only. Overall: reached in {f['n_reached']} of {f['n_runs']} runs, median "
                 f"{_speed(*f['median_range'])}, mean over reaching runs "
                 f"{_num(f['mean_speedup_reached'], 2, '×')}.</p>")
    rows = []
    for r in agg.itertuples():
        runs = seeds[(seeds.target_task == r.target_task) & (seeds.source_prompt_run == r.source_prompt_run)]
        ids = " ".join(ctx.sources.cite(x) for c in ("vanilla_run", "tpt_run") if c in runs
                       for x in runs[c].dropna())
        records = runs.to_dict("records")
        per = censored_speedups(records)
        rows.append([esc(r.target_task), esc(r.source_task), ctx.sources.cite(r.source_prompt_run),
                     r.vanilla_best, r.tpt_best, f"{per['n_reached']}/{per['n_runs']}",
                     _median_cell(records), _num(per["mean_speedup_reached"], 2, "×"),
                     _median_cell(records, "_90"), esc(str(getattr(r, "flags", ""))), ids or cite])
    parts.append(_table(["target", "source task", "source prompt", "vanilla best", "TPT best", "reached",
                         "median speed-up", "mean speed-up (reaching runs)", "median @90%", "flags",
                         "runs (vanilla, TPT)"], rows))
    if res.panels:
        fig = figures.new_figure(*figures.convergence_size(seeds.target_task.nunique()))
        panels = [(f"{p.target} ← {p.source_task}: median {_speed(*p.speedup) if p.speedup else '—'}", p.metric,
                   p.runs) for p in res.panels]
        if figures.convergence_grid(fig, panels, f"{backbone}: dev score while tuning, "
                                    "vanilla PT vs TPT (dashed: vanilla's best)"):
            parts.append(_figure(ctx, fig, f"tpt_{_slug(backbone)}.png",
                                 f"dev curves of the runs in the table above (TPT run {esc(run.run_id)})"))
    return "".join(parts), f


# ---- indicators ---------------------------------------------------------------------------------------
def indicators_section(ctx) -> str:
    """Per backbone: the indicator-transfer correlations with CIs, scatter plots and per-layer ON."""
    return _per_backbone(ctx, "indicators", "indicators", data.indicators(ctx.store), _indicators_block)


def _indicators_block(ctx, res, cite: str) -> tuple[str, dict]:
    backbone, run, summary, pairs = res.backbone, res.run, res.summary, res.pairs
    parts = []
    parts.append(f"<h3>{esc(backbone)}</h3><p>Correlation of each indicator with zero-shot transfer, per target "
                 "task over its source prompts and then averaged (95% bootstrap CI), and pooled over all pairs; "
                 "<i>_disp</i>: the same measure of each prompt's displacement from its own init (ON: of the "
                 "neurons training switched), which a shared start cannot inflate; <i>within one seed</i>: "
                 f"sources and targets' own prompts of one seed only (docs/fidelity.md); from indicators run {cite}.</p>")
    methods = [m for m in ("spearman", "pearson", "kendall") if m in set(summary.method)]
    order = data.indicator_order(summary)
    seeded = "within_seed" in summary.columns
    rows = []
    for name in order:
        by = summary[summary.indicator == name].set_index("method")
        row = [f"<b>{esc(name)}</b>" if name in ON else esc(name)]
        row += [ci_text(*(by.loc[m, c] for c in ("mean_over_targets", "ci_low", "ci_high"))) if m in by.index
                else "—" for m in methods]
        s = by.loc["spearman"] if "spearman" in by.index else by.iloc[0]
        row += [ci_text(s.get("pooled"), s.get("pooled_ci_low"), s.get("pooled_ci_high"))]
        row += [_num(s.get("within_seed"), 2)] if seeded else []
        row += [f"{s.get('n_targets_defined', '')}/{s.get('n_targets', '')}", s.get("n_pairs", "")]
        rows.append(row)
    parts.append(_table(["indicator", *(f"{m} (mean over targets) [CI]" for m in methods), "Spearman pooled [CI]",
                         *(["Spearman within one seed"] if seeded else []), "targets defined", "pairs"], rows, cite))
    names = [n for n in order if pairs is not None and n in pairs.columns and not n.endswith("_disp")]
    if names:
        valid = pairs.dropna(subset=["y"])
        ncol = min(4, len(names))
        fig = figures.new_figure(3.3 * ncol, 0.9 + 2.9 * math.ceil(len(names) / ncol))
        figures.indicator_grid(fig, valid, names, summary, backbone, bold=ON)
        parts.append(_figure(ctx, fig, f"indicators_{_slug(backbone)}.png",
                             f"indicator vs transfer (run {esc(run.run_id)}; pairs.parquet)"))
    win = res.windows
    if win is not None and not win.empty:
        win = win[win.method == "spearman"]
        keys = [(k[0], k[1] != k[2], k[1]) if (k := figures.layer_of(n)) else (n, False, 0) for n in win.indicator]
        win = win.iloc[sorted(range(len(win)), key=keys.__getitem__)]  # per base: layers, then windows
        fig = figures.new_figure(6.4, 3.4)
        figures.layer_profile(fig.subplots(), win, summary, backbone, ON)
        rows = [[esc(r.indicator), ci_text(r.mean_over_targets, r.ci_low, r.ci_high),
                 f"{r.n_targets_defined}/{r.n_targets}"] for r in win.itertuples()]
        parts.append("<h4>Per-layer ON</h4><div class='grid2'>" + _figure(
            ctx, fig, f"layers_{_slug(backbone)}.png", f"ON per layer and window (run {esc(run.run_id)})")
            + _table(["indicator", "Spearman (mean over targets) [CI]", "targets defined"], rows, cite)
            + "</div>")
    return "".join(parts), res.facts


# ---- projector ----------------------------------------------------------------------------------------
def projector_section(ctx) -> str:
    """The latest projector stage: its skip reason, or projectors, zero-shot results and TPT on the target."""
    res = data.projector(ctx.store)
    if isinstance(res, NotRun):
        return _not_run(ctx, "projector", res)
    run = res.run
    cite = ctx.sources.cite(run)
    if res.skipped is not None:
        ctx.status["projector"] = ("skipped", "skipped")
        ctx.facts["projector"] = res.facts
        return f"<p class='notrun'>skipped: {esc(res.skipped)} (projector stage run {cite}).</p>"
    zs, tpt, models, tags = res.zero_shot, res.tpt, res.models, run.tags
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
    if zs is not None:
        parts.append("<p>Each projected prompt is scored with a projector that never saw its task (leave-one-task-"
                     "out, or an explicit train/eval split): the <i>held-out</i> columns and the headline use only "
                     "such rows; the objective was picked on the dev split.</p>")
        rows = []
        for target, g in zs.groupby("target_task", sort=True):
            own, rnd = g[g.prompt == "own"], g[g.prompt == "random"]
            row = [esc(target), own.value.mean() if len(own) else g.own_value.iloc[0], rnd.value.mean()]
            for o in res.objectives:
                p = g[(g.prompt == "projected") & (g.objective == o)]
                same, cross = p[p.same_task & p.held_out], p[~p.same_task]
                row += [same.value.mean() if len(same) else math.nan,
                        same.relative_value.mean() if len(same) else math.nan, cross.value.mean()]
            mine = g[(g.prompt == "own") | ((g.prompt == "projected") & g.same_task & g.held_out)]
            ids = [x for c in ("source_prompt_run", "projector_run") if c in g for x in mine[c].dropna().unique()]
            rows.append([*row, "<br>".join(ctx.sources.cite(x) for x in ids)])
        head = ["target task", "own prompt", "random prompt"]
        for o in res.objectives:
            head += [f"projected ({esc(o)}), same task, held out", "÷ own", "projected, other tasks (mean)"]
        src = zs[zs.prompt == "projected"].drop_duplicates("source_task").sort_values("source_task")
        parts.append(f"<h4>Zero-shot on the target backbone ({esc(str(zs.split.iloc[0]))} split)</h4>"
                     + _table([*head, "runs (own prompt, same-task source prompt, projector)"], rows)
                     + "<details><summary>projected source prompts</summary>" + _table(
                         ["source task", "prompt run (source backbone)"],
                         [[esc(r.source_task), ctx.sources.cite(r.source_prompt_run)] for r in src.itertuples()
                          if isinstance(r.source_prompt_run, str)]) + "</details>")
    if tpt is not None:
        c = res.facts["tpt"]

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
    ctx.facts["projector"] = res.facts
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
    shown = ci_text(f.estimate, f.ci_low, f.ci_high) if math.isfinite(f.ci_low) else _bound(f.estimate)
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
                   f"Spearman over targets {ci_text(f['on'], *f['on_ci'])} for ON vs "
                   f"{ci_text(f['embedding_rho'], *f['embedding_ci'])} for the best embedding similarity "
                   f"({esc(f['embedding'])}, picked on these data: descriptive only). Primary comparisons declared in "
                   f"the spec, Holm-adjusted: " + (detail or "none computed (no pairs table or columns)")
                   + (f" (declared but not in the pairs table: {esc(', '.join(f['primary_missing']))})"
                      if f.get("primary_missing") else "")
                   + ("; exploratory (unadjusted, no verdict): " + "; ".join(
                       f"{esc(k)} {ci_text(g.estimate, g.ci_low, g.ci_high)}" for k, g in expl.items()) if expl else "")
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
            f"<title>ptx report: {esc(ctx.store.experiment)}</title><style>{CSS.read_text(encoding='utf-8')}</style>{IMAGE_CHECK}</head><body><main>"
            f"<header><h1>ptx report: {esc(ctx.store.experiment)}</h1><div class='meta'>MLflow store <code>{esc(uri)}</code>"
            f" · experiment <code>{esc(ctx.store.experiment)}</code> (id {esc(ctx.store.exp_id)}) · built {esc(when)} by ptx "
            f"{esc(__version__)}</div><nav>{nav}<a href='#sources'>Sources</a></nav></header>"
            f"<section id='findings' class='findings'><h2>Findings</h2><ul>{facts}</ul></section>"
            + "".join(bodies)
            + "<section id='sources'><h2>Sources</h2><p class='meta'>Every number above names the MLflow run it came "
              "from (the superscript is its footnote here). Fetch a prompt run with <code>ptx prompts get RUN_ID -o DIR"
              "</code> and any run's artifacts with <code>mlflow artifacts download -r RUN_ID -d DIR</code> "
              f"(tracking URI <code>{esc(uri)}</code>); browse them with <code>mlflow ui --backend-store-uri "
              f"{esc(uri)}</code>.</p>{ctx.sources.footnotes(ctx.store.tracker)}</section></main></body></html>")


# ---- entry points -------------------------------------------------------------------------------------
def build_report(tracker, experiment: str, out_dir, primary=None) -> Path:
    """Write OUT_DIR/index.html (+ fig/*.png, summary.json) for one MLflow experiment (= study); returns index.html.
    `primary`: the spec's declared primary indicator comparisons (findings.primary; default DEFAULT_PRIMARY)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (
            (out / "index.html").is_file() and MARKER in (out / "index.html").read_text(errors="replace")[:2000]))):
        raise PtxError(f"report directory {out}: exists and is not empty or a previous ptx report; choose a new -o")
    with tempfile.TemporaryDirectory(prefix="ptx-report-") as scratch:
        store = data.open_store(tracker, experiment, Path(scratch), primary)
        with atomic_dir(out) as tmp:
            ctx = _Ctx(store, tmp / "fig")
            ctx.fig.mkdir()
            page = render(ctx, tracker.uri)
            (tmp / "index.html").write_text(page, encoding="utf-8")
            write_json(tmp / "summary.json", {"experiment": experiment, "tracking_uri": tracker.uri,
                                              "sections": {k: v[0] for k, v in ctx.status.items()},
                                              "facts": data.plain(ctx.facts), "runs": list(ctx.sources.cited)})
    return out / "index.html"
