"""The projector stage of a study: train projectors (one Ray task per objective), evaluate, and TPT_MODEL.

Reads the prompt bank from MLflow (the best vanilla prompt per task on each backbone), trains a projector per
objective as a `ptx.kind=projector` run (artifact dir `projector/`), projects every source prompt of the bank,
scores it zero-shot on the target backbone beside a random prompt and the target's own prompt, and starts
target-backbone prompt tuning from the projected prompt beside vanilla tuning with the same seed.
"""

import logging
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ptx import track
from ptx.config import config_hash
from ptx.errors import PtxError
from ptx.projector import (
    ARTIFACT,
    Objective,
    ProjectorConfig,
    ProjectorSettings,
    curve_mean,
    project_prompt_artifact,
    save_projector,
    train_projector,
)

log = logging.getLogger(__name__)
STAGE_KIND = "stage"  # the stage's parent run: ptx.kind=stage, ptx.stage=projector


def backbone_info(name: str, insertion: str = "prepend") -> dict:
    """{name, revision, kind, d_model, insertion} of a backbone from its config alone (no weights loaded)."""
    import transformers

    from ptx.assets import resolve_model
    from ptx.backbones import detect_kind

    src = resolve_model(name)
    try:
        cfg = transformers.AutoConfig.from_pretrained(src.path)
    except OSError as exc:
        raise PtxError(f"backbone '{name}': cannot read its config ({str(exc).splitlines()[0]})") from None
    d_model = getattr(cfg, "d_model", None) or cfg.hidden_size
    return {"name": name, "revision": src.revision, "kind": detect_kind(cfg).value, "d_model": int(d_model),
            "insertion": insertion}


def unavailable_reason(p) -> str | None:
    """Why the projector stage cannot run with `spec.projector` (None when it can)."""
    for side in ("source_backbone", "target_backbone"):
        name = getattr(p, side)
        if not name:
            return f"projector.{side} is not set"
        try:
            backbone_info(name)
        except PtxError as exc:
            return f"projector.{side} '{name}' is not available: {exc}"
    return None


def bank(tracker, workdir: Path, backbone: str, tasks) -> dict:
    """{task: (run_id, local prompt dir)}: the best vanilla prompt per task (transfer-initialised runs excluded)."""
    out = {}
    for task in dict.fromkeys(tasks):
        runs = [r for r in tracker.prompt_runs(task, backbone) if "best_dev_metric" in r.data.metrics
                and not r.data.tags.get("ptx.source_run") and r.data.tags.get("ptx.init") not in ("artifact", "projected")]
        if not runs:
            continue
        run_id = max(runs, key=lambda r: r.data.metrics["best_dev_metric"]).info.run_id
        local = workdir / "downloads" / run_id
        if not (local / "prompt.json").is_file():
            tracker.download_prompt(run_id, local)
        out[task] = (run_id, local)
    return out


def _train_job(job: dict) -> dict:
    """One Ray task: train (or reuse) one objective's projector, log it as a ptx.kind=projector run."""
    from ptx.backbones import load_backbone
    from ptx.data import encode_split
    from ptx.prompt import load_prompt
    from ptx.tasks import load_task

    workdir = Path(job["workdir"])
    tracker = track.Tracker(job["tracking_uri"], job["experiment"], workdir=workdir)
    done = tracker.finished_run(track.KIND_PROJECTOR, job["digest"])
    if done is not None:
        run_id = done.info.run_id
        local = workdir / "projectors" / run_id
        if not (local / "projector.json").is_file():
            tracker.download(run_id, ARTIFACT, local)
        return {"objective": job["objective"], "run_id": run_id, "artifact": str(local), "reused": True,
                "initial_loss": done.data.metrics.get("initial_loss"), "final_loss": done.data.metrics.get("final_loss")}
    source, target, objective = job["source"], job["target"], job["objective"]
    tags = {"ptx.kind": track.KIND_PROJECTOR, "ptx.source_backbone": source["name"], "ptx.target_backbone": target["name"],
            "ptx.objective": objective, "ptx.study": job["study"], "ptx.config_hash": job["digest"],
            "ptx.form": job["config"]["form"]}
    run_id = tracker.start_run(f"projector {objective} {source['name']}->{target['name']}", tags, job["parent"])
    try:
        tracker.log(run_id, params={k: job[k] for k in ("config", "settings", "train_tasks", "source_runs", "target_runs")})
        sources = {t: load_prompt(p).prompt for t, p in job["sources"].items()}
        targets = {t: load_prompt(p).prompt for t, p in job["targets"].items()}
        backbone, task_data = None, None
        if objective != Objective.DISTANCE.value:
            backbone = load_backbone(target["name"], insertion=target["insertion"])
            specs = {t: load_task(t, max_length=job.get("max_length")) for t in sources}
            task_data = {t: (s, encode_split(s, backbone, "train", limit=job["train_limit"])) for t, s in specs.items()}
        config = ProjectorConfig(**job["config"])
        result = train_projector(config, ProjectorSettings(**job["settings"]), sources, targets, backbone, task_data,
                                 report=lambda metrics, step: tracker.log(run_id, metrics, step))
        metrics = {"initial_loss": curve_mean(result.curve, "loss", last=False),
                   "final_loss": curve_mean(result.curve, "loss", last=True), "seconds": result.seconds,
                   "parameters": sum(p.numel() for p in result.projector.parameters())}
        tracker.log_curve(run_id, [{k: v for k, v in p.items() if k != "task"} for p in result.curve])
        local = save_projector(workdir / "projectors" / run_id, result.projector, source, target, objective,
                               result.tasks, metrics, run_id, extra={"curve": result.curve})
        tracker.log(run_id, metrics, step=len(result.curve))
        tracker.log_artifacts(run_id, local, ARTIFACT)
        tracker.finish(run_id)
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    return {"objective": objective, "run_id": run_id, "artifact": str(local), "reused": False, **metrics}


def train_projectors(spec, tracker, workdir, stage_run: str, objectives, src_bank: dict, tgt_bank: dict,
                     source: dict, target: dict) -> dict:
    """Train one projector per objective as parallel Ray tasks; {objective: summary}."""
    from ptx import sweep
    from ptx.prompt import load_prompt

    p = spec.projector
    train_tasks = [t for t in (p.train_tasks or spec.tasks) if t in src_bank]
    if not train_tasks:
        raise PtxError(f"projector stage: no source prompt on '{source['name']}' for any training task "
                       f"{list(p.train_tasks or spec.tasks)}; run the train stage on that backbone first")
    lengths = {t: int(load_prompt(src_bank[t][1]).prompt.shape[0]) for t in train_tasks}
    if p.form == "flat" and len(set(lengths.values())) > 1:
        raise PtxError(f"projector form 'flat' needs one prompt length; source prompts have {lengths}")
    shared = [t for t in train_tasks if t in tgt_bank]
    jobs = []
    for objective in objectives:
        if objective != Objective.TASK.value and not shared:
            raise PtxError(f"projector objective '{objective}': no task has prompts on both backbones "
                           f"(source '{source['name']}': {sorted(src_bank)}, target '{target['name']}': {sorted(tgt_bank)})")
        config = ProjectorConfig(form=p.form, d_source=source["d_model"], d_target=target["d_model"],
                                 n_tokens=next(iter(lengths.values())) if p.form == "flat" else None, hidden=p.hidden)
        settings = ProjectorSettings(objective=objective, steps=p.steps, lr=p.lr, mix_weight=p.mix_weight,
                                     batch_size=spec.train.batch_size, seed=spec.seeds[0],
                                     report_every=max(1, min(spec.train.eval_every, p.steps)))
        job = {"objective": objective, "config": asdict(config), "settings": asdict(settings), "source": source,
               "target": target, "train_tasks": train_tasks, "train_limit": spec.data.train_limit,
               "source_runs": {t: src_bank[t][0] for t in train_tasks},
               "target_runs": {t: tgt_bank[t][0] for t in shared if objective != Objective.TASK.value}}
        if spec.data.max_length is not None:  # only when set: earlier projectors keep their digest
            job["max_length"] = spec.data.max_length
        job["digest"] = config_hash(job)
        job.update(sources={t: str(src_bank[t][1]) for t in train_tasks},
                   targets={t: str(tgt_bank[t][1]) for t in job["target_runs"]},
                   tracking_uri=tracker.uri, experiment=tracker.experiment, workdir=str(workdir), parent=stage_run,
                   study=spec.name)
        jobs.append(job)
    sweep.connect()
    res = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu, "custom": dict(spec.resources.custom)}
    out = sweep.map_tasks(_train_job, jobs, resources=res, names=[f"projector-{j['objective']}" for j in jobs])
    return {o["objective"]: o for o in out}


def evaluate_projectors(spec, stage_dir: Path, projectors: dict, src_bank: dict,
                        tgt_bank: dict, target_bb) -> tuple[list, dict]:
    """Zero-shot scores on the target: every projected bank prompt, a random prompt, the target's own prompt."""
    from ptx.data import encode_split
    from ptx.evaluate import score_prompts
    from ptx.prompt import init_prompt, load_prompt
    from ptx.tasks import load_task

    p = spec.projector
    projected = {}  # (objective, source task) -> (dir, tensor)
    for objective, info in projectors.items():
        for task, (_, src_dir) in src_bank.items():
            out = stage_dir / "projected" / objective / task
            project_prompt_artifact(info["artifact"], src_dir, out)
            projected[objective, task] = (out, load_prompt(out, backbone=target_bb).prompt)
    rows = []
    for task in p.eval_tasks or spec.tasks:
        tspec = load_task(task, max_length=spec.data.max_length)
        data = encode_split(tspec, target_bb, "test", limit=spec.data.test_limit)
        own = tgt_bank.get(task)
        own_value = (score_prompts(target_bb, load_prompt(own[1], backbone=target_bb).prompt, tspec, data)[0]
                     if own else math.nan)
        lengths = sorted({int(t.shape[0]) for _, t in projected.values()})
        entries = [("projected", o, s, t) for (o, s), (_, t) in projected.items()]
        entries += [("random", None, None, init_prompt(target_bb, n, "random", seed=spec.seeds[0])) for n in lengths]
        for n in lengths:  # one forward pass per prompt length: prompts stack only when their shapes agree
            group = [e for e in entries if e[3].shape[0] == n]
            scores = score_prompts(target_bb, torch.stack([e[3] for e in group]), tspec, data)
            for (kind, objective, source_task, _), value in zip(group, scores, strict=True):
                rows.append(_row(p, kind, objective, source_task, task, tspec.metric, value, own_value, n,
                                 projectors.get(objective, {}).get("run_id"), src_bank.get(source_task, (None,))[0]))
        if own:
            rows.append(_row(p, "own", None, task, task, tspec.metric, own_value, own_value, None, None, own[0]))
    return rows, {k: d for k, (d, _) in projected.items()}


def _row(p, kind, objective, source_task, target_task, metric, value, own_value, n, projector_run, source_run) -> dict:
    rel = value / own_value if own_value and not math.isnan(own_value) else math.nan
    return {"prompt": kind, "objective": objective, "source_backbone": p.source_backbone,
            "target_backbone": p.target_backbone, "source_task": source_task, "target_task": target_task,
            "same_task": source_task == target_task, "split": "test", "metric": metric, "value": float(value),
            "own_value": float(own_value), "relative_value": float(rel), "n_tokens": n,
            "projector_run": projector_run, "source_prompt_run": source_run}


def summarise(rows: list) -> dict:
    """Mean same-task zero-shot score per objective, of the random prompt and of the own prompt (+ relatives)."""
    out = {}
    for key in sorted({r["objective"] or r["prompt"] for r in rows}):
        pick = [r for r in rows if (r["objective"] or r["prompt"]) == key and (r["same_task"] or r["prompt"] == "random")]
        if pick:
            out[f"{key}.mean"] = sum(r["value"] for r in pick) / len(pick)
            rel = [r["relative_value"] for r in pick if not math.isnan(r["relative_value"])]
            if rel:
                out[f"{key}.relative"] = sum(rel) / len(rel)
    return out


def _curve(tracker, run, metric: str) -> list:
    if run.curve:
        return [{"step": c["step"], "dev_metric": c["dev_metric"]} for c in run.curve]
    hist = tracker.client.get_metric_history(run.run_id, f"dev_{metric}")  # a reused run: read its curve back
    return sorted(({"step": m.step, "dev_metric": m.value} for m in hist), key=lambda c: c["step"])


def tpt_model(spec, tracker, workdir: Path, stage_run: str, objective: str, projected_dirs: dict, target_bb,
              tasks=None) -> list:
    """Prompt tuning on the target from the projected prompt vs from `spec.init`, same seed; the speed-up per task."""
    from ptx import sweep
    from ptx.prompt import load_prompt
    from ptx.stages import run_prompt
    from ptx.tasks import load_task
    from ptx.transfer import convergence_speedup  # the TPT stage's figure, so both stages report the same one

    p, rows = spec.projector, []
    for task in tasks or p.eval_tasks or spec.tasks:
        if (objective, task) not in projected_dirs:
            continue
        init_dir = projected_dirs[objective, task]
        n = int(load_prompt(init_dir).prompt.shape[0])
        base = sweep.study_request(spec, task, p.target_backbone, spec.seeds[0], prompt_length=n)
        vanilla = run_prompt(base, workdir, tracker, parent_run_id=stage_run, backbone=target_bb)
        tpt = run_prompt(replace(base, init="artifact", init_from=str(init_dir)), workdir, tracker,
                         parent_run_id=stage_run, backbone=target_bb,
                         extra_tags={"ptx.tpt": "projector", "ptx.projector_objective": objective})
        metric = load_task(task).metric
        v_curve, t_curve = _curve(tracker, vanilla, metric), _curve(tracker, tpt, metric)
        rows.append({"task": task, "objective": objective, "vanilla_run": vanilla.run_id, "tpt_run": tpt.run_id,
                     "vanilla_init": v_curve[0]["dev_metric"], "tpt_init": t_curve[0]["dev_metric"],
                     **convergence_speedup(v_curve, t_curve)})
    return rows


def run_projector_stage(spec, tracker, workdir, objectives=None, evaluate: bool = True, tpt: bool = True,
                        tpt_tasks=None) -> dict:
    """The projector stage: skip (reason as a run tag) when a backbone is unset or missing; else train, eval, TPT.

    `objectives` defaults to (spec.projector.objective,); `tpt_tasks` (default: the eval tasks) bounds TPT_MODEL,
    the stage's most expensive part.
    """
    import pandas as pd

    from ptx.backbones import load_backbone

    p, workdir = spec.projector, Path(workdir).resolve()
    objectives = tuple(dict.fromkeys(objectives or (p.objective,)))
    for o in objectives:
        if o not in [x.value for x in Objective]:
            raise PtxError(f"projector objective '{o}': expected one of {[x.value for x in Objective]}")
    tags = {"ptx.kind": STAGE_KIND, "ptx.stage": "projector", "ptx.study": spec.name,
            "ptx.source_backbone": p.source_backbone, "ptx.target_backbone": p.target_backbone}
    stage_run = tracker.start_run(f"projector {spec.name}", tags)
    reason = unavailable_reason(p)
    if reason:
        log.warning("projector stage skipped: %s", reason)
        tracker.log(stage_run, tags={"ptx.skipped": "true", "ptx.skip_reason": reason})
        tracker.finish(stage_run)
        return {"skipped": True, "reason": reason, "stage_run": stage_run}
    try:
        source, target = backbone_info(p.source_backbone), backbone_info(p.target_backbone, spec.insertion)
        tasks = tuple(p.train_tasks or spec.tasks) + tuple(p.eval_tasks or spec.tasks)
        src_bank, tgt_bank = bank(tracker, workdir, p.source_backbone, tasks), bank(tracker, workdir, p.target_backbone, tasks)
        tracker.log(stage_run, params={"projector": asdict(p), "objectives": list(objectives)})
        projectors = train_projectors(spec, tracker, workdir, stage_run, objectives, src_bank, tgt_bank, source, target)
        out = {"skipped": False, "stage_run": stage_run, "projectors": projectors}
        for o, info in projectors.items():
            tracker.log(stage_run, {f"{o}.initial_loss": info.get("initial_loss"), f"{o}.final_loss": info.get("final_loss")})
        if evaluate:
            stage_dir = workdir / "projector_stage" / stage_run
            target_bb = load_backbone(p.target_backbone, insertion=spec.insertion)
            rows, projected_dirs = evaluate_projectors(spec, stage_dir, projectors, src_bank,
                                                       tgt_bank, target_bb)
            summary = summarise(rows)
            best = max(objectives, key=lambda o: summary.get(f"{o}.mean", -math.inf))
            tables = stage_dir / "tables"
            tables.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_parquet(tables / "projector_zero_shot.parquet", index=False)
            out.update(summary=summary, best_objective=best, table=str(tables / "projector_zero_shot.parquet"))
            if tpt:
                tpt_rows = tpt_model(spec, tracker, workdir, stage_run, best, projected_dirs, target_bb, tpt_tasks)
                pd.DataFrame(tpt_rows).to_parquet(tables / "projector_tpt.parquet", index=False)
                for r in tpt_rows:  # NaN speed-ups (not reached, or at init) are explained by the flag tag
                    for key in ("speedup", "speedup_90", "tpt_best", "vanilla_best"):
                        if math.isfinite(r[key]):
                            summary[f"tpt.{r['task']}.{key}"] = r[key]
                out["tpt"] = tpt_rows
            flags = {f"ptx.tpt.{r['task']}.flag": r["flag"] for r in out.get("tpt", [])}
            tracker.log(stage_run, summary, tags={"ptx.best_objective": best, **flags})
            tracker.log_artifacts(stage_run, tables, "tables")
        tracker.finish(stage_run)
        return out
    except BaseException:
        tracker.finish(stage_run, "FAILED")
        raise
