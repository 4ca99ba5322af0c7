"""Cross-task transfer: the zero-shot matrix (many prompts per forward pass), its resumable distributed stage,
and transfer-initialised prompt tuning (TPT) with its convergence speed-up.

A matrix unit is one (backbone, target task): one Ray task loads the backbone, tokenizes each target split
once and scores every bank prompt on it, `prompts_per_pass` prompts stacked in each forward pass. Each unit
is its own MLflow run (`ptx.kind=transfer_unit`) keyed by a config hash, so an interrupted matrix resumes
with only its missing units.
"""

import dataclasses
import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ptx import progress, track
from ptx.config import config_hash
from ptx.errors import PtxError, suggest
from ptx.prompt import PromptArtifact, check_compatible, init_prompt, load_prompt

log = logging.getLogger(__name__)
KIND_UNIT, KIND_TPT = "transfer_unit", "tpt"
RANDOM = "random"  # source_prompt_run / source_task / source_category of the random-prompt baseline
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


def _spec(task, max_length: int | None = None):
    from ptx.tasks import load_task

    return load_task(task, max_length=max_length) if isinstance(task, str) else task


def _sources(prompts: dict, backbone) -> list[Source]:
    """Normalise the bank (PromptArtifact, (tensor, meta) or {"prompt", "meta"}) and check every prompt fits."""
    if not prompts:
        raise PtxError(f"the prompt bank for backbone '{backbone.name}' is empty: train prompts first "
                       "(ptx train / the study's train stage) or pass at least one prompt")
    out = []
    for name, item in prompts.items():
        if isinstance(item, PromptArtifact):
            tensor, meta = item.prompt, item.meta
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            tensor, meta = item
        elif isinstance(item, dict) and "prompt" in item:
            tensor, meta = item["prompt"], item.get("meta") or {}
        else:
            raise PtxError(f"prompt '{name}': expected a PromptArtifact or a (tensor, meta) pair, "
                           f"found {type(item).__name__}")
        check_compatible(meta, backbone, where=f"prompt '{name}'")
        if not torch.is_tensor(tensor) or tensor.dim() != 2 or tensor.shape[1] != backbone.d_model:
            raise PtxError(f"prompt '{name}': expected a tensor [n_tokens, {backbone.d_model}] for backbone "
                           f"'{backbone.name}', found {list(getattr(tensor, 'shape', [])) or type(tensor).__name__}")
        if meta.get("insertion", backbone.insertion.value) != backbone.insertion.value:
            raise PtxError(f"prompt '{name}' uses insertion '{meta['insertion']}'; backbone '{backbone.name}' was "
                           f"loaded with '{backbone.insertion.value}'")
        task = meta.get("task")
        task = task.get("name") if isinstance(task, dict) else task
        if not task:
            raise PtxError(f"prompt '{name}': its metadata names no task (expected meta['task']['name'])")
        dev = (meta.get("dev_metric") or {}).get("value")
        out.append(Source(str(name), tensor.detach().float().cpu(), task, meta.get("category") or _spec(task).category,
                          dev))
    return out


def check_targets(backbone_name: str, kind: str, targets) -> None:
    """Raise when a target cannot be scored on this backbone kind (generation needs seq2seq)."""
    for spec in targets:
        if spec.kind == "generation" and kind != "seq2seq":
            raise PtxError(f"target task '{spec.name}' is a generation task; backbone '{backbone_name}' is {kind} "
                           "and only scores label words: generation targets need a seq2seq backbone")


def _limit(limits, split: str):
    return limits.get(split) if isinstance(limits, dict) else limits


def transfer_matrix(backbone, prompts: dict, targets: list, splits=("dev", "test"), limits=None,
                    prompts_per_pass: int = 8, batch_size: int = 32, random_baseline: bool = True, seed: int = 0,
                    progress: bool = False) -> pa.Table:
    """Zero-shot score of every bank prompt [n, d] (+ a random prompt) on every target split, as a long table."""
    from ptx.data import encode_split
    from ptx.evaluate import score_prompts

    targets = [_spec(t) for t in targets]
    if not targets:
        raise PtxError("transfer_matrix: no target tasks given")
    check_targets(backbone.name, backbone.kind.value, targets)
    sources = _sources(prompts, backbone)
    if random_baseline:  # the bank's commonest length, so it stacks with most prompts
        n_tok = Counter(s.prompt.shape[0] for s in sources).most_common(1)[0][0]
        sources.append(Source(RANDOM, init_prompt(backbone, n_tok, "random", seed=seed), RANDOM, RANDOM))
    groups = []  # prompts of one length stack into one pass
    for n_tok in sorted({s.prompt.shape[0] for s in sources}):
        same = [s for s in sources if s.prompt.shape[0] == n_tok]
        groups += [same[i:i + max(1, prompts_per_pass)] for i in range(0, len(same), max(1, prompts_per_pass))]
    rows = []
    for spec in targets:
        scores, sizes = {}, {}
        for split in splits:
            encoded = encode_split(spec, backbone, split, limit=_limit(limits, split))
            sizes[split] = len(encoded)
            for group in groups:
                values = score_prompts(backbone, torch.stack([s.prompt for s in group]), spec, encoded, batch_size,
                                       progress=progress)
                scores.update({(s.name, split): v for s, v in zip(group, values, strict=True)})
        own = [s for s in sources if s.task == spec.name and s.name != RANDOM]
        if len(own) > 1:  # best dev: this matrix's dev score when it has one, else the prompt's own record
            own.sort(key=lambda s: -(scores.get((s.name, "dev")) if "dev" in splits else (s.dev or -math.inf)))
        for split in splits:
            ref = scores[(own[0].name, split)] if own else math.nan
            for s in sources:
                value = scores[(s.name, split)]
                rel = value / ref if ref and math.isfinite(ref) else math.nan
                rows.append({"backbone": backbone.name, "source_prompt_run": s.name, "source_task": s.task,
                             "source_category": s.category, "target_task": spec.name,
                             "target_category": spec.category, "split": split, "metric": spec.metric,
                             "value": float(value), "relative_value": float(rel), "n_examples": sizes[split]})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


# ---- the bank in MLflow -------------------------------------------------------------------------------
def gather_bank(tracker, backbone: str, tasks, bank_dir: Path, mode: str = "all",
                experiment_ids: list | None = None) -> dict[str, Path]:
    """Download the bank of `backbone` (run id -> local prompt dir; present ones are kept): all runs, or the best per task."""
    runs = tracker.find_runs({"ptx.kind": track.KIND_PROMPT, "ptx.backbone": backbone},
                             order_by=["attributes.start_time ASC"], experiment_ids=experiment_ids)
    runs = [r for r in runs if track.is_vanilla(r) and (tasks is None or r.data.tags.get("ptx.task") in tasks)]
    if mode == "best":
        by_task: dict = {}
        for r in runs:
            by_task.setdefault(r.data.tags["ptx.task"], []).append(r)
        runs = [next((r for r in rs if r.data.tags.get("ptx.best") == "true"), None)
                or max(rs, key=lambda r: r.data.metrics.get("best_dev_metric", -math.inf)) for rs in by_task.values()]
    elif mode != "all":
        raise PtxError(f"transfer.sources: expected 'all' or 'best', found {mode!r}")
    bank = {}
    for r in runs:
        dest = Path(bank_dir) / r.info.run_id
        if not (dest / "prompt.json").exists():
            shutil.rmtree(dest, ignore_errors=True)  # a partial download from an interrupted stage
            tracker.download_prompt(r.info.run_id, dest)
        bank[r.info.run_id] = dest
    return bank


def transfer_matrix_from_store(tracking_uri: str, backbone, tasks=None, splits=("dev", "test"), limits=None,
                               experiment: str | None = None, workdir=None, sources: str = "all", **kwargs):
    """Notebook API: the matrix of every prompt of `backbone` in an MLflow store, as a pandas DataFrame."""
    from ptx.backbones import load_backbone
    from ptx.io import cache_dir

    tracker = track.Tracker(tracking_uri, experiment or track.DEFAULT_EXPERIMENT)
    name = backbone if isinstance(backbone, str) else backbone.name
    ids = [tracker.experiment_id] if experiment else tracker.all_experiment_ids()
    bank_dir = Path(workdir).resolve() / "bank" if workdir else cache_dir() / "bank"
    bank = {rid: load_prompt(p) for rid, p in gather_bank(tracker, name, tasks, bank_dir, sources, ids).items()}
    if not bank:
        raise PtxError(f"the prompt bank for backbone '{name}' in {tracking_uri} is empty (tasks: {tasks or 'all'})")
    if isinstance(backbone, str):
        backbone = load_backbone(name, insertion=next(iter(bank.values())).meta.get("insertion", "prepend"))
    targets = tasks or sorted({a.meta["task"]["name"] for a in bank.values()})
    return transfer_matrix(backbone, bank, targets, splits, limits, **kwargs).to_pandas()


# ---- the transfer stage ---------------------------------------------------------------------------------
_LOADED: dict = {}  # one backbone per worker process: consecutive units of a backbone skip the reload


def _backbone(name: str, insertion: str):
    from ptx.backbones import load_backbone

    key = (name, insertion)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_backbone(name, insertion=insertion, device="cuda" if torch.cuda.is_available() else None)
    return _LOADED[key]


def run_unit(unit: dict) -> pa.Table:
    """Ray task: score the whole bank on one target, then log the unit as its own MLflow run."""
    t0 = time.perf_counter()
    bb = _backbone(unit["backbone"], unit["insertion"])
    target = _spec(unit["target"], unit.get("max_length"))
    table = transfer_matrix(bb, unit["prompts"], [target], unit["splits"], unit["limits"],
                            unit["prompts_per_pass"], unit["batch_size"], unit["random_baseline"], unit["seed"])
    tracker = track.Tracker(unit["tracking_uri"], unit["experiment"], workdir=Path(unit["workdir"]))
    run_id = tracker.start_run(track.run_name("transfer", unit["target"], unit["backbone"]), unit["tags"], unit["parent"])
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(table, Path(d) / "unit.parquet")
        tracker.log_artifacts(run_id, d, KIND_UNIT)
    tracker.log(run_id, {"rows": table.num_rows, "seconds": time.perf_counter() - t0},
                params={"sources": len(unit["prompts"]), "splits": list(unit["splits"]), "limits": unit["limits"]})
    tracker.finish(run_id)
    return table


def _read_table(tracker, run_id: str, artifact: str, file: str) -> pa.Table:
    with tempfile.TemporaryDirectory() as d:
        local = tracker.download(run_id, artifact, Path(d) / "a")
        return pq.read_table(local / file)


def _study_tracker(spec, tracker, workdir: Path):
    """Stages read and write the study's experiment (where its sweeps log), whatever `tracker` points at."""
    return tracker if tracker.experiment == spec.name else track.Tracker(tracker.uri, spec.name, workdir=workdir)


def run_transfer_stage(spec, tracker, workdir: Path, address: str | None = None) -> dict:
    """Compute or resume the study's transfer matrix per backbone: one Ray task per missing (backbone, target) unit."""
    from ptx import sweep

    workdir = Path(workdir).resolve()
    tracker, cfg = _study_tracker(spec, tracker, workdir), spec.transfer
    limits = {"dev": spec.data.dev_limit, "test": spec.data.test_limit}
    targets = [_spec(t, spec.data.max_length) for t in spec.tasks]
    out = {"study": spec.name, "backbones": {}, "computed": 0, "skipped": 0}
    bar = progress.current()  # units: (source prompt, target) pairs; the total grows per backbone
    for name in spec.backbones:
        paths = gather_bank(tracker, name, set(spec.tasks), workdir / "bank", getattr(cfg, "sources", "all"),
                            [tracker.experiment_id])
        bank = {rid: load_prompt(p) for rid, p in paths.items()}
        if not bank:
            raise PtxError(f"the prompt bank for backbone '{name}' of study '{spec.name}' is empty in {tracker.uri}: "
                           "run the train stage first")
        kind = next(iter(bank.values())).meta["backbone"].get("kind")
        if kind:  # fail here, before any worker starts, on a target this backbone cannot score
            check_targets(name, kind, targets)
        base = {"backbone": name, "sources": sorted(bank), "splits": list(cfg.splits), "limits": limits,
                "random_baseline": cfg.random_baseline, "seed": spec.seeds[0], "insertion": spec.insertion}
        if spec.data.max_length is not None:  # only when set: units computed before the field existed keep their hash
            base["max_length"] = spec.data.max_length
        hashes = {t.name: config_hash({**base, "target": t.name}) for t in targets}
        digest = config_hash(sorted(hashes.values()))
        done = {t: tracker.finished_run(KIND_UNIT, h) for t, h in hashes.items()}
        todo = [t for t in spec.tasks if done[t] is None]
        previous = tracker.finished_run(track.KIND_TRANSFER, digest)
        pairs = len(bank) + bool(cfg.random_baseline)  # rows of the matrix per target and split
        bar.update(total=bar.total + pairs * len(targets), done=bar.done + pairs * (len(targets) - len(todo)))
        if not todo and previous is not None:
            out["backbones"][name] = {"run_id": previous.info.run_id, "units": len(targets), "computed": 0,
                                      "sources": len(bank), "reused": True}
            out["skipped"] += len(targets)
            continue
        parent = tracker.start_run(track.run_name("transfer", spec.name, name), {
            "ptx.kind": track.KIND_TRANSFER, "ptx.backbone": name, "ptx.study": spec.name, "ptx.config_hash": digest})
        try:
            units = [{**base, "target": t, "prompts": {rid: (a.prompt, a.meta) for rid, a in bank.items()},
                      "prompts_per_pass": cfg.prompts_per_pass, "batch_size": cfg.batch_size,
                      "tracking_uri": tracker.uri, "experiment": spec.name, "workdir": str(workdir), "parent": parent,
                      "tags": {"ptx.kind": KIND_UNIT, "ptx.backbone": name, "ptx.task": t, "ptx.study": spec.name,
                               "ptx.config_hash": hashes[t]}} for t in todo]
            if units:
                sweep.connect(address)
                fresh = sweep.map_tasks(run_unit, units, dataclasses.asdict(cfg.resources),
                                        names=[f"transfer-{name}-{t}".replace("/", "_") for t in todo],
                                        on_done=lambda i, table, n=pairs: bar.advance(n))
            else:
                fresh = []
            tables = dict(zip(todo, fresh, strict=True))
            tables.update({t: _read_table(tracker, r.info.run_id, KIND_UNIT, "unit.parquet")
                           for t, r in done.items() if r is not None})
            table = pa.concat_tables([tables[t] for t in spec.tasks])
            summary = _log_matrix(tracker, parent, table, workdir / "transfer" / name.replace("/", "_"))
        except BaseException:
            tracker.finish(parent, "FAILED")
            raise
        out["backbones"][name] = {"run_id": parent, "units": len(targets), "computed": len(todo),
                                  "sources": len(bank), "reused": False, **summary}
        out["computed"] += len(todo)
        out["skipped"] += len(targets) - len(todo)
    return out


def _log_matrix(tracker, run_id: str, table: pa.Table, local: Path) -> dict:
    """Write the long table and one heatmap per split, log them to the transfer run and finish it."""
    local.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, local / "transfer.parquet")
    df = table.to_pandas()
    for split in df["split"].unique():
        plot_transfer_heatmap(df, split, local / f"heatmap_{split}.png")
    bank = df[df.source_prompt_run != RANDOM]
    off = bank[bank.source_task != bank.target_task]
    metrics = {"rows": len(df), "sources": df.source_prompt_run.nunique(), "targets": df.target_task.nunique()}
    for split in df["split"].unique():
        metrics[f"{split}_mean_relative_offdiag"] = float(off[off.split == split].relative_value.mean())
    tracker.log(run_id, metrics)
    tracker.log_artifacts(run_id, local, track.KIND_TRANSFER)
    tracker.finish(run_id)
    return {"parquet": str(local / "transfer.parquet"), "rows": len(df)}


def load_transfer_table(tracker, backbone: str, study: str | None = None):
    """The latest finished transfer matrix of `backbone` (optionally of one study) as a pandas DataFrame."""
    runs = tracker.find_runs({"ptx.kind": track.KIND_TRANSFER, "ptx.backbone": backbone, "ptx.study": study},
                             order_by=["attributes.start_time DESC"], experiment_ids=tracker.all_experiment_ids())
    if not runs:
        raise PtxError(f"no finished transfer run for backbone '{backbone}'" + (f" of study '{study}'" if study else "")
                       + f" in {tracker.uri}: run the transfer stage first (ptx transfer matrix SPEC)")
    return _read_table(tracker, runs[0].info.run_id, track.KIND_TRANSFER, "transfer.parquet").to_pandas()


def plot_transfer_heatmap(df, split: str, path: Path) -> Path:
    """Heatmap PNG of one split: rows targets, columns source tasks (mean over their prompts), grouped by category."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = df[df["split"] == split]
    cats = {**dict(zip(d.source_task, d.source_category, strict=True)),
            **dict(zip(d.target_task, d.target_category, strict=True))}

    def order(tasks):
        return sorted(tasks, key=lambda t: (t == RANDOM, cats.get(t, ""), t))

    rows, cols = order(d.target_task.unique()), order(d.source_task.unique())
    fig = Figure(figsize=(4 + 1.1 * len(cols), 1.5 + 0.45 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, column, title in zip(fig.subplots(1, 2), ("value", "relative_value"),
                                 (f"{split}: score", f"{split}: relative to the target's own prompt"), strict=True):
        grid = d.pivot_table(index="target_task", columns="source_task", values=column, aggfunc="mean",
                             dropna=False).reindex(index=rows, columns=cols).to_numpy(dtype=float)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel("source prompt (task)")
        ax.set_ylabel("target task")
        ax.set_title(title, fontsize=9)
        for i in range(1, len(cols)):
            if cats.get(cols[i]) != cats.get(cols[i - 1]):
                ax.axvline(i - 0.5, color="white", lw=2)
        for i in range(1, len(rows)):
            if cats.get(rows[i]) != cats.get(rows[i - 1]):
                ax.axhline(i - 0.5, color="white", lw=2)
        if grid.size <= 400:
            for (r, c), v in np.ndenumerate(grid):
                if math.isfinite(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110)
    return Path(path)


# ---- transfer-initialised prompt tuning (TPT) -----------------------------------------------------------
def _curve(points) -> list[tuple[int, float]]:
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
    v, t = _curve(vanilla_curve), _curve(tpt_curve)
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


def _best_run(tracker, task: str, backbone: str) -> str:
    runs = [r for r in tracker.find_runs({"ptx.kind": track.KIND_PROMPT, "ptx.task": task, "ptx.backbone": backbone})
            if track.is_vanilla(r) and "best_dev_metric" in r.data.metrics]
    if not runs:
        raise PtxError(f"no finished prompt run of task '{task}' on backbone '{backbone}' in {tracker.uri}")
    return max(runs, key=lambda r: r.data.metrics["best_dev_metric"]).info.run_id


def _indicator_sources(tracker, backbone: str, study: str, indicator: str) -> dict:
    """target -> (run, task) from the indicators run's recommendations.parquet (indicator, target_task, source_task,
    optional source_prompt_run, rank or score)."""
    runs = tracker.find_runs({"ptx.kind": track.KIND_INDICATORS, "ptx.backbone": backbone, "ptx.study": study},
                             order_by=["attributes.start_time DESC"], experiment_ids=tracker.all_experiment_ids())
    if not runs:
        raise PtxError(f"tpt.source 'indicator:{indicator}': no finished indicators run for backbone '{backbone}' of "
                       f"study '{study}' in {tracker.uri}; the indicators stage must run first")
    try:
        recs = _read_table(tracker, runs[0].info.run_id, track.KIND_INDICATORS, "recommendations.parquet").to_pandas()
    except (PtxError, OSError) as exc:
        raise PtxError(f"indicators run {runs[0].info.run_id} has no readable indicators/recommendations.parquet "
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


def choose_sources(spec, tracker, backbone: str) -> dict:
    """target task -> (source prompt run, source task), or a reason string when the target has no source."""
    mode = spec.tpt.source
    if mode.startswith("indicator:"):
        picks = _indicator_sources(tracker, backbone, spec.name, mode.split(":", 1)[1])
        return {t: picks.get(t, f"the indicator recommends no source for '{t}'") for t in spec.tasks}
    named = None
    if mode not in ("best_same_category", "best_any"):
        from ptx.tasks import list_tasks

        names = [t.name for t in list_tasks()]
        if mode not in names:
            raise PtxError(f"tpt.source: expected best_same_category, best_any, indicator:<name> or a task name, "
                           f"found '{mode}'{suggest(mode, [*names, 'best_same_category', 'best_any'])}")
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
    out = {}
    for target in spec.tasks:
        if named == target:
            out[target] = f"the source task is the target itself ('{target}')"
            continue
        if table is None:
            out[target] = (_best_run(tracker, named, backbone), named)
            continue
        d = table[(table.target_task == target) & (table.split == "dev") & (table.source_prompt_run != RANDOM)
                  & (table.source_task != target)]
        d = d[d.source_category == d.target_category] if mode == "best_same_category" else d
        d = d[d.source_task == named] if named else d
        if d.empty:
            out[target] = f"no {'same-category ' if mode == 'best_same_category' else ''}source prompt for '{target}'"
        else:
            row = d.sort_values(["value", "source_prompt_run"], ascending=[False, True]).iloc[0]
            out[target] = (row.source_prompt_run, row.source_task)
    return out


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
    tracker = _study_tracker(spec, tracker, workdir)
    settings = spec.train if spec.tpt.steps is None else dataclasses.replace(spec.train, steps=spec.tpt.steps)
    plan, skipped = [], []
    for name in spec.backbones:
        for target, pick in choose_sources(spec, tracker, name).items():
            if isinstance(pick, str):
                log.warning("TPT: skipping %s on %s: %s", target, name, pick)
                skipped.append({"backbone": name, "target_task": target, "reason": pick})
                continue
            dest = workdir / "downloads" / pick[0]  # fetched once here, not by concurrent trials racing for it
            if not (dest / "prompt.json").exists():
                shutil.rmtree(dest, ignore_errors=True)
                tracker.download_prompt(pick[0], dest)
            n_tok = load_prompt(dest).prompt.shape[0]
            if n_tok != spec.prompt_length:
                raise PtxError(f"TPT source {pick[0]} ({pick[1]}) has {n_tok} prompt tokens; study '{spec.name}' "
                               f"trains prompts of prompt_length {spec.prompt_length}")
            for seed in spec.tpt.seeds or spec.seeds:  # vanilla = the training stage's request: reused by its hash
                vanilla = sweep.study_request(spec, target, name, seed, settings)
                plan.append((name, target, pick, seed, vanilla, tpt_request(vanilla, pick[0])))
    out = {"study": spec.name, "skipped": skipped, "backbones": {}}
    if not plan:
        return out
    sweep.connect(address)
    # no search space and no early stopping: every trial runs its full curve, so the curves compare
    plain = dataclasses.replace(spec, search=Search(), scheduler=Scheduler())
    res = sweep.run_sweep(plain, workdir, tracker.uri, requests=[r for p in plan for r in p[4:]],
                          name=f"{spec.name}-tpt", tags={"ptx.stage": "tpt"})
    out["sweep"] = {k: res[k] for k in ("trials", "errored", "parent_run_id")}
    for name in spec.backbones:
        rows, curves = [], {}
        for bb, target, (src_run, src_task), seed, vreq, treq in plan:
            if bb != name:
                continue
            metric = _spec(target).metric
            row = {"backbone": name, "target_task": target, "source_task": src_task, "source_prompt_run": src_run,
                   "seed": seed, "metric": metric}
            v, t = tracker.finished_run(track.KIND_PROMPT, vreq.hash()), tracker.finished_run(track.KIND_PROMPT, treq.hash())
            if v is None or t is None:
                rows.append({**row, "flag": "run_missing", "flag_90": "run_missing", "speedup": math.nan})
                continue
            vc, tc = (_curve(tracker.client.get_metric_history(r.info.run_id, f"dev_{metric}")) for r in (v, t))
            rows.append({**row, **convergence_speedup(vc, tc), "vanilla_run": v.info.run_id, "tpt_run": t.info.run_id})
            curves.setdefault(target, []).append((seed, vc, tc))
        if rows:
            out["backbones"][name] = _log_tpt(tracker, spec, name, rows, curves,
                                              workdir / "tpt" / name.replace("/", "_"))
    return out


def _log_tpt(tracker, spec, backbone: str, rows: list, curves: dict, local: Path) -> dict:
    """Per-seed and seed-averaged speed-up tables plus a curve plot per target, logged as a ptx.kind=tpt run."""
    import pandas as pd

    local.mkdir(parents=True, exist_ok=True)
    seeds = pd.DataFrame(rows)
    keys = ["backbone", "target_task", "source_task", "source_prompt_run", "metric"]
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
    for target, cs in curves.items():
        plot_convergence(cs, target, _spec(target).metric, local / f"curves_{target}.png")
    run_id = tracker.start_run(track.run_name("tpt", spec.name, backbone), {
        "ptx.kind": KIND_TPT, "ptx.backbone": backbone, "ptx.study": spec.name,
        "ptx.config_hash": config_hash(sorted(f"{r.get('vanilla_run')}:{r.get('tpt_run')}" for r in rows))})
    finite = {k: v for k, v in overall.items() if math.isfinite(v)}  # MLflow takes no inf; the tables keep it
    tracker.log(run_id, {**finite, "targets": len(agg)}, params={"source": spec.tpt.source})
    tracker.log_artifacts(run_id, local, KIND_TPT)
    tracker.finish(run_id)
    return {"run_id": run_id, "parquet": str(local / "tpt.parquet"), "table": agg.to_dict("records"),
            "overall": overall}


def plot_convergence(curves: list, target: str, metric: str, path: Path) -> Path:
    """PNG of dev curves [(seed, vanilla [(step, score)], tpt [(step, score)])] with vanilla's best dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (_seed, vc, tc) in enumerate(curves):
        ax.plot(*zip(*vc, strict=True), color="tab:blue", marker=".", label="vanilla PT" if i == 0 else None)
        ax.plot(*zip(*tc, strict=True), color="tab:orange", marker=".", label="TPT" if i == 0 else None)
        ax.axhline(max(v for _, v in vc), color="tab:blue", ls="--", lw=0.8)
    ax.set(xlabel="step", ylabel=f"dev {metric}", title=f"{target}: vanilla PT vs TPT ({len(curves)} seed(s))")
    ax.legend()
    fig.savefig(path, dpi=110)
    return Path(path)
