"""The projector stage of a study: train projectors (one Ray task each), evaluate, and TPT_MODEL.

Reads the prompt bank from MLflow (the best vanilla prompt per task on each backbone), trains a projector per
objective and protocol unit (leave-one-task-out by default: per evaluated task, one trained without it) as a
`ptx.kind=projector` run (artifact dir `projector/`, param `train_tasks`), projects every source prompt of the
bank, scores it zero-shot on the target backbone beside a random prompt and the target's own prompt (dev to pick
the objective, test for the table; `held_out` marks rows whose source task the projector never saw), and starts
target-backbone prompt tuning from the held-out projected prompt beside vanilla tuning with the same seed.
"""

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

from ptx import progress, track
from ptx.backbones import describe
from ptx.bank import bank_runs, best_of, fetch_prompt
from ptx.errors import PtxError
from ptx.io import config_hash
from ptx.projector import (
    ARTIFACT,
    NOT_TESTABLE,
    Objective,
    ProjectorConfig,
    ProjectorSettings,
    curve_mean,
    project_prompt_artifact,
    save_projector,
    train_projector,
)
from ptx.stages.tpt import tpt_request
from ptx.transfer import censored_speedups

log = logging.getLogger(__name__)
NAME, KIND, UNITS, SECTION = "projector", "stage", "steps", "projector"  # KIND: the stage's parent run


def unavailable_reason(p) -> str | None:
    """Why the projector stage cannot run with `spec.projector` (None when it can)."""
    if getattr(p, "not_testable", None):  # the study says it cannot test the question: no run, no verdict
        return f"{NOT_TESTABLE}: {p.not_testable}"
    for side in ("source_backbone", "target_backbone"):
        name = getattr(p, side)
        if not name:
            return f"projector.{side} is not set"
        try:
            describe(name)
        except PtxError as exc:
            return f"projector.{side} '{name}' is not available: {exc}"
    return None


def projector_units(p, study_tasks, categories: dict) -> list[dict]:
    """[{key, train, eval}]: one projector per unit, trained on `train` and scored on `eval` (the spec's protocol).

    leave_one_out(_category): a unit per evaluated task T, trained on the training pool minus T (and, for the
    category variant, minus every task outside T's category); split: one unit, the spec's two lists.
    """
    pool = list(dict.fromkeys(p.train_tasks or study_tasks))
    evaluated = list(dict.fromkeys(p.eval_tasks or study_tasks))
    if p.protocol == "split":
        return [{"key": "split", "train": pool, "eval": evaluated}]
    units = []
    for task in evaluated:
        train = [t for t in pool if t != task
                 and (p.protocol != "leave_one_out_category" or categories.get(t) == categories.get(task))]
        if not train:
            raise PtxError(f"projector protocol '{p.protocol}': no training task is left for held-out task '{task}' "
                           f"(training pool {pool}, category '{categories.get(task)}')")
        units.append({"key": task, "train": train, "eval": [task]})
    return units


def unit_name(objective: str, unit: dict) -> str:
    """A projector's display name: its objective, and for leave-one-out the task it was trained without."""
    return objective if unit["key"] == "split" else f"{objective} (without {unit['key']})"


def study_best_run(tracker, backbone: str, task: str, study: str):
    """The best vanilla prompt run of `task` on `backbone` among the study's own runs (its MLflow experiment: one
    per study), or None: another study's prompts in the same store never enter. (A trial's ptx.study tag names
    its Tune experiment, e.g. '<study>-train-<hash>', so the experiment, not that tag, says whose run it is.)"""
    exp = tracker.experiment_id_of(study)
    return None if exp is None else best_of(bank_runs(tracker, backbone, task=task, experiment_ids=[exp]))


def bank(tracker, workdir: Path, backbone: str, tasks, study: str) -> dict:
    """{task: (run_id, local prompt dir)}: the study's best vanilla prompt per task (transfer-initialised runs
    excluded)."""
    out = {}
    for task in dict.fromkeys(tasks):
        best = study_best_run(tracker, backbone, task, study)
        if best is not None:
            out[task] = (best.run_id, fetch_prompt(tracker, best.run_id, workdir))
    return out


def _train_job(job: dict) -> dict:
    """One Ray task: train (or reuse) one objective's projector, log it as a ptx.kind=projector run."""
    from ptx import sweep
    from ptx.backbones import load_backbone
    from ptx.data import encode_split
    from ptx.prompt import load_prompt
    from ptx.tasks import load_task

    workdir = Path(job["workdir"])
    tracker = job["tracker"].open()
    source, target, objective = job["source"], job["target"], job["objective"]
    tags = {"ptx.kind": track.KIND_PROJECTOR, "ptx.source_backbone": source["name"], "ptx.target_backbone": target["name"],
            "ptx.objective": objective, "ptx.study": job["study"], "ptx.config_hash": job["digest"],
            "ptx.form": job["config"]["form"], "ptx.projector_unit": job["unit"]}
    name = track.run_name("projector", objective, f"{source['name']} → {target['name']}", job["unit"])
    with tracker.run(name, tags, job["parent"], reuse=not job.get("force")) as run:
        if run.reused:
            sweep.report_units(job["settings"]["steps"])  # progress: this projector's steps are done
            local = workdir / "projectors" / run.run_id
            if not (local / "projector.json").is_file():
                tracker.download(run.run_id, ARTIFACT, local)
            return {"objective": objective, "run_id": run.run_id, "artifact": str(local), "reused": True,
                    "initial_loss": run.reused.metrics.get("initial_loss"),
                    "final_loss": run.reused.metrics.get("final_loss")}
        run_id = run.run_id
        tracker.log(run_id, params={**{k: job[k] for k in ("config", "settings", "source_runs", "target_runs")},
                                    "train_tasks": json.dumps(job["train_tasks"])})
        sources = {t: load_prompt(p).prompt for t, p in job["sources"].items()}
        targets = {t: load_prompt(p).prompt for t, p in job["targets"].items()}
        backbone, task_data = None, None
        if objective != Objective.DISTANCE.value:
            backbone = load_backbone(target["name"], insertion=target["insertion"])
            specs = {t: load_task(t, max_length=job.get("max_length")) for t in sources}
            task_data = {t: (s, encode_split(s, backbone, "train", limit=job["train_limit"])) for t, s in specs.items()}
        config = ProjectorConfig(**job["config"])
        reported = [0]

        def report(metrics: dict, step: int) -> None:
            tracker.log(run_id, metrics, step)
            sweep.report_units(step - reported[0])  # steps done, shown on the driver's progress line
            reported[0] = step

        result = train_projector(config, ProjectorSettings(**job["settings"]), sources, targets, backbone, task_data,
                                 report=report)
        metrics = {"initial_loss": curve_mean(result.curve, "loss", last=False),
                   "final_loss": curve_mean(result.curve, "loss", last=True), "seconds": result.seconds,
                   "parameters": sum(p.numel() for p in result.projector.parameters())}
        tracker.log_curve(run_id, [{k: v for k, v in p.items() if k != "task"} for p in result.curve])
        local = save_projector(workdir / "projectors" / run_id, result.projector, source, target, objective,
                               result.tasks, metrics, run_id, extra={"curve": result.curve})
        tracker.log(run_id, metrics, step=len(result.curve))
        tracker.log_artifacts(run_id, local, ARTIFACT)
    return {"objective": objective, "run_id": run_id, "artifact": str(local), "reused": False, **metrics}


def train_projectors(spec, tracker, workdir, stage_run: str, objectives, src_bank: dict, tgt_bank: dict,
                     source: dict, target: dict, units: list | None = None, force: bool = False) -> dict:
    """Train one projector per (objective, unit) as parallel Ray tasks; {name: summary} (see `unit_name`)."""
    from ptx import sweep
    from ptx.prompt import load_prompt

    p = spec.projector
    units = units if units is not None else projector_units(p, spec.tasks, task_categories(spec))
    jobs, names = [], []
    for unit in units:
        train_tasks = [t for t in unit["train"] if t in src_bank]
        if not train_tasks:
            raise PtxError(f"projector stage: no source prompt on '{source['name']}' for any training task "
                           f"{unit['train']}; run the train stage on that backbone first")
        lengths = {t: int(load_prompt(src_bank[t][1]).prompt.shape[0]) for t in train_tasks}
        if p.form == "flat" and len(set(lengths.values())) > 1:
            raise PtxError(f"projector form 'flat' needs one prompt length; source prompts have {lengths}")
        shared = [t for t in train_tasks if t in tgt_bank]
        for objective in objectives:
            if objective != Objective.TASK.value and not shared:
                raise PtxError(f"projector objective '{objective}': no task has prompts on both backbones "
                               f"(source '{source['name']}': {sorted(src_bank)}, target '{target['name']}': "
                               f"{sorted(tgt_bank)})")
            config = ProjectorConfig(form=p.form, d_source=source["d_model"], d_target=target["d_model"],
                                     n_tokens=next(iter(lengths.values())) if p.form == "flat" else None,
                                     hidden=p.hidden)
            settings = ProjectorSettings(objective=objective, steps=p.steps, lr=p.lr, mix_weight=p.mix_weight,
                                         batch_size=spec.train.batch_size, seed=spec.seeds[0],
                                         report_every=max(1, min(spec.train.eval_every, p.steps)))
            job = {"objective": objective, "config": asdict(config), "settings": asdict(settings), "source": source,
                   "target": target, "train_tasks": train_tasks, "train_limit": spec.data.train_limit,
                   "source_runs": {t: src_bank[t][0] for t in train_tasks},
                   "target_runs": {t: tgt_bank[t][0] for t in shared if objective != Objective.TASK.value}}
            if spec.data.max_length is not None:  # only when set: earlier projectors keep their digest
                job["max_length"] = spec.data.max_length
            job["digest"] = config_hash(job)  # the training tasks are in it: another split is another projector
            job.update(sources={t: str(src_bank[t][1]) for t in train_tasks},
                       targets={t: str(tgt_bank[t][1]) for t in job["target_runs"]},
                       tracker=track.TrackerRef(tracker.uri, tracker.experiment, str(workdir)), workdir=str(workdir),
                       force=force,
                       parent=stage_run, study=spec.name, unit=unit["key"])
            jobs.append(job)
            names.append(unit_name(objective, unit))
    unique = list({j["digest"]: j for j in jobs}.values())  # two units with one training set: trained once
    sweep.connect()
    res = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu, "custom": dict(spec.resources.custom)}
    bar = progress.current()  # the projector stage's steps; run_projector_stage set its total up front
    done = sweep.map_tasks(_train_job, unique, resources=res,
                           names=[f"projector-{j['objective']}-{j['unit']}" for j in unique], on_units=bar.advance)
    by_digest = {j["digest"]: o for j, o in zip(unique, done, strict=True)}
    units_by_key = {u["key"]: u for u in units}
    return {name: {**by_digest[j["digest"]], "unit": j["unit"], "train_tasks": list(j["train_tasks"]),
                   "eval_tasks": list(units_by_key[j["unit"]]["eval"])}
            for name, j in zip(names, jobs, strict=True)}


def task_categories(spec) -> dict:
    """{task: category} for every task a projector may train or be scored on."""
    from ptx.tasks import load_task

    p = spec.projector
    tasks = dict.fromkeys((*spec.tasks, *(p.train_tasks or ()), *(p.eval_tasks or ())))
    return {t: load_task(t).category for t in tasks}


def evaluate_projectors(spec, stage_dir: Path, projectors: dict, src_bank: dict,
                        tgt_bank: dict, target_bb, splits=("dev", "test")) -> tuple[list, dict]:
    """Zero-shot scores on the target, per split: each evaluated task scored with every bank prompt projected by
    the projectors that evaluate it (`held_out`: the source task is not among that projector's training tasks),
    a random prompt and the target's own prompt. Returns (rows, {(objective, task): held-out projected dir})."""
    from ptx.data import encode_split
    from ptx.evaluate import score_prompts
    from ptx.prompt import init_prompt, load_prompt
    from ptx.tasks import load_task

    projected = {}  # (projector name, source task) -> (dir, tensor)
    for name, info in projectors.items():
        for task, (_, src_dir) in src_bank.items():
            out = stage_dir / "projected" / f"{info['objective']}-{info['unit']}" / task
            project_prompt_artifact(info["artifact"], src_dir, out)
            projected[name, task] = (out, load_prompt(out, backbone=target_bb).prompt)
    held_out_dirs, rows = {}, []
    evaluated = list(dict.fromkeys(t for info in projectors.values() for t in info["eval_tasks"]))
    for task in evaluated:
        tspec = load_task(task, max_length=spec.data.max_length)
        mine = {name: info for name, info in projectors.items() if task in info["eval_tasks"]}
        entries = [("projected", name, s, t) for (name, s), (_, t) in projected.items() if name in mine]
        lengths = sorted({int(e[3].shape[0]) for e in entries})
        entries += [("random", None, None, init_prompt(target_bb, n, "random", seed=spec.seeds[0])) for n in lengths]
        for name, info in mine.items():
            if task not in info["train_tasks"] and (name, task) in projected:
                held_out_dirs.setdefault((info["objective"], task), projected[name, task][0])
        for split in splits:
            limit = spec.data.dev_limit if split == "dev" else spec.data.test_limit
            data = encode_split(tspec, target_bb, split, limit=limit)
            own = tgt_bank.get(task)
            own_value = (score_prompts(target_bb, load_prompt(own[1], backbone=target_bb).prompt, tspec, data)[0]
                         if own else math.nan)
            for n in lengths:  # one forward pass per prompt length: prompts stack only when their shapes agree
                group = [e for e in entries if e[3].shape[0] == n]
                scores = score_prompts(target_bb, torch.stack([e[3] for e in group]), tspec, data)
                for (kind, name, source_task, _), value in zip(group, scores, strict=True):
                    info = mine.get(name, {})
                    rows.append(_row(spec.projector, kind, info.get("objective"), source_task, task, tspec.metric,
                                     value, own_value, n, info.get("run_id"), src_bank.get(source_task, (None,))[0],
                                     split, info.get("train_tasks")))
            if own:
                rows.append(_row(spec.projector, "own", None, task, task, tspec.metric, own_value, own_value, None,
                                 None, own[0], split, None))
    return rows, held_out_dirs


def _row(p, kind, objective, source_task, target_task, metric, value, own_value, n, projector_run, source_run,
         split, train_tasks) -> dict:
    rel = value / own_value if own_value and not math.isnan(own_value) else math.nan
    # held_out: nothing of the source task reached the projector (a random prompt carries no task; the target's own
    # prompt was tuned on the task itself)
    held_out = source_task not in train_tasks if kind == "projected" else kind == "random"
    return {"prompt": kind, "objective": objective, "source_backbone": p.source_backbone,
            "target_backbone": p.target_backbone, "source_task": source_task, "target_task": target_task,
            "same_task": source_task == target_task, "held_out": bool(held_out), "split": split, "metric": metric,
            "value": float(value), "own_value": float(own_value), "relative_value": float(rel), "n_tokens": n,
            "projector_run": projector_run, "source_prompt_run": source_run,
            "projector_train_tasks": json.dumps(list(train_tasks)) if train_tasks is not None else None}


def summarise(rows: list, split: str = "test") -> dict:
    """On one split: the mean held-out same-task score per objective (a source prompt projected by a projector that
    never saw its task, scored on that task), of the random prompt and of the own prompt (+ relatives, counts)."""
    out = {}
    rows = [r for r in rows if r.get("split", "test") == split]
    for key in sorted({r["objective"] or r["prompt"] for r in rows}):
        pick = [r for r in rows if (r["objective"] or r["prompt"]) == key
                and (r["prompt"] == "random" or (r["same_task"] and (r["prompt"] == "own" or r["held_out"])))]
        if pick:
            out[f"{key}.mean"] = sum(r["value"] for r in pick) / len(pick)
            out[f"{key}.n"] = len(pick)
            rel = [r["relative_value"] for r in pick if not math.isnan(r["relative_value"])]
            if rel:
                out[f"{key}.relative"] = sum(rel) / len(rel)
    return out


def best_objective(rows: list, objectives) -> str:
    """The objective with the best held-out mean on the dev split: test rows never choose it (they are read once,
    for the table and the headline)."""
    dev = summarise(rows, "dev")
    return max(objectives, key=lambda o: dev.get(f"{o}.mean", -math.inf))


def _curve(tracker, run, metric: str) -> list:
    if run.curve:
        return [{"step": c["step"], "dev_metric": c["dev_metric"]} for c in run.curve]
    hist = tracker.metric_history(run.run_id, f"dev_{metric}")  # a reused run: read its curve back
    return sorted(({"step": m.step, "dev_metric": m.value} for m in hist), key=lambda c: c["step"])


def tpt_model(spec, tracker, workdir: Path, stage_run: str, objective: str, projected_dirs: dict, target_bb,
              tasks=None) -> list:
    """Prompt tuning on the target from the held-out projected prompt vs from `spec.init`, same seed; the speed-up
    per task (`projected_dirs` holds only projections by a projector that never saw the task)."""
    from ptx import sweep
    from ptx.prompt import load_prompt
    from ptx.prompt_runs import run_prompt
    from ptx.tasks import load_task
    from ptx.transfer import convergence_speedup  # the TPT stage's figure and request rules

    p, rows = spec.projector, []
    todo = [t for t in tasks or p.eval_tasks or spec.tasks if (objective, t) in projected_dirs]
    bar = progress.current()  # two prompt-tuning runs per task, counted in steps (planned_steps counted them)
    for task in todo:
        init_dir = projected_dirs[objective, task]
        n = int(load_prompt(init_dir).prompt.shape[0])
        base = sweep.study_request(spec, task, p.target_backbone, spec.seeds[0], prompt_length=n)
        start = bar.done
        vanilla = run_prompt(base, workdir, tracker, parent_run_id=stage_run, backbone=target_bb,
                             report=lambda m, step, state=None, s0=start: bar.update(done=s0 + step))
        bar.update(done=start + spec.train.steps)
        start = bar.done
        tpt = run_prompt(tpt_request(base, str(init_dir)), workdir, tracker,
                         parent_run_id=stage_run, backbone=target_bb,
                         extra_tags={"ptx.tpt": "projector", "ptx.projector_objective": objective},
                         report=lambda m, step, state=None, s0=start: bar.update(done=s0 + step))
        bar.update(done=start + spec.train.steps)
        metric = load_task(task).metric
        v_curve, t_curve = _curve(tracker, vanilla, metric), _curve(tracker, tpt, metric)
        rows.append({"task": task, "objective": objective, "vanilla_run": vanilla.run_id, "tpt_run": tpt.run_id,
                     "vanilla_init": v_curve[0]["dev_metric"], "tpt_init": t_curve[0]["dev_metric"],
                     **convergence_speedup(v_curve, t_curve)})
    return rows


def planned_steps(spec, units: list, objectives, src_bank: dict, tpt: bool, tpt_tasks=None) -> int:
    """The stage's progress total, known before anything runs: each distinct projector's training steps (two units
    with one training set train once) and, with TPT_MODEL, two prompt-tuning runs per task that some projector
    holds out and that has a source prompt to project (the tasks tpt_model will find)."""
    trained = {(o, tuple(u["train"])) for o in objectives for u in units}
    steps = len(trained) * spec.projector.steps
    if tpt:
        held_out = {t for u in units for t in u["eval"] if t not in u["train"] and t in src_bank}
        todo = [t for t in tpt_tasks or spec.projector.eval_tasks or spec.tasks if t in held_out]
        steps += 2 * spec.train.steps * len(todo)
    return steps


def run_projector_stage(spec, tracker, workdir, objectives=None, evaluate: bool = True, tpt: bool = True,
                        tpt_tasks=None, force: bool = False) -> dict:
    """The projector stage: skip (reason as a run tag) when a backbone is unset or missing; else train, eval, TPT.

    `objectives` defaults to (spec.projector.objective,); `tpt_tasks` (default: the eval tasks) bounds TPT_MODEL,
    the stage's most expensive part; `force` trains projectors that have a finished run again.
    """
    import pandas as pd

    from ptx.backbones import load_backbone

    p, workdir = spec.projector, Path(workdir).resolve()
    objectives = tuple(dict.fromkeys(objectives or (p.objective,)))
    for o in objectives:
        if o not in [x.value for x in Objective]:
            raise PtxError(f"projector objective '{o}': expected one of {[x.value for x in Objective]}")
    tags = {"ptx.kind": KIND, "ptx.stage": NAME, "ptx.study": spec.name,
            "ptx.source_backbone": p.source_backbone, "ptx.target_backbone": p.target_backbone}
    with tracker.run(track.run_name("projector", spec.name), tags, reuse=False) as run:
        stage_run = run.run_id
        reason = unavailable_reason(p)
        if reason:
            log.warning("projector stage skipped: %s", reason)
            tracker.log(stage_run, tags={"ptx.skipped": "true", "ptx.skip_reason": reason})
            return {"skipped": True, "reason": reason, "stage_run": stage_run}
        source, target = describe(p.source_backbone), describe(p.target_backbone, spec.insertion)
        units = projector_units(p, spec.tasks, task_categories(spec))
        tasks = tuple(t for u in units for t in (*u["train"], *u["eval"]))
        src_bank = bank(tracker, workdir, p.source_backbone, tasks, spec.name)
        tgt_bank = bank(tracker, workdir, p.target_backbone, tasks, spec.name)
        tracker.log(stage_run, params={"projector": asdict(p), "objectives": list(objectives),
                                       "units": json.dumps({u["key"]: u["train"] for u in units})})
        # the whole total at once, so the line never reaches 100% of the projectors and then restarts lower
        progress.current().update(total=planned_steps(spec, units, objectives, src_bank, evaluate and tpt, tpt_tasks))
        projectors = train_projectors(spec, tracker, workdir, stage_run, objectives, src_bank, tgt_bank, source, target,
                                      units, force=force)
        out = {"skipped": False, "stage_run": stage_run, "projectors": projectors}
        for o in objectives:  # the mean over this objective's projectors
            infos = [i for i in projectors.values() if i["objective"] == o]
            for key in ("initial_loss", "final_loss"):
                values = [i[key] for i in infos if i.get(key) is not None]
                tracker.log(stage_run, {f"{o}.{key}": sum(values) / len(values) if values else None})
        if evaluate:
            stage_dir = workdir / "projector_stage" / stage_run
            target_bb = load_backbone(p.target_backbone, insertion=spec.insertion)
            rows, projected_dirs = evaluate_projectors(spec, stage_dir, projectors, src_bank, tgt_bank, target_bb)
            summary = summarise(rows, "test")
            best = best_objective(rows, objectives)
            summary.update({f"dev.{k}": v for k, v in summarise(rows, "dev").items()})
            tables = stage_dir / "tables"
            tables.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_parquet(tables / "projector_zero_shot.parquet", index=False)
            out.update(summary=summary, best_objective=best, table=str(tables / "projector_zero_shot.parquet"))
            if tpt:
                tpt_rows = tpt_model(spec, tracker, workdir, stage_run, best, projected_dirs, target_bb, tpt_tasks)
                pd.DataFrame(tpt_rows).to_parquet(tables / "projector_tpt.parquet", index=False)
                for r in tpt_rows:  # NaN speed-ups (not reached, or at init) are explained by the flag tag
                    for key in ("speedup", "speedup_bound", "speedup_90", "tpt_best", "vanilla_best"):
                        if math.isfinite(r[key]):
                            summary[f"tpt.{r['task']}.{key}"] = r[key]
                for key, value in censored_speedups(tpt_rows).items():  # every run counted: none dropped
                    if math.isfinite(value):
                        summary[f"tpt.{key}"] = value
                out["tpt"] = tpt_rows
            flags = {f"ptx.tpt.{r['task']}.flag": r["flag"] for r in out.get("tpt", [])}
            tracker.log(stage_run, summary, tags={"ptx.best_objective": best, **flags})
            tracker.log_artifacts(stage_run, tables, "tables")
        return out


def run(spec, tracker, workdir, *, force: bool = False, max_concurrent: int | None = None,
        address: str | None = None, objectives=None, evaluate: bool = True, tpt: bool = True) -> dict:
    """The stage's entry: run_projector_stage (projectors are Ray tasks that fill the cluster); `objectives`,
    `evaluate` and `tpt` are `ptx project train/eval`'s choices."""
    return run_projector_stage(spec, tracker, workdir, objectives=objectives, evaluate=evaluate, tpt=tpt, force=force)
