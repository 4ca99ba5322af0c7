"""A sweep's trial of one prompt run (prompt_trainable) and what every trial shares: finding a trial's MLflow run
again after a retry, and resending the curve an earlier attempt could not log.
"""

import logging
import tempfile
from pathlib import Path

from ptx import track
from ptx.plan import request_from
from ptx.prompt_runs import run_prompt
from ptx.sweep import faults
from ptx.train import load_checkpoint, save_checkpoint


def find_trial_run(tracker, trial_id: str, sweep_run: str) -> str | None:
    """The run id of a trial's MLflow run (by its trial id and sweep run tags), or None before its first start."""
    runs = tracker.find_runs({"ptx.trial_id": trial_id, "ptx.sweep_run": sweep_run}, status=None, max_results=1)
    return runs[0].run_id if runs else None


def curve_metrics(curve: list[dict], metric: str) -> list[dict]:
    """The points `run_prompt` logs at each evaluation (dev metric, train loss, best so far), from a checkpoint's curve."""
    best, out = float("-inf"), []
    for p in curve:
        best = max(best, p["dev_metric"])
        out.append({"step": p["step"], f"dev_{metric}": p["dev_metric"], "train_loss": p.get("train_loss"),
                    "best_dev_metric": best})
    return out


def prompt_trainable(config: dict) -> None:
    """One Tune trial = one prompt run; reports each dev evaluation with a checkpoint."""
    import ray
    from ray import tune

    from ptx.tasks import load_task

    const = config["const"]
    if const.get("quiet"):  # a line per checkpoint from every trial is noise beside the driver's progress line
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    req = request_from(config)
    # a trial (re)started while the MLflow server is down waits for it (80 s at most) instead of failing in 12 s:
    # an outage then costs a trial one retry, not all of them (docs/fault_tolerance.md)
    track.wait_reachable(const["tracking_uri"], tries=track.outage_wait_tries(), delay=2.0)
    tracker = track.open(const["tracking_uri"], const["experiment"], workdir=Path(const["workdir"]))
    trial_id = tune.get_context().get_trial_id()
    resume, run_id = None, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_checkpoint(d)
        run_id = resume.get("mlflow_run_id")
    run_id = run_id or find_trial_run(tracker, trial_id, const["parent_run_id"])
    if run_id:  # reopened: an earlier attempt may have closed it (FAILED, or KILLED by an interrupted sweep)
        tracker.reopen(run_id)
    node = ray.get_runtime_context().get_node_id()  # which node ran (the latest attempt of) this trial
    if run_id:  # a retry (a failure, a lost node, an MLflow outage): the store keeps each point exactly once
        metric = load_task(req.task).metric
        tracker.skip_points |= tracker.stored_points(run_id, (f"dev_{metric}", "train_loss", "best_dev_metric"))
        tracker.set_tags(run_id, {"ptx.node": node})
        if resume is not None:  # resend what the last attempt could not log (e.g. while the server was down)
            tracker.log_curve(run_id, curve_metrics(resume["curve"], metric))

    def report(metrics: dict, step: int, state: dict | None):
        if state is None or "prompt" not in state:  # the step-0 evaluation: logged to MLflow, not a Tune result
            return
        metrics = {**metrics, "step": step, "mlflow_run_id": state.get("mlflow_run_id")}
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(state, d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        faults.after_report(step, trial_id)

    tags = {"ptx.trial_id": trial_id, "ptx.sweep_run": const["parent_run_id"], "ptx.study": const["study"],
            "ptx.node": node, **const.get("tags", {})}
    run = run_prompt(req, const["workdir"], tracker=tracker, parent_run_id=const["parent_run_id"],
                     report=report, resume=resume, run_id=run_id, extra_tags=tags, force=const.get("force", False))
    if run.reused:  # this config already has a finished run (an earlier sweep): report it and stop
        tune.report({"best_dev_metric": run.best_metric, "mlflow_run_id": run.run_id, "reused": True, "step": 0})
