"""What a person watching a study sees: one progress line per stage (units done / total, elapsed, ETA, best so far).

A `Display` is made at the edge (the CLI) with the stream to write to; `run_study` activates it and the stages
ask for a bar with `stage(name, total, unit)`. With no active display a stage gets a silent bar, so library
callers (tests, notebooks) see nothing. On a terminal the bar is a live tqdm line; elsewhere (CI, `ray job
submit` logs, a pipe) it is a plain line at the start, every `interval` seconds and at the end. The study's log
file gets the plain lines either way. Nothing here knows about Ray, MLflow or click: the adapters feed the bar.
"""

import functools
import importlib
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

WIDTH = 100  # columns a progress line may take (a terminal narrower than this gets its own width)
_active = None  # the Display of the running study, or None


def clock(seconds: float | None) -> str:
    """1:02:03 / 4:05 / ? (unknown)."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 360_000:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Bar:
    """One stage's progress; `advance` and `update` may be called from any thread of the driver."""

    def __init__(self, display, name: str, total: int, unit: str):
        self.display, self.name, self.unit = display, name, unit
        self.total, self.done, self.best, self.note = int(total), 0, None, ""
        self.fraction = None  # finer than done/total when known (e.g. steps inside running trials)
        self.t0 = time.monotonic()
        self.closed = False
        self._tqdm = None

    def advance(self, n: int = 1, best: float | None = None) -> None:
        """`n` more units done; `best` the best figure so far, if this stage has one."""
        self.update(done=self.done + n, best=best)

    def update(self, done: int | None = None, total: int | None = None, best: float | None = None,
               fraction: float | None = None, note: str | None = None) -> None:
        """Set any of: units done, the total, the best figure, the finished fraction (for the ETA), a short note."""
        if self.display is None:
            return
        with self.display.lock:
            if total is not None:
                self.total = max(int(total), 0)
            if done is not None:
                self.done = int(done)
            if best is not None and best == best:
                self.best = best if self.best is None else max(self.best, best)
            if fraction is not None:
                self.fraction = min(max(float(fraction), 0.0), 1.0)
            if note is not None:
                self.note = note
            self.display._changed(self)

    def eta(self) -> float | None:
        f = self.fraction if self.fraction is not None else (self.done / self.total if self.total else None)
        if not f:
            return None
        return (time.monotonic() - self.t0) * (1 - f) / f

    def line(self, width: int = WIDTH) -> str:
        """The plain line: `[transfer] 12/48 pairs 25% | 1:02 elapsed, ETA 3:06 | best 0.583 | note`."""
        pct = f" {100 * self.done // self.total}%" if self.total else ""
        parts = [f"[{self.name}] {self.done}/{self.total or '?'} {self.unit}{pct}",
                 f"{clock(time.monotonic() - self.t0)} elapsed" + ("" if self.closed else f", ETA {clock(self.eta())}")]
        if self.best is not None:
            parts.append(f"best {self.best:.3f}")
        if self.note:
            parts.append(self.note)
        text = " | ".join(parts)
        return text if len(text) <= width else text[: width - 1] + "…"

    def _postfix(self) -> str:
        bits = ([f"best {self.best:.3f}"] if self.best is not None else []) + ([self.note] if self.note else [])
        return ", ".join(bits)

    def close(self) -> None:
        if self.display is not None:
            self.display._close(self)


class Display:
    """Where progress goes: `stream` (a live bar on a terminal, plain lines otherwise) and a log file."""

    def __init__(self, stream: TextIO | None, log_file: str | Path | None = None, interactive: bool | None = None,
                 interval: float = 30.0, verbose: int = 0, width: int | None = None):
        self.stream = stream
        self.interactive = bool(stream is not None and stream.isatty()) if interactive is None else interactive
        self.interval, self.verbose = interval, verbose
        self.width = width or WIDTH
        if self.interactive:
            import shutil

            self.width = min(self.width, shutil.get_terminal_size((WIDTH, 24)).columns)
        self.log_file = Path(log_file) if log_file else None
        self.lock = threading.RLock()
        self.bars: list[Bar] = []
        self._last_plain: dict[int, float] = {}
        self._decile: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = None

    # ---- bars ------------------------------------------------------------------------------------------
    def open(self, name: str, total: int, unit: str) -> Bar:
        bar = Bar(self, name, total, unit)
        with self.lock:
            self.bars.append(bar)
            if self.interactive:
                from tqdm.auto import tqdm

                # the live line: tqdm draws and redraws it; ETA and elapsed come from our own clock
                bar._tqdm = tqdm(total=bar.total or None, desc=f"[{name}]", unit=f" {unit}", file=self.stream,
                                 ncols=self.width, leave=True, dynamic_ncols=False, mininterval=0.5,
                                 bar_format="{desc} {bar} {n_fmt}/{total_fmt}{unit} {postfix}")
            self._emit(bar, plain=not self.interactive)
        self._ensure_ticker()
        return bar

    def _changed(self, bar: Bar) -> None:
        if bar._tqdm is not None:
            t = bar._tqdm
            if bar.total and t.total != bar.total:
                t.total = bar.total
            t.n = bar.done
            t.set_postfix_str(self._tqdm_tail(bar), refresh=False)
            t.refresh()
        now = time.monotonic()
        decile = 10 * bar.done // bar.total if bar.total else 0
        if now - self._last_plain.get(id(bar), 0) >= self.interval or decile > self._decile.get(id(bar), 0):
            self._emit(bar, plain=not self.interactive)

    def _tqdm_tail(self, bar: Bar) -> str:
        tail = f"| {clock(time.monotonic() - bar.t0)} elapsed, ETA {clock(bar.eta())}"
        post = bar._postfix()
        return f"{tail} | {post}" if post else tail

    def _close(self, bar: Bar) -> None:
        with self.lock:
            if bar.closed:
                return
            bar.closed = True
            if bar._tqdm is not None:
                bar._tqdm.n = bar.done
                bar._tqdm.set_postfix_str(f"| {clock(time.monotonic() - bar.t0)}"
                                          + (f" | {bar._postfix()}" if bar._postfix() else ""), refresh=False)
                bar._tqdm.close()
            self._emit(bar, plain=not self.interactive)
            self.bars.remove(bar)
            self._last_plain.pop(id(bar), None)
            self._decile.pop(id(bar), None)

    def _emit(self, bar: Bar, plain: bool) -> None:
        """Write the bar's plain line to the stream (when not live) and to the log file."""
        self._last_plain[id(bar)] = time.monotonic()
        self._decile[id(bar)] = 10 * bar.done // bar.total if bar.total else 0  # a line per 10% done, at most
        text = bar.line(self.width)
        if plain and self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()
        self.log(text)

    def message(self, text: str) -> None:
        """A line for the person watching (and the log file), printed above any live bar."""
        with self.lock:
            if self.stream is not None:
                if self.interactive:
                    from tqdm.auto import tqdm

                    tqdm.write(text, file=self.stream)
                else:
                    self.stream.write(text + "\n")
                    self.stream.flush()
            self.log(text)

    def log(self, text: str) -> None:
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with self.log_file.open("a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    # ---- the heartbeat: elapsed time moves and plain lines come even while no unit finishes ---------------
    def _ensure_ticker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._tick, name="ptx-progress", daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, self.interval)):
            with self.lock:
                for bar in list(self.bars):
                    self._changed(bar)

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            for bar in list(self.bars):
                self._close(bar)


class _Silent:
    """The bar a stage gets when nobody watches."""

    display, total, done, best = None, 0, 0, None

    def advance(self, n: int = 1, best: float | None = None) -> None:
        pass

    def update(self, **_) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def watching(display: Display | None):
    """Make `display` the one the stages report to, for the duration of a study."""
    global _active
    previous, _active = _active, display
    try:
        yield display
    finally:
        if display is not None:
            display.stop()
        _active = previous


@contextmanager
def stage(name: str, total: int, unit: str):
    """The progress bar of one stage, closed on exit; silent when no display is active. While it is open, the
    stage's code (and the adapters it calls) reach it through `current()`."""
    bar = _active.open(name, total, unit) if _active is not None else _Silent()
    try:
        yield bar
    finally:
        bar.close()


def current():
    """The bar of the stage running now (the innermost open one), or a silent bar."""
    if _active is not None and _active.bars:
        return _active.bars[-1]
    return _Silent()


def message(text: str) -> None:
    """A line for the watcher (dropped when no display is active)."""
    if _active is not None:
        _active.message(text)


def silence_third_party_bars() -> None:
    """Turn off the tqdm bars of transformers, huggingface_hub and datasets for this process.

    ptx's own bar is what a person watches; theirs ("Loading weights", "Writing model shards", "Map") end without
    a newline, so their last redraw glues onto the next line ptx prints. Only libraries already imported are
    touched: importing one here would be a side effect of its own.
    """
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # also huggingface_hub's
    if "huggingface_hub" in sys.modules:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


# transformers modules that call tqdm.auto directly, past transformers' own switch
_DIRECT_TQDM = ("transformers.modeling_gguf_pytorch_utils",)


@contextmanager
def third_party_quiet():
    """No third-party progress bar while the block runs (e.g. a model conversion), direct tqdm users included."""
    patched = []
    for name in _DIRECT_TQDM:  # imported first (it imports transformers), so the switch below reaches it
        try:
            module = importlib.import_module(name)
        except ImportError:  # an older or newer transformers without that module: nothing of its to silence
            continue
        if hasattr(module, "tqdm"):
            patched.append((module, module.tqdm))
            module.tqdm = functools.partial(module.tqdm, disable=True)
    silence_third_party_bars()
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original


def quiet_worker_exit() -> None:
    """Installed in every Ray worker at start (the sweep's runtime env names it): keep a lost exit request quiet.

    A worker told to stop (SIGTERM when a trial actor ends with its study) gets a SystemExit raised by Ray's
    signal handler wherever its main thread stands. When that is inside a garbage-collection callback (a WeakSet's
    `_remove`, say), Python cannot raise it there and prints "Exception ignored in ..." with the traceback to the
    worker's stderr, which Ray forwards to the user's terminal. The exit itself still happens (Ray kills the
    worker after its grace period), so such a SystemExit goes to the worker's log at debug level instead; every
    other unraisable exception keeps Python's own report.
    """
    import logging

    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            logging.getLogger(__name__).debug("exit request lost in %r during shutdown", unraisable.object)
            return
        default(unraisable)

    sys.unraisablehook = hook


def verbosity() -> int:
    """The active display's verbosity (-v count); 0 when none: Tune's own tables show from 1 up."""
    return _active.verbose if _active is not None else 0
