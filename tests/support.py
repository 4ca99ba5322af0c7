"""Plain helpers shared by the test modules (the fixtures live in conftest.py, the CLI runner in cli_runner.py):
free loopback ports, waiting for a server's /health, a log's tail, the small tiny-llama study spec, a store's prompt
runs, the shared reference data's place, and hypothesis example counts scaled by the loaded profile."""

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml
from hypothesis import settings

# the small study most sweep tests start from: 2 tasks x 1 seed on tiny-llama, 12 steps, 2 trials at once
SMALL_STUDY = {
    "backbones": ["tiny-llama"],
    "tasks": ["tweet_sentiment", "drug_sentiment"],
    "seeds": [0],
    "prompt_length": 4,
    "init": "vocab",
    "train": {"steps": 12, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32},
    "data": {"train_limit": 64, "dev_limit": 16, "test_limit": 16},
    "resources": {"cpu": 1},
    "max_concurrent": 2,
    "max_failures": 2,
}


def write_spec(path: Path, **changes) -> Path:
    """SMALL_STUDY named after the file's stem, with top-level keys replaced by `changes`, written as YAML."""
    path.write_text(yaml.safe_dump({"name": path.stem, **SMALL_STUDY, **changes}))
    return path


# the authors' released prompts and results, beside the repository (not in it), as CI has them: ../shared/reference/...
REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "prompt-transferability"
NO_REFERENCE = ("the authors' released prompts are not beside the repository (expected "
                "../shared/reference/prompt-transferability/ relative to its root)")


def prompt_runs(uri: str, experiment: str | None = None) -> list:
    """Every ptx prompt run (any status) of `experiment` in the store at `uri`, or of all its experiments, as
    ptx.track.RunRecord."""
    from ptx import track

    if experiment is None:
        tracker = track.MlflowTracker(uri)
        return tracker.find_runs({"ptx.kind": "prompt"}, status=None, experiment_ids=tracker.all_experiment_ids())
    tracker = track.MlflowTracker(uri, experiment)
    return tracker.find_runs({"ptx.kind": "prompt"}, status=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll URL/health until it answers 200; an AssertionError with the log's tail if the server process exits
    first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: not healthy after {timeout} s:\n{tail(log)}")
        time.sleep(0.5)


def examples(n: int) -> int:
    """A property test's example count: `n` under the `ci` profile's 100 examples per test, scaled by the loaded
    profile (conftest.py: `thorough` multiplies it by ten)."""
    return max(10, round(n * settings.default.max_examples / 100))
