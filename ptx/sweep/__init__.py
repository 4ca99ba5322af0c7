"""Everything Ray, one module per concern: connecting (cluster), the Tune sweep with its state file, resume and
finalisation (experiment, tuner, finalisation), trials of one prompt and of a group (trials, groups), generic task
and actor pools (pools), and the test fault hooks (faults). Ray-free study planning lives in ptx.plan.

The names below are the ones callers use (`from ptx import sweep; sweep.connect(...)`).
"""

from ptx.plan import (
    GPU_GROUP_SIZE,
    SweepSettings,
    grid_entries,
    group_requests,
    group_size,
    plan,
    planned_trials,
    study_request,
    sweep_requests,
    sweep_settings,
    unstarted_trials,
)
from ptx.prompt_runs import PromptRequest
from ptx.sweep import tuner
from ptx.sweep.cluster import (
    check_resources,
    connect,
    dashboard_login,
    dashboard_token,
    live_nodes,
    running_dashboard,
    shutdown,
)
from ptx.sweep.experiment import (
    STATE_FILE,
    check_tune_state,
    experiment_exists,
    resume_sweep,
    resumed_trainable,
    run_requests,
    run_sweep,
    trial_table,
)
from ptx.sweep.faults import FAIL_ONCE_ENV, HOLD_ENV
from ptx.sweep.finalisation import finalise
from ptx.sweep.groups import group_trainable, load_group_checkpoint, save_group_checkpoint
from ptx.sweep.pools import map_actors, map_tasks, report_units
from ptx.sweep.trials import prompt_trainable
from ptx.sweep.tuner import TrialProgress, build_tuner, make_scheduler, trial_group, trial_trainable
from ptx.train import TrainSettings

__all__ = [
    "FAIL_ONCE_ENV", "GPU_GROUP_SIZE", "HOLD_ENV", "STATE_FILE", "PromptRequest", "SweepSettings", "TrainSettings",
    "TrialProgress", "build_tuner", "check_resources", "check_tune_state", "connect", "dashboard_login",
    "dashboard_token", "experiment_exists", "finalise", "grid_entries", "group_requests", "group_size",
    "group_trainable", "live_nodes", "load_group_checkpoint", "make_scheduler", "map_actors", "map_tasks", "plan",
    "planned_trials", "prompt_trainable", "report_units", "resume_sweep", "resumed_trainable", "run_requests",
    "run_sweep", "running_dashboard", "save_group_checkpoint", "shutdown", "study_request", "sweep_requests",
    "sweep_settings", "trial_group", "trial_table", "trial_trainable", "unstarted_trials",
]


def __getattr__(name: str):
    if name == "GroupedScheduler":  # an experiment Tune saved before this package was split names it here
        return tuner.GroupedScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
