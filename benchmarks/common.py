"""Shared helpers for the benchmarks: machine description, honest peak-memory meters, subprocess workers, tables.

Memory, stated plainly:
- CUDA: `torch.cuda.max_memory_allocated()` minus what was allocated before the measured steps (the weights,
  the batches), i.e. the extra memory the training steps needed at their peak.
- CPU: the growth of the process's peak resident set size (VmHWM in /proc/self/status) over its resident size
  just before the measured steps. The peak is reset first by writing "5" to /proc/self/clear_refs (Linux >= 4.0)
  and freed heap is handed back with malloc_trim, so a high-water mark left by model loading does not hide the
  training peak. RSS counts every allocation of the process (torch, Python, the allocator's slack), so run
  each variant in its own fresh subprocess and compare deltas, never absolute figures.
"""

import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_MARK = "@@RESULT@@ "  # a worker prints its JSON result on one line behind this mark


# ---- machine ----------------------------------------------------------------------------------------
def machine() -> dict:
    """Where a figure was measured: CPU model, cores, GPU, library versions, date."""
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        cpu = m.group(1).strip() if m else cpu
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_1m": round(os.getloadavg()[0], 1)}  # other jobs on the machine inflate wall times
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(Exception):
        import transformers

        info["transformers"] = transformers.__version__
    with contextlib.suppress(Exception):
        import peft

        info["peft"] = peft.__version__
    return info


def command_line() -> str:
    """The exact command that produced a figure (for RESULTS.md)."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


# ---- memory -----------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak extra memory of the code run between start() and peak(); see the module docstring for what it counts."""

    def __init__(self, device: str):
        self.device = device
        self.base = 0
        self.cpu_resettable = True

    def start(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        _trim_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            self.cpu_resettable = False  # the delta is then a lower bound: loading may have set the peak
        self.base = _status_kb("VmRSS") * 1024

    def peak(self) -> int:
        """Bytes above the start level at the peak."""
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.base)
        return max(0, _status_kb("VmHWM") * 1024 - self.base)

    def what(self) -> str:
        if self.device.startswith("cuda"):
            return "torch.cuda.max_memory_allocated delta"
        return "peak RSS (VmHWM) delta" + ("" if self.cpu_resettable else " (peak not resettable: lower bound)")


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_loop(step, n: int, device: str) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds per call of step(i), i in range(n), device synchronized around each.

    On a shared, loaded machine wall time also counts the time other processes held the cores; CPU time (with
    one intra-op thread, so no thread sits spinning at a barrier) is what the step itself cost.
    """
    wall, cpu = [], []
    for i in range(n):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        synchronize(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


# ---- workers ----------------------------------------------------------------------------------------
def emit(result: dict) -> None:
    """Print a worker's result for `run_worker` to read."""
    print(RESULT_MARK + json.dumps(result, sort_keys=True, default=str), flush=True)


def run_worker(argv: list[str], timeout: float = 900, env: dict | None = None) -> dict:
    """Run `python argv...` in a fresh process and return the JSON it emitted (or an error record)."""
    cmd = [sys.executable, *argv]
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s", "cmd": " ".join(cmd)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "cmd": " ".join(cmd)}


# ---- output -----------------------------------------------------------------------------------------
def table(rows: list[dict], cols: list[str]) -> str:
    """A plain-text (markdown) table of `rows` restricted to `cols`."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells)])


def mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))


def rotated_rounds(steps: dict, variants: list, rounds: int, warmup: int, device: str) -> tuple[dict, dict]:
    """One step of every variant per round, the order rotated each round so that load from other processes hits
    every variant alike: ({variant: wall seconds per round}, {variant: CPU seconds per round})."""
    wall, cpu = {v: [] for v in variants}, {v: [] for v in variants}
    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            w, c = timed_loop(lambda _i, v=v, r=r: steps[v](warmup + r), 1, device)
            wall[v] += w
            cpu[v] += c
    return wall, cpu
