"""Every plot of ptx, in one style: the stages' PNG artifacts and the report's figures draw with these.

Figures are matplotlib `Figure`s on the Agg canvas (no display, no pyplot global state). A function here draws
into a figure or axes it is given, from data it is given (tables, curves); fetching the data is the caller's.
"""

import math
from pathlib import Path

import numpy as np

from ptx.transfer import RANDOM

VANILLA, TPT = "#2f5da8", "#d9822b"  # the colours of vanilla PT and TPT in every convergence plot
GROUP_COLOURS = {"same": "#2f7d4f", "cross": "#c0692b", "random": "#7a7f8a"}
GROUP_LABELS = {"same": "same category", "cross": "cross category", "random": "random prompt"}
DPI = 120


def new_figure(w: float, h: float):
    """An empty figure of w x h inches with constrained layout, on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path) -> Path:
    """Write the figure as a PNG (white background)."""
    fig.savefig(path, dpi=DPI, facecolor="white")
    return Path(path)


def _title(ax, text: str) -> None:
    ax.set_title(text, fontsize=10.5, fontweight="bold")


def _fmt(v, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float | np.floating) and math.isfinite(v) else "—"


# ---- transfer ---------------------------------------------------------------------------------------------
def task_order(tasks, cats: dict) -> list:
    """Tasks grouped by category (the random prompt last), alphabetical within a category."""
    return sorted(tasks, key=lambda t: (t == RANDOM, cats.get(t, ""), t))


def heatmap(ax, d, column: str, title: str, cbar: str, centre: float | None = None) -> None:
    """A transfer heatmap of one split's rows `d` (the long transfer table): rows target tasks, columns source
    tasks (mean over their prompts), both grouped by category with the groups named on the far axes; a target's
    own prompt outlined; cells annotated up to 15 x 15; `centre`: a diverging colour map around that value."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    fig = ax.get_figure()
    cats = {**dict(zip(d.source_task, d.source_category, strict=True)),
            **dict(zip(d.target_task, d.target_category, strict=True))}
    rows, cols = task_order(d.target_task.unique(), cats), task_order(d.source_task.unique(), cats)
    grid = (d.pivot_table(index="target_task", columns="source_task", values=column, aggfunc="mean")
            .reindex(index=rows, columns=cols).to_numpy(float))
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    norm = (TwoSlopeNorm(centre, min(lo, centre - 1e-6), max(hi, centre + 1e-6)) if centre is not None else None)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu" if centre is not None else "viridis", norm=norm,
                   aspect="auto", vmin=None if norm else lo, vmax=None if norm else hi)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    ax.set_xlabel("source prompt (task; mean over its prompts)", fontsize=9)
    ax.set_ylabel("target task", fontsize=9)
    _title(ax, title)
    for names, line, secondary in ((cols, ax.axvline, ax.secondary_xaxis("top")),
                                   (rows, ax.axhline, ax.secondary_yaxis("right"))):
        groups = [cats.get(n, "") for n in names]
        starts = [i for i in range(len(names)) if i == 0 or groups[i] != groups[i - 1]]
        for s in starts[1:]:
            line(s - 0.5, color="black", lw=2)
        ends = [*starts[1:], len(names)]
        secondary.set_ticks([(a + b - 1) / 2 for a, b in zip(starts, ends, strict=True)],
                            [groups[a] for a in starts], fontsize=8.5, color="#444", style="italic")
        secondary.tick_params(length=0)
    for i, r in enumerate(rows):
        if r in cols:  # the target's own prompt
            ax.add_patch(Rectangle((cols.index(r) - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.6))
    if grid.size <= 225:
        for (i, j), v in np.ndenumerate(grid):
            if math.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white")
    fig.colorbar(im, ax=ax, location="bottom", shrink=0.6, aspect=35, pad=0.02).set_label(cbar, fontsize=9)


def heatmap_size(d) -> tuple[float, float]:
    """Inches for one heatmap panel of `d`."""
    return 3.2 + 0.62 * d.source_task.nunique(), 2.6 + 0.42 * d.target_task.nunique()


HEATMAP_PANELS = (("value", "absolute", "score ({metric})", None),
                  ("relative_value", "relative", "score ÷ target's own prompt", 1.0))


def transfer_heatmaps(df, split: str, path, title: str = "") -> Path:
    """The transfer stage's PNG of one split: the absolute and the relative heatmap side by side."""
    d = df[df["split"] == split]
    metric = ", ".join(sorted(set(d.metric))) if "metric" in d else "score"
    w, h = heatmap_size(d)
    fig = new_figure(2 * w, h)
    for ax, (column, kind, cbar, centre) in zip(fig.subplots(1, 2), HEATMAP_PANELS, strict=True):
        heatmap(ax, d, column, f"{title + ' · ' if title else ''}{split} split · {kind} transfer",
                cbar.format(metric=metric), centre)
    return save(fig, path)


def group_bars(ax, summary: dict, title: str) -> None:
    """Relative transfer per group (same category, cross category, random prompt): a bar at the mean over the
    points of every (source prompt, target) pair; `summary` is report_data.category_summary's."""
    rng = np.random.default_rng(0)
    for i, (name, s) in enumerate(summary.items()):
        ax.bar(i, s["mean"] if s["n"] else 0, color=GROUP_COLOURS[name], alpha=0.35, width=0.6)
        ax.scatter(i + rng.uniform(-0.18, 0.18, len(s["values"])), s["values"], s=14, color=GROUP_COLOURS[name],
                   zorder=3)
        if s["n"]:
            ax.text(i, s["mean"], f"{s['mean']:.2f}\nn={s['n']}", ha="center", va="bottom", fontsize=8.5)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(summary)), [GROUP_LABELS[k] for k in summary], fontsize=9)
    ax.set_ylabel("relative transfer (÷ target's own prompt)", fontsize=9)
    _title(ax, title)


# ---- TPT ------------------------------------------------------------------------------------------------
def convergence(ax, runs: list, title: str, metric: str) -> int:
    """Dev curves of vanilla PT and TPT runs on one axes: `runs` = [(vanilla [(step, score)], tpt [(step, score)],
    vanilla's best or None)], one per seed; vanilla's best dashed. Returns the number of curves drawn."""
    drawn, labelled = 0, set()
    for vanilla, tpt, best in runs:
        for curve, colour, label in ((vanilla, VANILLA, "vanilla PT"), (tpt, TPT, "TPT")):
            if curve:
                drawn += 1
                ax.plot(*zip(*curve, strict=True), color=colour, marker=".", lw=1.4, alpha=0.9,
                        label=None if label in labelled else label)
                labelled.add(label)
        if best is not None and math.isfinite(best):
            ax.axhline(best, color=VANILLA, ls="--", lw=0.8)
    ax.set_title(title, fontsize=9.5)
    ax.set_xlabel("step", fontsize=8.5)
    ax.set_ylabel(f"dev {metric}", fontsize=8.5)
    ax.tick_params(labelsize=8)
    if labelled:
        ax.legend(fontsize=8)
    return drawn


def convergence_grid(fig, panels: list, title: str | None = None) -> int:
    """One `convergence` panel per (title, metric, runs) in `panels`, three to a row; returns the curves drawn."""
    ncol = min(3, len(panels))
    axes = np.atleast_1d(fig.subplots(math.ceil(len(panels) / ncol), ncol, squeeze=False)).ravel()
    drawn = sum(convergence(ax, runs, t, metric) for ax, (t, metric, runs) in zip(axes, panels, strict=False))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10.5, fontweight="bold")
    return drawn


def convergence_size(n_panels: int) -> tuple[float, float]:
    return min(13.5, 4.4 * min(3, n_panels)), 0.6 + 3.0 * math.ceil(n_panels / 3)


def convergence_png(curves: list, target: str, metric: str, path) -> Path:
    """The TPT stage's PNG of one target: curves = [(seed, vanilla [(step, score)], tpt [(step, score)])]."""
    fig = new_figure(*convergence_size(1))
    runs = [(vc, tc, max((v for _, v in vc), default=None)) for _seed, vc, tc in curves]
    convergence_grid(fig, [(f"{target}: vanilla PT vs TPT ({len(curves)} seed(s))", metric, runs)],
                     "dev score while tuning (dashed: vanilla's best)")
    return save(fig, path)


# ---- indicators -----------------------------------------------------------------------------------------
def indicator_scatter(ax, pairs, name: str, rho: float, pooled: float = math.nan, colours: dict | None = None,
                      bold: bool = False) -> None:
    """One indicator against relative transfer, one point per (source prompt, target task), a colour per target;
    `bold`: a title in bold (the report's main indicators)."""
    targets = sorted(pairs.target_task.unique())
    colours = colours or {t: f"C{i % 10}" for i, t in enumerate(targets)}
    for t in targets:
        g = pairs[pairs.target_task == t]
        ax.scatter(g[name], g.y, s=16, color=colours[t], label=t, alpha=0.85)
    ax.set_title(f"{name}: ρ̄ = {_fmt(rho)} (pooled {_fmt(pooled)})", fontsize=9.5,
                 fontweight="bold" if bold else "normal")
    ax.set_xlabel(name, fontsize=8.5)
    ax.tick_params(labelsize=7.5)


def _spearman(summary):
    sp = summary[summary.method == "spearman"].set_index("indicator")
    rho = sp.mean_over_targets if "mean_over_targets" in sp else {}
    pooled = sp.pooled if "pooled" in sp else {}
    return (lambda n: float(rho.get(n, math.nan))), (lambda n: float(pooled.get(n, math.nan)))


def indicator_grid(fig, pairs, names: list, summary, backbone: str, bold=()) -> None:
    """`indicator_scatter` for every indicator in `names`, four to a row, one legend of target tasks; the names
    in `bold` get bold titles."""
    ncol = min(4, len(names))
    axes = np.atleast_1d(fig.subplots(math.ceil(len(names) / ncol), ncol, squeeze=False)).ravel()
    targets = sorted(pairs.target_task.unique())
    colours = {t: f"C{i % 10}" for i, t in enumerate(targets)}
    rho, pooled = _spearman(summary)
    for ax, name in zip(axes, names, strict=False):
        indicator_scatter(ax, pairs, name, rho(name), pooled(name), colours, name in bold)
    for ax in axes[::ncol]:
        ax.set_ylabel("relative transfer", fontsize=8.5)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), fontsize=8.5,
               title="target task", title_fontsize=8.5)
    fig.suptitle(f"{backbone}: indicator vs zero-shot transfer, one point per (source prompt, target task); "
                 "ρ̄ = mean Spearman over targets", fontsize=10.5, fontweight="bold")


def indicator_pngs(pairs, indicators, summary, out_dir) -> list[Path]:
    """The indicators stage's PNGs: one `indicator_scatter` per indicator, out_dir/scatter_NAME.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = pairs.dropna(subset=["y"])
    rho, pooled = _spearman(summary)
    paths = []
    for name in indicators:
        fig = new_figure(5, 4)
        ax = fig.subplots()
        indicator_scatter(ax, rows, name, rho(name), pooled(name))
        ax.set_ylabel("relative transfer", fontsize=8.5)
        if rows["target_task"].nunique() <= 20:
            ax.legend(fontsize=6, ncol=2)
        paths.append(save(fig, out_dir / f"scatter_{name}.png"))
    return paths


def layer_of(name: str) -> tuple[str, int, int] | None:
    """'on.layer_3' -> ('on', 3, 3); 'on_jaccard.layers_1-3' -> ('on_jaccard', 1, 3); else None."""
    base, _, rest = name.partition(".")
    try:
        if rest.startswith("layer_"):
            k = int(rest[6:])
            return base, k, k
        if rest.startswith("layers_"):
            a, b = rest[7:].split("-")
            return base, int(a), int(b)
    except ValueError:
        return None
    return None


def layer_profile(ax, win, main, backbone: str, bases) -> None:
    """Spearman of per-layer ON (points with 95% CIs) and layer windows (wide bars) with transfer; dashed: ON of
    all layers. `win`: the spearman rows of correlations_windows; `main`: the correlations table; `bases`: the
    measures drawn (indicators.MAIN_ON)."""
    from matplotlib.ticker import MaxNLocator

    for i, base in enumerate(b for b in bases if any(layer_of(n) and layer_of(n)[0] == b for n in win.indicator)):
        colour = f"C{i}"
        rows = [(layer_of(r.indicator), r) for r in win.itertuples() if layer_of(r.indicator)
                and layer_of(r.indicator)[0] == base]
        single = sorted(((lay[1], r) for lay, r in rows if lay[1] == lay[2]), key=lambda kr: kr[0])
        if single:
            x = np.array([k for k, _ in single]) + (i - 0.5) * 0.12
            y = np.array([r.mean_over_targets for _, r in single], float)
            err = np.array([[r.mean_over_targets - r.ci_low, r.ci_high - r.mean_over_targets] for _, r in single]).T
            ax.errorbar(x, y, yerr=np.where(np.isfinite(err), err, 0), color=colour, marker="o", capsize=3,
                        label=f"{base}, one layer")
        for lay, r in rows:
            if lay[1] != lay[2]:
                ax.hlines(r.mean_over_targets, lay[1] - 0.4, lay[2] + 0.4, color=colour, lw=5, alpha=0.35)
        whole = main[(main.indicator == base) & (main.method == "spearman")]
        if len(whole):
            ax.axhline(whole.mean_over_targets.iloc[0], color=colour, ls="--", lw=1, label=f"{base}, all layers")
    ax.axhline(0, color="black", lw=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (wide bars: windows of layers)", fontsize=9)
    ax.set_ylabel("Spearman with transfer (mean over targets)", fontsize=9)
    _title(ax, f"{backbone}: where in the network ON predicts transfer (95% CI)")
    ax.legend(fontsize=8)
