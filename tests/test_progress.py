"""The study's progress display (ptx/progress.py) and what feeds it, without Ray: plain lines for logs and CI, a
live tqdm line on a terminal, the log file, and the Tune callback's arithmetic on trial records shaped like Tune's."""

import io
import re
import time
from types import SimpleNamespace

from ptx import progress
from ptx.sweep import TrialProgress


def test_plain_lines_say_stage_units_elapsed_eta_and_best(tmp_path):
    out, log = io.StringIO(), tmp_path / "study.log"
    display = progress.Display(out, log_file=log, interactive=False, interval=3600)
    with progress.watching(display):
        with progress.stage("transfer", 40, "pairs") as bar:
            assert progress.current() is bar
            bar.advance(1)  # under 10% and inside the interval: no line
            bar.advance(4, best=0.5)  # 12%: a line (one per 10% step at most)
            bar.advance(1, best=0.25)  # still in the same 10% step: no line; the best is a maximum
            bar.advance(14)  # 50%: a line
        assert isinstance(progress.current(), progress._Silent)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == "[transfer] 0/40 pairs 0% | 0:00 elapsed, ETA ?"
    assert re.fullmatch(r"\[transfer\] 5/40 pairs 12% \| 0:00 elapsed, ETA 0:00 \| best 0\.500", lines[1]), lines[1]
    assert lines[2] == "[transfer] 20/40 pairs 50% | 0:00 elapsed, ETA 0:00 | best 0.500"
    assert lines[3] == "[transfer] 20/40 pairs 50% | 0:00 elapsed | best 0.500"  # closed: no ETA
    logged = log.read_text().splitlines()
    assert [ln.split(" ", 2)[2] for ln in logged] == lines  # the same lines, time-stamped


def test_plain_line_every_interval_while_nothing_finishes():
    out = io.StringIO()
    display = progress.Display(out, interactive=False, interval=0.2)
    def beats() -> list[str]:
        return [ln for ln in out.getvalue().splitlines() if ln.startswith("[indicators] 0/4 batches")]

    with progress.watching(display), progress.stage("indicators", 4, "batches"):
        # no unit finishes here: only the heartbeat thread can write; wait for its lines, not for a fixed time
        deadline = time.monotonic() + 120
        while len(beats()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(beats()) >= 4, out.getvalue()


def test_eta_uses_the_finer_fraction_and_lines_fit_the_width():
    bar = progress.Bar(None, "a-stage-with-a-rather-long-name", 4, "trials")
    bar.t0 -= 60  # one minute in
    bar.fraction = 0.25  # a quarter of all steps done, though no trial has finished
    assert bar.eta() == __import__("pytest").approx(180, abs=1)
    bar.note = "x" * 200
    assert len(bar.line(100)) == 100 and bar.line(100).endswith("…")


def test_live_bar_on_a_terminal_fits_100_columns():
    out = io.StringIO()
    display = progress.Display(out, interactive=True, interval=3600, width=100)
    with progress.watching(display), progress.stage("train", 8, "trials") as bar:
        bar.update(done=3, best=0.8125, note="2 running")
    frames = [f for f in re.split(r"[\r\n]", out.getvalue()) if f.strip()]
    assert frames and all(len(f.rstrip()) <= 100 for f in frames)
    last = [f for f in frames if f.startswith("[train]")][-1]
    assert "3/8 trials" in last and "best 0.812" in last and "2 running" in last


def test_no_display_no_output(capsys):
    with progress.stage("train", 3, "trials") as bar:
        bar.advance(2, best=1.0)
    progress.message("nobody is watching")
    assert capsys.readouterr() == ("", "")


def _trial(status, steps, step=None, best=None):
    last = {"step": step, "best_dev_metric": best} if step is not None else {}
    return SimpleNamespace(status=status, config={"request": {"settings": {"steps": steps}}}, last_result=last)


def test_trial_callback_counts_finished_trials_best_and_steps(monkeypatch):
    from ptx.sweep import tuner

    display = progress.Display(io.StringIO(), interactive=False, interval=3600)
    with progress.watching(display), progress.stage("train", 0, "trials") as bar:
        monkeypatch.setattr(tuner, "_bar", bar)
        monkeypatch.setattr(tuner, "_bar_base", (0, 0))
        bar.update(total=5)  # 5 trials planned; Tune has created 4 so far
        trials = [_trial("TERMINATED", 20, 20, 0.7), _trial("ERROR", 20, 5, 0.9), _trial("RUNNING", 20, 10, 0.6),
                  _trial("PENDING", 20)]
        TrialProgress().show(trials)
        assert (bar.done, bar.total, bar.best) == (2, 5, 0.9)
        assert bar.fraction == (20 + 20 + 10) / 100  # the fifth trial counts with the mean steps of the others
        assert bar.note == "1 running, 1 errored"
