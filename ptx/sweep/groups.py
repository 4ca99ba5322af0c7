"""Grouped trials: many prompts of one backbone trained in one Tune trial with one backbone pass (ptx.train_group),
each member still its own MLflow run; a group's checkpoint holds every member's training state.
"""

import logging
import tempfile
from pathlib import Path

from ptx import track
from ptx.errors import PtxError
from ptx.plan import request_from
from ptx.sweep import faults
from ptx.sweep.trials import curve_metrics, find_trial_run
from ptx.train import load_checkpoint, save_checkpoint


def save_group_checkpoint(states: dict, directory) -> None:
    """A group's checkpoint: member i's training state in m<i>/ (train.save_checkpoint's format)."""
    for i, state in states.items():
        sub = Path(directory) / f"m{i}"
        sub.mkdir(parents=True, exist_ok=True)
        save_checkpoint(state, sub)


def load_group_checkpoint(directory) -> dict:
    """{member index: state} from a group checkpoint."""
    return {int(d.name[1:]): load_checkpoint(d) for d in Path(directory).iterdir() if d.is_dir() and d.name[:1] == "m"}


def group_trainable(config: dict) -> None:
    """One Tune trial = a group of prompt runs trained together; each member is still its own MLflow run."""
    import ray
    from ray import tune

    from ptx.backbones import load_backbone
    from ptx.prompt_runs import PromptRun, start_prompt_run
    from ptx.train import train_prompt
    from ptx.train_group import GroupMember, train_group

    const = config["const"]
    if const.get("quiet"):  # as in prompt_trainable: no line per checkpoint
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    reqs = [request_from({**config, "request": r}) for r in config["group"]]
    track.wait_reachable(const["tracking_uri"], tries=track.outage_wait_tries(), delay=2.0)
    tracker = track.open(const["tracking_uri"], const["experiment"], workdir=Path(const["workdir"]))
    trial_id, parent = tune.get_context().get_trial_id(), const["parent_run_id"]
    states: dict = {}
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            states = load_group_checkpoint(d)
    node = ray.get_runtime_context().get_node_id()
    backbone = load_backbone(reqs[0].backbone, insertion=reqs[0].insertion)  # one copy for the whole group
    latest: dict = dict(states)  # member index -> its last checkpoint state
    members, started, reused = [], [], []

    def member_report(i: int):
        def report(metrics: dict, step: int, state: dict | None):
            if state is not None and "prompt" in state:
                latest[i] = state
        return report

    for i, req in enumerate(reqs):
        member_trial = f"{trial_id}/m{i}"  # what ptx.trial_id is for a run of its own trial
        resume = states.get(i)
        run_id = (resume or {}).get("mlflow_run_id") or find_trial_run(tracker, member_trial, parent)
        if run_id and tracker.get_run(run_id).status == "FINISHED":  # finished before the group was stopped
            reused.append(run_id)
            continue
        if run_id and resume is None:
            tracker.reopen(run_id)
        if run_id:  # a retried group: the store keeps each point exactly once, as in prompt_trainable
            from ptx.tasks import load_task

            metric = load_task(req.task).metric
            tracker.skip_points |= tracker.stored_points(run_id, (f"dev_{metric}", "train_loss", "best_dev_metric"))
            tracker.set_tags(run_id, {"ptx.node": node})
            if resume is not None:
                tracker.log_curve(run_id, curve_metrics(resume["curve"], metric))
        tags = {"ptx.trial_id": member_trial, "ptx.group_trial": trial_id, "ptx.sweep_run": parent,
                "ptx.study": const["study"], "ptx.node": node, **const.get("tags", {})}
        run = start_prompt_run(req, const["workdir"], tracker, parent, const.get("force", False),
                               report=member_report(i), run_id=run_id, backbone=backbone, extra_tags=tags)
        if isinstance(run, PromptRun):  # this config already has a finished run (an earlier study)
            reused.append(run.run_id)
            continue
        started.append(run)
        members.append(GroupMember(run.spec, run.init, run.train, run.dev, req.settings, report=run.log_and_report,
                                   resume=resume, name=f"{req.task}/s{req.settings.seed}"))

    def checkpoint():
        live = {i: s for i, s in latest.items()}
        metrics = {"step": max(s["step"] for s in live.values()), "members": len(reqs), "reused": len(reused),
                   "best_dev_metric": sum(s["best_metric"] for s in live.values()) / len(live),
                   "mlflow_run_ids": ",".join(str(s.get("mlflow_run_id")) for s in live.values())}
        with tempfile.TemporaryDirectory() as d:
            save_group_checkpoint(live, d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        faults.after_report(metrics["step"], trial_id)

    def train_members() -> list:
        if len(members) == 1 and members[0].spec.kind == "generation":  # a group of one, trained by train_prompt
            m, run = members[0], started[0]

            def solo_report(metrics: dict, step: int, state: dict | None = None):
                run.log_and_report(metrics, step, state)
                if state is not None:
                    checkpoint()

            return [train_prompt(backbone, m.spec, m.init, m.train_data, m.dev_data, m.settings, report=solo_report,
                                 resume=m.resume)]
        return train_group(backbone, members, on_evaluated=checkpoint)

    if members:
        try:
            results = train_members()
        except BaseException:
            for run in started:
                run.fail()
            raise
        failed = []
        for run, result in zip(started, results, strict=True):
            try:
                run.finish(result)
            except PtxError as exc:  # a diverged member fails alone; the others are logged
                failed.append(str(exc))
        if failed:
            raise PtxError(f"{len(failed)} of {len(reqs)} group members failed: " + "; ".join(failed))
    else:
        tune.report({"best_dev_metric": float("nan"), "reused": len(reused), "step": 0})
