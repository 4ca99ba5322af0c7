"""Transferability indicators: prompt-embedding similarities, ON (see activations.py), correlation with transfer.

Correlation follows Su et al.: for each target task, over its source prompts (the target task's own prompts
excluded), correlate the indicator between a source prompt and the target task's own prompt with the zero-shot
transfer score; average over targets. Also pooled over all (source, target) pairs. Confidence intervals come
from a seeded bootstrap over pairs (within each target for the mean over targets).
"""

import logging
import warnings

import numpy as np
import pandas as pd
import torch

from ptx.errors import PtxError

log = logging.getLogger(__name__)
EMBEDDING_INDICATORS = ("e_concat_cos", "e_concat_euclid", "e_avg_cos", "e_avg_euclid", "mean_cos")
# Displacement variants: the same measures of (prompt - its own init), and ON of the neurons whose state the
# training changed (mask(prompt) XOR mask(init)). Two prompts that start from one init share it in the raw
# measures whatever their tasks; the displacement measures only see what training added.
DISP = "_disp"
METHODS = ("spearman", "pearson", "kendall")
MIN_SOURCES = 3  # fewer source prompts than this: a target's correlation is undefined


# ---- embedding similarity -----------------------------------------------------------------------------
def stack_prompts(prompts) -> torch.Tensor:
    """A list of [n, d] prompts (or a stack) -> [P, n, d]; differing widths or lengths are an error."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 3:
            raise PtxError(f"prompts: expected a stack [P, n_tokens, d_model], found shape {list(prompts.shape)}")
        return prompts.float()
    shapes = sorted({tuple(p.shape) for p in prompts})
    if len({s[-1] for s in shapes}) > 1:
        raise PtxError(f"prompts: widths differ {sorted({s[-1] for s in shapes})}; embedding similarity needs one "
                       "backbone (project across backbones first)")
    if len(shapes) > 1:
        raise PtxError(f"prompts: lengths differ {sorted({s[0] for s in shapes})}; expected one [n_tokens, d_model]")
    return torch.stack([p.float() for p in prompts])


def _inv_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.cdist(a.double(), b.double()).float())


def embedding_similarities(prompts, drop_first: bool = False, block: int = 2_000_000) -> dict[str, torch.Tensor]:
    """Pairwise similarities of prompts [P, n, d] -> {name: [P, P]} (see EMBEDDING_INDICATORS).

    e_concat_*: of the flattened prompts; e_avg_cos: the mean cosine over all token pairs (i of one prompt, j of
    the other); e_avg_euclid: 1 / (1 + the mean Euclidean distance over all token pairs), as the paper's code
    computes it; mean_cos: cosine of the mean-pooled prompts; e_concat_euclid: 1 / (1 + distance of the
    flattened prompts). `drop_first` leaves out row 0 (the paper's RoBERTa layout overwrote it with <mask>).
    """
    x = stack_prompts(prompts)
    x = x[:, 1:] if drop_first else x
    p, n, _ = x.shape
    flat = x.reshape(p, -1)
    unit = torch.nn.functional.normalize(flat, dim=1)
    tok_unit = torch.nn.functional.normalize(x, dim=2).mean(1)  # mean_ij cos(a_i, b_j) = mean(â) · mean(b̂)
    pooled = torch.nn.functional.normalize(x.mean(1), dim=1)
    tokens = x.reshape(p * n, -1)
    rows = max(1, block // (n * n * p))  # prompts per block of the [rows*n, P*n] token distance matrix
    mean_dist = torch.cat([torch.cdist(tokens[s * n:(s + rows) * n].double(), tokens.double()).view(-1, n, p, n)
                           .mean((1, 3)) for s in range(0, p, rows)])
    e_avg_euclid = (1.0 / (1.0 + mean_dist)).float()
    return {"e_concat_cos": unit @ unit.T, "e_concat_euclid": _inv_dist(flat, flat),
            "e_avg_cos": tok_unit @ tok_unit.T, "e_avg_euclid": e_avg_euclid, "mean_cos": pooled @ pooled.T}


def displacement_similarities(prompts, inits, drop_first: bool = False) -> dict[str, torch.Tensor]:
    """The embedding measures of each prompt's displacement from its own init, prompts and inits [P, n, d] ->
    {name + "_disp": [P, P]}."""
    x, x0 = stack_prompts(prompts), stack_prompts(inits)
    if x.shape != x0.shape:
        raise PtxError(f"inits: shape {list(x0.shape)} does not match the prompts' {list(x.shape)}")
    return {f"{k}{DISP}": v for k, v in embedding_similarities(x - x0, drop_first).items()}


def displacement_overlap(masks: torch.Tensor, init_masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """ON of the neurons training changed: masks and init_masks bool [P, L, F] -> {"on_disp", "on_jaccard_disp"}."""
    from ptx.activations import overlap_matrices

    changed = masks ^ init_masks
    full = overlap_matrices(changed, k=changed.shape[1])
    return {f"{k}{DISP}": full[k] for k in MAIN_ON}


# ---- correlation with transfer ------------------------------------------------------------------------
def transfer_pairs(transfer: pd.DataFrame, indicators: dict, run_ids: list, run_tasks: list,
                   own_runs: dict | None = None, score: str = "relative_value", split: str | None = None,
                   metric: str | None = None) -> pd.DataFrame:
    """(target, source prompt) pairs: target_task, source_task, source_run, y (transfer score) and one column per
    indicator (between the source prompt and the mean over the target task's own prompts)."""
    need = {"source_prompt_run", "source_task", "target_task", score}
    if missing := need - set(transfer.columns):
        raise PtxError(f"transfer table: missing columns {sorted(missing)}; found {list(transfer.columns)}")
    t = transfer
    if "split" in t.columns and t["split"].nunique() > 1:
        split = split or next((s for s in ("test", "dev") if s in set(t["split"])), sorted(t["split"].unique())[0])
    if split is not None and "split" in t.columns:
        if split not in set(t["split"]):
            raise PtxError(f"transfer table: no rows for split '{split}'; found {sorted(t['split'].unique())}")
        t = t[t["split"] == split]
    if metric is not None:
        t = t[t["metric"] == metric]
    elif "metric" in t.columns and (several := t.groupby("target_task")["metric"].nunique()).max() > 1:
        raise PtxError(f"transfer table: targets {list(several[several > 1].index)} have several metrics; pass metric=")
    index = {r: i for i, r in enumerate(run_ids)}
    own = own_runs or {}
    if not own_runs:
        for r, task in zip(run_ids, run_tasks, strict=True):
            own.setdefault(task, []).append(r)
    known = t["source_prompt_run"].isin(index)
    if (~known).any():
        log.info("transfer table: %d rows whose source is not in the bank (e.g. a random prompt) left out",
                 int((~known).sum()))
    t = t[known & (t["source_task"] != t["target_task"])]
    t = t.groupby(["target_task", "source_task", "source_prompt_run"], as_index=False)[score].mean()
    parts = []
    for target, rows in t.groupby("target_task"):
        cols = [index[r] for r in own.get(target, []) if r in index]
        rows = rows[~rows["source_prompt_run"].isin(own.get(target, []))]
        if not cols or rows.empty:
            why = "no prompt of the target task in the bank" if not cols else "no source prompt in the bank"
            parts.append(pd.DataFrame({"target_task": [target], "n_own": [len(cols)], "y": [np.nan], "reason": why}))
            continue
        src = [index[r] for r in rows["source_prompt_run"]]
        part = pd.DataFrame({"target_task": target, "source_task": rows["source_task"].to_numpy(),
                             "source_run": rows["source_prompt_run"].to_numpy(), "y": rows[score].to_numpy(float),
                             "n_own": len(cols)})
        for name, mat in indicators.items():
            m = torch.as_tensor(mat).float()
            part[name] = m[src][:, cols].mean(1).numpy()
        parts.append(part)
    if not parts:
        raise PtxError("transfer table: no (source, target) pair between prompts of the bank")
    return pd.concat(parts, ignore_index=True)


def _rank(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=-1)


def row_corr(x: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Correlation of each row pair, x, y [B, n] -> [B] (NaN for a constant row); tau-b for Kendall."""
    if method == "kendall":  # tau-b = sum(sx*sy) / sqrt(#pairs untied in x * #pairs untied in y), i < j
        i, j = np.triu_indices(x.shape[1], 1)
        out = np.empty(x.shape[0])
        step = max(1, 8_000_000 // max(1, len(i)))
        for s in range(0, x.shape[0], step):
            sx = np.sign(x[s:s + step, i] - x[s:s + step, j]).astype(np.int8)
            sy = np.sign(y[s:s + step, i] - y[s:s + step, j]).astype(np.int8)
            num = np.einsum("bk,bk->b", sx, sy, dtype=np.int64)
            nx, ny = np.count_nonzero(sx, axis=1), np.count_nonzero(sy, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[s:s + step] = num / np.sqrt(nx.astype(float) * ny)
        return out
    if method == "spearman":
        x, y = _rank(x), _rank(y)
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (xc * yc).sum(1) / np.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))


def correlation(x, y, method: str) -> tuple[float, str | None]:
    """One correlation via scipy.stats and why it is undefined (NaN, reason) when it is."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < MIN_SOURCES:
        return float("nan"), f"fewer than {MIN_SOURCES} source prompts ({len(x)})"
    if np.ptp(x) == 0:
        return float("nan"), "constant indicator values"
    if np.ptp(y) == 0:
        return float("nan"), "constant transfer scores"
    fn = {"spearman": stats.spearmanr, "pearson": stats.pearsonr, "kendall": stats.kendalltau}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y).statistic), None


def correlate_indicators(pairs: pd.DataFrame, indicators, methods=METHODS, bootstrap: int = 1000,
                         seed: int = 0, ci: float = 0.95) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Correlate each indicator column of `pairs` with y: (summary, per_target) tables.

    summary: indicator, method, mean_over_targets, ci_low, ci_high, pooled, pooled_ci_low, pooled_ci_high,
    n_targets_defined, n_targets, n_pairs. The bootstrap resamples the same pairs for every indicator.
    """
    rng = np.random.default_rng(seed)
    reasons = pairs.dropna(subset=["reason"]).set_index("target_task")["reason"].to_dict() if "reason" in pairs else {}
    valid = pairs.dropna(subset=["y"])
    groups = {t: valid[valid["target_task"] == t] for t in sorted(pairs["target_task"].unique())}
    boot = {t: rng.integers(0, len(g), (bootstrap, len(g))) for t, g in groups.items() if len(g) >= MIN_SOURCES}
    pooled_idx = rng.integers(0, len(valid), (bootstrap, len(valid))) if len(valid) >= MIN_SOURCES else None
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
    summary, per_target = [], []
    for name in indicators:
        for method in methods:
            values, boots = {}, []
            for t, g in groups.items():
                r, why = correlation(g[name], g["y"], method) if len(g) else (float("nan"), reasons.get(t))
                values[t] = r
                per_target.append({"indicator": name, "method": method, "target_task": t, "n_sources": len(g),
                                   "value": r, "reason": why})
                if np.isfinite(r):
                    boots.append(row_corr(g[name].to_numpy(float)[boot[t]], g["y"].to_numpy(float)[boot[t]], method))
            defined = [r for r in values.values() if np.isfinite(r)]
            pooled, _ = correlation(valid[name], valid["y"], method)
            with warnings.catch_warnings():  # a resample may be constant: NaN, left out of the percentiles
                warnings.simplefilter("ignore", RuntimeWarning)
                lo = hi = plo = phi = np.nan
                if boots and bootstrap:
                    lo, hi = np.nanpercentile(np.nanmean(np.stack(boots), 0), q)
                if pooled_idx is not None and np.isfinite(pooled) and bootstrap:
                    pb = row_corr(valid[name].to_numpy(float)[pooled_idx], valid["y"].to_numpy(float)[pooled_idx], method)
                    plo, phi = np.nanpercentile(pb, q)
            summary.append({"indicator": name, "method": method,
                            "mean_over_targets": float(np.mean(defined)) if defined else np.nan,
                            "ci_low": float(lo), "ci_high": float(hi), "pooled": pooled, "pooled_ci_low": float(plo),
                            "pooled_ci_high": float(phi), "n_targets_defined": len(defined),
                            "n_targets": len(groups), "n_pairs": len(valid)})
    return pd.DataFrame(summary), pd.DataFrame(per_target)


def within_seed(transfer: pd.DataFrame, indicators: dict, run_ids: list, run_tasks: list, run_seeds: list,
                names, methods=METHODS) -> pd.DataFrame:
    """Correlations computed inside one seed: for each seed, sources and the target's own prompts are that seed's
    prompts only; per (target, seed) correlation, averaged. Rows: indicator, method, within_seed, n_within_seed."""
    values: dict = {(n, m): [] for n in names for m in methods}
    for seed in sorted({s for s in run_seeds if s is not None}, key=str):
        mine = [r for r, s in zip(run_ids, run_seeds, strict=True) if s == seed]
        own: dict = {}
        for r, task, s in zip(run_ids, run_tasks, run_seeds, strict=True):
            if s == seed:
                own.setdefault(task, []).append(r)
        table = transfer[transfer["source_prompt_run"].isin(mine)]
        if len(own) < 2 or table.empty:
            continue
        pairs = transfer_pairs(table, indicators, run_ids, run_tasks, own).dropna(subset=["y"])
        for _, g in pairs.groupby("target_task"):
            for n in names:
                for m in methods:
                    r, _ = correlation(g[n], g["y"], m)
                    if np.isfinite(r):
                        values[n, m].append(r)
    return pd.DataFrame([{"indicator": n, "method": m, "within_seed": float(np.mean(v)) if v else np.nan,
                          "n_within_seed": len(v)} for (n, m), v in values.items()])


def rankings(pairs: pd.DataFrame, indicators) -> pd.DataFrame:
    """Per target task, source prompts ranked by each indicator: target_task, source_task, source_run
    (also as source_prompt_run, the transfer table's name), indicator, score, rank (1 = the most similar)."""
    rows = pairs.dropna(subset=["source_run"])
    out = []
    for name in indicators:
        part = rows[["target_task", "source_task", "source_run", name]].rename(columns={name: "score"})
        rank = part.groupby("target_task")["score"].rank(ascending=False, method="first").astype(int)
        out.append(part.assign(indicator=name, source_prompt_run=part["source_run"], rank=rank))
    return pd.concat(out, ignore_index=True).sort_values(["indicator", "target_task", "rank"], ignore_index=True)


# ---- analysis of a bank: inits, tables of correlations and rankings -----------------------------------
MAIN_ON = ("on", "on_jaccard")


def bank_inits(bank, backbone_name: str, insertion: str) -> torch.Tensor | None:
    """The init of every prompt of a `ptx.bank.Bank` [P, n, d], rebuilt from its metadata (prompt.json), or None
    when one cannot be rebuilt (an imported prompt): the displacement indicators then stay out."""
    from ptx.backbones import load_backbone
    from ptx.prompt import SEEDED, TEXTUAL, reconstruct_init

    metas = bank.metas
    if any((m.get("init") or {}).get("mode") not in (*SEEDED, *TEXTUAL) for m in metas):
        log.info("displacement indicators left out: some prompts have no rebuildable init (imported or transferred)")
        return None
    backbone = load_backbone(backbone_name, insertion=insertion)
    inits = [reconstruct_init(m, backbone) for m in metas]
    if any(i is None for i in inits):
        log.info("displacement indicators left out: %d prompt(s) record no init seed or text",
                 sum(i is None for i in inits))
        return None
    return stack_prompts(inits)


def analyse(transfer: pd.DataFrame, matrices: dict, ids: list, tasks: list, own: dict | None, out_dir,
            bootstrap: int, seed: int = 0, window_methods=("spearman",), seeds: list | None = None) -> dict:
    """Correlate every indicator matrix with transfer; write the tables (parquet) and plots under `out_dir`.

    `seeds` (one per prompt) adds the columns within_seed and n_within_seed to the correlations table.
    """
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = [n for n in matrices if n.removesuffix(DISP) in EMBEDDING_INDICATORS or n.removesuffix(DISP) in MAIN_ON]
    windows = [n for n in matrices if n not in main]
    pairs = transfer_pairs(transfer, matrices, ids, tasks, own)
    summary, per_target = correlate_indicators(pairs, main, bootstrap=bootstrap, seed=seed)
    win, win_targets = correlate_indicators(pairs, windows, window_methods, bootstrap, seed) if windows else (None, None)
    if seeds is not None:
        ws = within_seed(transfer, {n: matrices[n] for n in main}, ids, tasks, seeds, main)
        summary = summary.merge(ws, on=["indicator", "method"], how="left")
    long = pd.concat([pd.DataFrame({"indicator": n, "source_run": np.repeat(ids, len(ids)),
                                    "target_run": np.tile(ids, len(ids)), "value": torch.as_tensor(m).flatten().numpy()})
                      for n, m in matrices.items() if not n.split(".")[-1].startswith("layer_")], ignore_index=True)
    tables = {"indicators": long, "correlations": summary, "correlations_per_target": per_target,
              "pairs": pairs, "recommendations": rankings(pairs, main)}
    if win is not None:
        tables.update(correlations_windows=win, correlations_windows_per_target=win_targets)
    for name, df in tables.items():
        df.to_parquet(out / f"{name}.parquet", index=False)
    from ptx.figures import indicator_pngs

    indicator_pngs(pairs, main, summary, out / "plots")
    return tables


def summary_metrics(tables: dict) -> dict:
    """{method.indicator: mean over targets} of the correlation tables, for the run's MLflow metrics (NaN left out)."""
    rows = pd.concat([t for k, t in tables.items() if k in ("correlations", "correlations_windows")])
    return {f"{r.method}.{r.indicator}": r.mean_over_targets for r in rows.itertuples() if np.isfinite(r.mean_over_targets)}
