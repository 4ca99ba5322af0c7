"""The TPT stage: transfer-initialised prompt tuning beside vanilla PT (same seeds), with its convergence speed-up.
"""

import dataclasses
import logging
import math
from pathlib import Path

from ptx import track
from ptx.bank import best_prompt_run, fetch_prompt
from ptx.config import TptSource
from ptx.errors import PtxError, suggest
from ptx.figures import convergence_png
from ptx.io import config_hash
from ptx.prompt import load_prompt
from ptx.stages.transfer import load_transfer_table
from ptx.transfer import (
    KIND_TPT,
    RANDOM,
    censored_speedups,
    convergence_speedup,
    score_curve,
    task_spec,
)

log = logging.getLogger(__name__)
NAME, KIND, UNITS, SECTION = "tpt", KIND_TPT, "trials", "tpt"


def _best_run(tracker, task: str, backbone: str) -> str:
    return best_prompt_run(tracker, task, backbone, all_experiments=False).run_id


def _indicator_sources(tracker, backbone: str, study: str, indicator: str) -> dict:
    """target -> (run, task) from the indicators run's recommendations.parquet (indicator, target_task, source_task,
    optional source_prompt_run, rank or score)."""
    runs = tracker.find_runs({"ptx.kind": track.KIND_INDICATORS, "ptx.backbone": backbone, "ptx.study": study},
                             order_by=["attributes.start_time DESC"], experiment_ids=tracker.all_experiment_ids())
    if not runs:
        raise PtxError(f"tpt.source 'indicator:{indicator}': no finished indicators run for backbone '{backbone}' of "
                       f"study '{study}' in {tracker.uri}; the indicators stage must run first")
    try:
        recs = tracker.read_table(runs[0].run_id, track.KIND_INDICATORS, "recommendations.parquet").to_pandas()
    except (PtxError, OSError) as exc:
        raise PtxError(f"indicators run {runs[0].run_id} has no readable indicators/recommendations.parquet "
                       f"({exc})") from None
    d = recs[recs["indicator"] == indicator]
    if d.empty:
        raise PtxError(f"tpt.source: unknown indicator '{indicator}'{suggest(indicator, recs['indicator'].unique())}; "
                       f"the indicators run has {sorted(recs['indicator'].unique())}")
    d = d[d.source_task != d.target_task]
    d = d.sort_values("rank") if "rank" in d else d.sort_values("score", ascending=False) if "score" in d else d
    out = {}
    for target, g in d.groupby("target_task", sort=False):
        row = g.iloc[0]
        run = row.get("source_prompt_run")
        out[target] = (run if isinstance(run, str) and run else _best_run(tracker, row.source_task, backbone),
                       row.source_task)
    return out


SOURCE_MODES = tuple(m.value for m in TptSource)  # the named modes; indicator:<name> and task names besides


def choose_sources(spec, tracker, backbone: str, mode: str | None = None) -> dict:
    """target task -> (source prompt run, source task), or a reason string when the target has no source.
    `mode`: one of the study's TPT source modes (default: its first)."""
    mode = mode or spec.tpt.source_modes[0]
    if mode.startswith("indicator:"):
        picks = _indicator_sources(tracker, backbone, spec.name, mode.split(":", 1)[1])
        return {t: picks.get(t, f"the indicator recommends no source for '{t}'") for t in spec.tasks}
    named = None
    if mode not in SOURCE_MODES:
        from ptx.tasks import list_tasks

        names = [t.name for t in list_tasks()]
        if mode not in names:
            raise PtxError(f"tpt.source: expected {', '.join(SOURCE_MODES)}, indicator:<name> or a task name, "
                           f"found '{mode}'{suggest(mode, [*names, *SOURCE_MODES])}")
        named = mode
    try:
        table = load_transfer_table(tracker, backbone, spec.name)
    except PtxError:
        if named is None:
            raise
        table = None  # a named source needs no matrix: its best dev prompt is taken
    if table is not None and not (table["split"] == "dev").any():
        raise PtxError(f"tpt.source '{mode}' picks sources on the dev split; the transfer matrix of backbone "
                       f"'{backbone}' has splits {sorted(table['split'].unique())}")
    score = selection_scores(table) if table is not None else {}
    out = {}
    for target in spec.tasks:
        if named == target:
            out[target] = f"the source task is the target itself ('{target}')"
            continue
        if table is None:
            out[target] = (_best_run(tracker, named, backbone), named)
            continue
        d = table[(table.target_task == target) & (table.split == "dev") & (table.source_prompt_run != RANDOM)
                  & (table.source_task != target)]  # the candidates; they are ranked by `score`, not by these rows
        d = d[d.source_category == d.target_category] if mode == "best_same_category" else d
        d = d[d.source_category != d.target_category] if mode == "best_cross_category" else d
        d = d[d.source_task == named] if named else d
        if d.empty:
            kind = {"best_same_category": "same-category ", "best_cross_category": "cross-category "}.get(mode, "")
            out[target] = f"no {kind}source prompt for '{target}'"
        else:
            d = d.assign(select=[score.get((r, target), -math.inf) for r in d.source_prompt_run])
            row = d.sort_values(["select", "source_prompt_run"], ascending=[False, True]).iloc[0]
            out[target] = (row.source_prompt_run, row.source_task)
    return out


def selection_scores(table) -> dict:
    """(source prompt run, target task) -> the score a source is picked by, on data TPT's convergence curve never
    reads (the curve is the target's dev split): the zero-shot score on the target's train split when the matrix
    has one, else the source prompt's score on its own task's dev split (fixed before any target data is seen).
    Picking on the target's dev split favoured "reached vanilla's best at init": the winner of a noisy dev score
    starts the curve high on those same examples."""
    bank = table[table.source_prompt_run != RANDOM]
    train = bank[bank.split == "train"]
    if len(train):
        return {(r.source_prompt_run, r.target_task): float(r.value) for r in train.itertuples()}
    own = bank[(bank.split == "dev") & (bank.source_task == bank.target_task)]
    own_dev = dict(zip(own.source_prompt_run, own.value.astype(float), strict=True))
    return {(r, t): own_dev.get(r, -math.inf) for r, t in zip(bank.source_prompt_run, bank.target_task, strict=True)}


def tpt_request(vanilla, init_from: str):
    """The TPT twin of a vanilla request: started from `init_from`, and never stopped early on patience, so it
    can reach vanilla's best at any step of its budget (vanilla may have found it late)."""
    return dataclasses.replace(vanilla, init="artifact", init_from=init_from,
                               settings=dataclasses.replace(vanilla.settings, patience=None))


def run_tpt_stage(spec, tracker, workdir: Path, address: str | None = None) -> dict:
    """Train TPT beside vanilla PT (same seeds) per target as Tune trials; log speed-ups and curves per backbone."""
    from ptx import sweep
    from ptx.config import Scheduler, Search

    workdir = Path(workdir).resolve()
    tracker = tracker.for_experiment(spec.name, workdir)  # the study's experiment, where its sweeps log
    settings = spec.train if spec.tpt.steps is None else dataclasses.replace(spec.train, steps=spec.tpt.steps)
    plan, skipped = [], []
    for name in spec.backbones:
        for mode, target, pick in ((m, t, p) for m in spec.tpt.source_modes
                                   for t, p in choose_sources(spec, tracker, name, m).items()):
            if isinstance(pick, str):
                log.warning("TPT: skipping %s on %s (%s): %s", target, name, mode, pick)
                skipped.append({"backbone": name, "target_task": target, "source_mode": mode, "reason": pick})
                continue
            dest = fetch_prompt(tracker, pick[0], workdir)  # fetched once here, not by concurrent trials racing for it
            n_tok = load_prompt(dest).prompt.shape[0]
            if n_tok != spec.prompt_length:
                raise PtxError(f"TPT source {pick[0]} ({pick[1]}) has {n_tok} prompt tokens; study '{spec.name}' "
                               f"trains prompts of prompt_length {spec.prompt_length}")
            for seed in spec.tpt.seeds or spec.seeds:  # vanilla = the training stage's request: reused by its hash
                vanilla = sweep.study_request(spec, target, name, seed, settings)
                plan.append((name, mode, target, pick, seed, vanilla, tpt_request(vanilla, pick[0])))
    out = {"study": spec.name, "skipped": skipped, "backbones": {}}
    if not plan:
        return out
    sweep.connect(address)
    # no search space and no early stopping: every trial runs its full curve, so the curves compare
    tpt_sweep = sweep.sweep_settings(spec, workdir, name=f"{spec.name}-tpt", tags={"ptx.stage": "tpt"},
                                     search=Search(), scheduler=Scheduler())
    # a vanilla run serves every source mode, and two modes may pick the same source: each request once
    requests = list({r.hash(): r for p in plan for r in p[5:]}.values())
    res = sweep.run_requests(requests, tpt_sweep, workdir, tracker.uri)
    out["sweep"] = {k: res[k] for k in ("trials", "errored", "parent_run_id")}
    for name in spec.backbones:
        rows, curves = [], {}
        for bb, mode, target, (src_run, src_task), seed, vreq, treq in plan:
            if bb != name:
                continue
            metric = task_spec(target).metric
            row = {"backbone": name, "source_mode": mode, "target_task": target, "source_task": src_task,
                   "source_prompt_run": src_run, "seed": seed, "metric": metric}
            v, t = tracker.finished_run(track.KIND_PROMPT, vreq.hash()), tracker.finished_run(track.KIND_PROMPT, treq.hash())
            if v is None or t is None:
                rows.append({**row, "flag": "run_missing", "flag_90": "run_missing", "speedup": math.nan})
                continue
            vc, tc = (score_curve(tracker.metric_history(r.run_id, f"dev_{metric}")) for r in (v, t))
            rows.append({**row, **convergence_speedup(vc, tc), "vanilla_run": v.run_id, "tpt_run": t.run_id})
            curves.setdefault((target, mode), []).append((seed, vc, tc))
        if rows:
            out["backbones"][name] = _log_tpt(tracker, spec, name, rows, curves,
                                              workdir / "tpt" / name.replace("/", "_"))
    return out


def _log_tpt(tracker, spec, backbone: str, rows: list, curves: dict, local: Path) -> dict:
    """Per-seed and seed-averaged speed-up tables plus a curve plot per target, logged as a ptx.kind=tpt run."""
    import pandas as pd

    local.mkdir(parents=True, exist_ok=True)
    seeds = pd.DataFrame(rows)
    keys = ["backbone", *(["source_mode"] if "source_mode" in seeds else []), "target_task", "source_task",
            "source_prompt_run", "metric"]
    num = [c for c in ("vanilla_best", "tpt_best", "vanilla_steps", "tpt_steps", "vanilla_steps_90", "tpt_steps_90")
           if c in seeds]
    agg = seeds.groupby(keys, sort=False)[num].mean().reset_index()  # the speed-ups: censored_speedups below
    grouped = seeds.groupby(keys, sort=False)
    agg["n_seeds"] = grouped.size().to_numpy()
    agg["flags"] = grouped["flag"].agg(lambda f: ",".join(sorted(set(f)))).to_numpy()
    for suffix in ("", "_90"):
        per = [censored_speedups(g.to_dict("records"), suffix) for _, g in grouped]
        for key in per[0]:
            if key != "n_runs":
                agg[f"{key}{suffix}"] = [p[key] for p in per]
    overall = {f"{k}{suffix}": v for suffix in ("", "_90") for k, v in censored_speedups(rows, suffix).items()}
    seeds.to_parquet(local / "tpt_seeds.parquet", index=False)
    agg.to_parquet(local / "tpt.parquet", index=False)
    several = len({mode for _, mode in curves}) > 1
    for (target, mode), cs in curves.items():  # one plot per target (and source mode when there are several)
        name = f"{target}_{mode}" if several else target
        convergence_png(cs, name, task_spec(target).metric, local / f"curves_{name}.png")
    tags = {"ptx.kind": KIND_TPT, "ptx.backbone": backbone, "ptx.study": spec.name,
            "ptx.config_hash": config_hash(sorted(f"{r.get('vanilla_run')}:{r.get('tpt_run')}" for r in rows))}
    with tracker.run(track.run_name("tpt", spec.name, backbone), tags, reuse=False) as run:
        finite = {k: v for k, v in overall.items() if math.isfinite(v)}  # MLflow takes no inf; the tables keep it
        tracker.log(run.run_id, {**finite, "targets": len(agg)}, params={"source": ",".join(spec.tpt.source_modes)})
        tracker.log_artifacts(run.run_id, local, KIND_TPT)
    return {"run_id": run.run_id, "parquet": str(local / "tpt.parquet"), "table": agg.to_dict("records"),
            "overall": overall}


def run(spec, tracker, workdir, *, force: bool = False, max_concurrent: int | None = None,
        address: str | None = None) -> dict:
    """The stage's entry: run_tpt_stage. `force` and `max_concurrent` are the train stage's: a TPT or vanilla run is
    a prompt request, reused by its hash, and the TPT sweep runs as many trials at once as the spec says."""
    return run_tpt_stage(spec, tracker, workdir, address=address)
