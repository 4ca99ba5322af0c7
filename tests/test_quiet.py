"""A quiet terminal: third-party progress bars switched off at ptx's load paths, and a Ray worker's lost exit
request (a SystemExit raised inside a garbage-collection callback) kept off its stderr. Each case runs in a fresh
interpreter, so the process-wide switches it flips stay there."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


LOST_EXIT = """
import gc, sys, weakref
{install}
class Thing:
    pass
def callback(ref):
    raise SystemExit(1)  # what Ray's SIGTERM handler raises, landing in a weakref callback
keep = weakref.ref(t := Thing(), callback)
del t
gc.collect()
def other(ref):
    raise ValueError("a real bug in a callback")
keep2 = weakref.ref(u := Thing(), other)
del u
gc.collect()
print("alive")
"""


def test_lost_exit_request_prints_nothing_but_other_unraisables_still_show():
    bare = _run(LOST_EXIT.format(install=""))
    assert "Exception ignored" in bare.stderr and "SystemExit" in bare.stderr  # what Ray forwarded before
    quiet = _run(LOST_EXIT.format(install="from ptx.progress import quiet_worker_exit; quiet_worker_exit()"))
    assert quiet.returncode == 0 and quiet.stdout == "alive\n"
    assert "SystemExit" not in quiet.stderr
    assert quiet.stderr.count("Exception ignored") == 1 and "ValueError: a real bug" in quiet.stderr


def test_model_build_and_load_draw_no_third_party_bar(tmp_path):
    """A tiny model built into an empty cache by the alias resolver (transformers' "Writing model shards"), loaded ("Loading
    weights"), a split encoded (datasets' "Map"): stderr carries none of their bars."""
    code = f"""
import os
os.environ["PTX_CACHE_DIR"] = {str(tmp_path)!r}
from ptx.assets import resolve_model
from ptx.backbones import load_backbone
from ptx.data import encode_split
from ptx.tasks import load_task
resolve_model("tiny-llama")  # first, as the driver's task check does: the build comes before any load
bb = load_backbone("tiny-llama")
encode_split(load_task("tweet_sentiment"), bb, "dev", limit=8)
print("ok")
"""
    got = _run(code)
    assert got.returncode == 0 and got.stdout.strip() == "ok", got.stderr[-2000:]
    for bar in ("Writing model shards", "Loading weights", "Map", "it/s]", "%|"):
        assert bar not in got.stderr, (bar, got.stderr[-2000:])
    assert (tmp_path / "models").is_dir()  # the model was built here, so the build's bars had their chance


@pytest.mark.ray
def test_ray_workers_started_by_ptx_keep_a_lost_exit_request_quiet(ray_local):
    """A real local Ray started by `sweep.connect` (the session's shared one, conftest.py): its workers run the
    setup hook, so the same lost SystemExit in a worker leaves nothing on the worker's stderr (the stream Ray
    forwards to the user's terminal)."""
    import ray

    @ray.remote(num_cpus=1)
    def lost_exit() -> str:
        import contextlib
        import gc
        import io
        import weakref

        class Thing:
            pass

        def callback(ref):
            raise SystemExit(1)

        err = io.StringIO()
        with contextlib.redirect_stderr(err):  # the default hook writes to sys.stderr
            keep = weakref.ref(t := Thing(), callback)  # noqa: F841
            del t
            gc.collect()
        return err.getvalue()

    assert ray.get(lost_exit.remote(), timeout=120) == ""
