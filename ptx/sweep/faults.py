"""Fault hooks for the tests: a trial that raises once at a step, or holds after a step until released.

Inert unless their environment variables are set; `connect` passes both to every Ray worker, and a trial calls
`after_report` after each checkpointed report. The fault tests (tests/test_sweep.py, tests/test_sweep_group.py,
tests/test_multinode.py) set them to kill or fail trials at a known point.
"""

import os
import time
from pathlib import Path

FAIL_ONCE_ENV = "PTX_FAIL_ONCE_AT_STEP"  # fault-injection hook for tests: "STEP:MARKER_DIR"
HOLD_ENV = "PTX_HOLD_AT_STEP"  # test hook: "STEP:DIR", a trial waits after reporting STEP until DIR/release exists
WORKER_ENV = (FAIL_ONCE_ENV, HOLD_ENV)  # what connect() passes on to the Ray workers


def maybe_fail(step: int, trial_id: str) -> None:
    """Test hook: raise once at STEP (a marker file records that it happened)."""
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    at, marker_dir = spec.split(":", 1)
    if not Path(marker_dir).is_dir():  # armed only while the marker directory exists
        return
    marker = Path(marker_dir) / f"failed-{trial_id}"
    if step >= int(at) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("1")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_ONCE_ENV})")


def maybe_hold(step: int, trial_id: str) -> None:
    """Test hook: once a trial's report of STEP has returned (Tune's driver has processed that result and
    registered its checkpoint: function trainables report synchronously), the trial writes DIR/held-<trial id>
    holding the step and waits until DIR/release exists. A fault test then kills a node or the head at a known
    point, with no trial able to finish or run ahead first. Armed while DIR exists and DIR/release does not."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    at, hold_dir = spec.split(":", 1)
    release = Path(hold_dir) / "release"
    if step < int(at) or not Path(hold_dir).is_dir() or release.exists():
        return
    held = Path(hold_dir) / f"held-{trial_id}"
    tmp = held.with_suffix(".tmp")
    tmp.write_text(str(step))
    tmp.rename(held)
    while not release.exists():
        time.sleep(0.1)


def after_report(step: int, trial_id: str) -> None:
    """The test hooks a trial runs after each checkpointed report (inert unless their variables are set)."""
    maybe_fail(step, trial_id)
    maybe_hold(step, trial_id)
