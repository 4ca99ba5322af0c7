"""The core `ptx` commands end to end (tasks, train, eval), --help everywhere, and one-line exit-2 errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from cli_runner import invoke_cli
from click.testing import CliRunner

from ptx import track
from ptx.cli import cli
from ptx.data import encode_split
from ptx.evaluate import score_prompts
from ptx.prompt import load_prompt
from ptx.tasks import load_task

TRAIN = ["train", "--task", "tweet_sentiment", "--backbone", "tiny-bert", "--steps", "4", "--eval-every", "2",
         "--train-limit", "32", "--dev-limit", "16", "--prompt-length", "4", "--lr", "0.05", "--batch-size", "8"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No tracking URI or workdir leaks in from the caller: every test names its own --workdir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PTX_WORKDIR", raising=False)


def invoke(*args):
    """Run a command that must succeed; returns its stdout."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def assert_one_line_error(code, stderr, *needles):
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().splitlines()[-1] == errors[0], stderr  # one line, and the last
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---- tasks ----------------------------------------------------------------------------------------------

def test_tasks_list_and_show():
    table = invoke("tasks", "list")
    assert table.splitlines()[0].split()[:3] == ["name", "category", "kind"]
    assert any(line.startswith("tweet_sentiment ") for line in table.splitlines())
    rows = json.loads(invoke("tasks", "list", "--format", "json"))
    assert {"tweet_sentiment", "drug_sentiment", "bbc_topic"} <= {r["name"] for r in rows}
    shown = json.loads(invoke("tasks", "show", "tweet_sentiment"))
    assert shown["name"] == "tweet_sentiment" and shown["verbalizer"] == ["negative", "neutral", "positive"]


def _all_commands(group, path=()):
    yield path
    if isinstance(group, click.Group):
        for name, cmd in sorted(group.commands.items()):
            yield from _all_commands(cmd, (*path, name))


def test_help_on_every_command_and_group():
    paths = list(_all_commands(cli))
    assert ("train",) in paths and ("eval",) in paths and ("tasks", "list") in paths
    for path in paths:
        out = invoke(*path, "--help")
        assert out.startswith("Usage: ") and f"{' '.join(('cli', *path))}" in out.splitlines()[0], (path, out)


# ---- train / eval ---------------------------------------------------------------------------------------

def test_train_untracked(tmp_path):
    out = invoke(*TRAIN, "--no-track", "--workdir", tmp_path)
    first = out.splitlines()[0]
    assert re.fullmatch(r"trained \(untracked\): best dev \d\.\d{4} at step [024]", first), out
    path = Path(re.search(r"^prompt: (.+)$", out, re.M).group(1))
    art = load_prompt(path)
    assert art.prompt.shape == (4, 32) and art.meta["mlflow_run_id"] is None
    assert f"{art.meta['dev_metric']['value']:.4f}" in first
    assert not (tmp_path / "mlflow.db").exists()


def test_train_tracked_then_reused_then_eval(tmp_path, tiny, new_workdir):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    out = invoke(*TRAIN, "--workdir", tmp_path)
    run_id = re.match(r"trained (\w+): best dev (\d\.\d{4})", out).group(1)
    assert f"MLflow: sqlite:///{tmp_path.resolve()}/mlflow.db" in out
    tracker = track.MlflowTracker(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", workdir=tmp_path)
    run = tracker.get_run(run_id)
    assert run.status == "FINISHED" and run.tags["ptx.task"] == "tweet_sentiment"
    assert f"{run.metrics['best_dev_metric']:.4f}" in out
    prompt_dir = Path(re.search(r"^prompt: (.+)$", out, re.M).group(1))
    assert load_prompt(prompt_dir).meta["mlflow_run_id"] == run_id

    again = invoke(*TRAIN, "--workdir", tmp_path)
    assert again.startswith(f"reused finished run {run_id}:")

    scored = invoke("eval", "--prompt", prompt_dir, "--task", "tweet_sentiment", "--split", "test", "--limit", "40",
                    "--workdir", tmp_path)
    value = float(re.match(r"tweet_sentiment/test accuracy: (\d\.\d{4}) \(40 examples\)", scored).group(1))
    assert f"logged to run {run_id}" in scored
    logged = tracker.get_run(run_id).metrics["eval.tweet_sentiment.test.accuracy"]
    assert f"{logged:.4f}" == f"{value:.4f}"
    backbone = tiny("tiny-bert")
    direct = score_prompts(backbone, load_prompt(prompt_dir).prompt, load_task("tweet_sentiment"),
                           encode_split(load_task("tweet_sentiment"), backbone, "test", limit=40))[0]
    assert direct == pytest.approx(logged)


def test_eval_untracked_prints_the_score(tmp_path):
    out = invoke(*TRAIN, "--no-track", "--workdir", tmp_path)
    prompt_dir = re.search(r"^prompt: (.+)$", out, re.M).group(1)
    scored = invoke("eval", "--prompt", prompt_dir, "--task", "tweet_sentiment", "--split", "dev", "--limit", "16",
                    "--workdir", tmp_path)
    assert re.fullmatch(r"tweet_sentiment/dev accuracy: \d\.\d{4} \(16 examples\)\n", scored)


# ---- errors: exit code 2, one line ----------------------------------------------------------------------

def test_unknown_task(monkeypatch, tmp_path):
    code, _, err = invoke_cli("train", "--task", "tweet_sentimnt", "--backbone", "tiny-bert",
                               "--no-track", "--workdir", tmp_path)
    assert_one_line_error(code, err, "unknown task 'tweet_sentimnt'", "did you mean 'tweet_sentiment'?")
    code, _, err = invoke_cli("tasks", "show", "tweet_sentimnt")
    assert_one_line_error(code, err, "did you mean 'tweet_sentiment'?")


def test_unknown_backbone_alias(monkeypatch, tmp_path):
    code, _, err = invoke_cli(*TRAIN[:4], "tiny-bret", "--no-track", "--workdir", tmp_path)
    assert_one_line_error(code, err, "model 'tiny-bret'", "did you mean 'tiny-bert'?")


def test_multi_token_verbalizer_word(monkeypatch, tmp_path):
    """A temp task file (`--task path.yaml`) whose verbalizer word is not one token of the backbone."""
    rows = "\n".join(f"the film number {i} was {'good' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}"
                     for i in range(40))
    (tmp_path / "train.csv").write_text("text,label\n" + rows + "\n")
    task = tmp_path / "two_words.yaml"
    task.write_text("name: two_words\nversion: 1\ncategory: sentiment\nkind: classification\n"
                    "source: {files: {train: train.csv}}\ntemplate: '{text} It was {mask}.'\nlabel_column: label\n"
                    "labels: [neg, pos]\nverbalizer: [bad, very-good]\nmetric: accuracy\nmax_length: 32\n")
    assert load_task(str(task)).verbalizer == ("bad", "very-good")
    code, _, err = invoke_cli("train", "--task", task, "--backbone", "tiny-bert", "--steps", "2",
                               "--no-track", "--workdir", tmp_path / "w")
    assert_one_line_error(code, err, "verbalizer word 'very-good'", "backbone 'tiny-bert'", "['very', '-', 'good']")
    assert not (tmp_path / "w" / "prompts").exists()  # nothing trained, nothing saved


def test_eval_width_mismatch_and_corrupt_artifact(monkeypatch, tmp_path):
    out = invoke(*TRAIN, "--no-track", "--workdir", tmp_path)
    prompt_dir = Path(re.search(r"^prompt: (.+)$", out, re.M).group(1))
    code, _, err = invoke_cli("eval", "--prompt", prompt_dir, "--task", "tweet_sentiment",
                               "--backbone", "tiny-llama", "--no-track", "--workdir", tmp_path)
    assert_one_line_error(code, err, "prompt width 32", "'tiny-bert'", "'tiny-llama' width 64")

    weights = prompt_dir / "prompt.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    code, _, err = invoke_cli("eval", "--prompt", prompt_dir, "--task", "tweet_sentiment",
                               "--no-track", "--workdir", tmp_path)
    assert_one_line_error(code, err, str(weights), "corrupt or truncated safetensors")


def test_nan_loss_exits_2_and_names_the_kept_prompt(monkeypatch, tmp_path, tiny, new_workdir):
    # an infinite --lr is refused up front now; a finite init prompt too loud for fp32 still makes the loss NaN
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    from ptx.prompt import backbone_meta, save_prompt

    loud = save_prompt(tmp_path / "loud", torch.full((4, 32), 1e30), {"backbone": backbone_meta(tiny("tiny-bert"))})
    # click keeps the last value of a repeated option: this overrides TRAIN's --eval-every
    code, out, err = invoke_cli(*TRAIN, "--init-from", loud, "--eval-every", "1", "--workdir", tmp_path)
    line = assert_one_line_error(code, err, "non-finite loss", "best checkpoint (step 0")
    kept = Path(line.rsplit(" is kept at ", 1)[1])
    assert kept.parent == tmp_path.resolve() / "prompts"
    art = load_prompt(kept)
    assert torch.isfinite(art.prompt).all() and art.meta["best_step"] == 0
    run = track.MlflowTracker(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", workdir=tmp_path).get_run(kept.name)
    assert run.status == "FAILED"


def test_console_script_exit_code_and_one_line_stderr(tmp_path):
    """The installed `ptx` script itself (a real subprocess): exit code 2 and exactly one stderr line."""
    exe = Path(sys.executable).with_name("ptx")
    assert exe.is_file(), f"console script not installed beside {sys.executable}"
    env = {**os.environ, "PTX_WORKDIR": str(tmp_path / "w")}
    proc = subprocess.run([str(exe), "tasks", "show", "tweet_sentimnt"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: unknown task 'tweet_sentimnt'; did you mean 'tweet_sentiment'?"]
    usage = subprocess.run([str(exe), "train", "--backbone", "tiny-bert"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert usage.returncode == 2 and "Missing option '--task'" in usage.stderr


def test_reference_check_prints_a_table_within_120_columns_and_json(tmp_path, new_workdir, ptx_cache_dir):
    """A small released-prompt folder of the authors' layout (prompts/BACKBONE/TASK.pt, zero_shot_transfer.csv) on
    tiny-bert: the table fits 120 columns and shows each row of the --json output, which holds the numbers a
    direct call of `reference_check` returns."""
    from ptx.assets import known_d_model
    from ptx.stages.indicators import reference_check

    tasks = ["bbc_topic", "drug_condition", "drug_sentiment", "tweet_sentiment"]
    ref = tmp_path / "ref"
    (ref / "prompts" / "tiny-bert").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for task in tasks:
        torch.save(torch.randn(4, known_d_model("tiny-bert"), generator=gen), ref / "prompts" / "tiny-bert" / f"{task}.pt")
    rows = ["backbone,target_task,source_prompt,metric,value"]
    rows += [f"tiny-bert,{t},{s},acc,{0.3 + 0.1 * ((i * 7 + j * 3) % 5):.2f}"
             for i, t in enumerate(tasks) for j, s in enumerate(tasks)]
    (ref / "zero_shot_transfer.csv").write_text("\n".join(rows) + "\n")
    wd = tmp_path / "wd"
    new_workdir(wd / "reference-check")
    table = invoke("reference-check", ref, "--bootstrap", "50", "--workdir", wd)
    got = json.loads(invoke("reference-check", ref, "--bootstrap", "50", "--workdir", wd, "--json"))
    direct = reference_check(ref, track.NullTracker(workdir=tmp_path / "n"), tmp_path / "n", bootstrap=50)
    assert len(got) == len(direct) == 15  # 5 indicators x (pearson, spearman, kendall)
    for row, (_, want) in zip(got, direct.iterrows(), strict=True):
        assert row["indicator"] == want["indicator"] and row["method"] == want["method"]
        assert row["mean_over_targets"] == pytest.approx(want["mean_over_targets"], nan_ok=True)
        assert row["pooled_ci_high"] == pytest.approx(want["pooled_ci_high"], nan_ok=True)
    lines = table.rstrip("\n").splitlines()
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    assert lines[0].split() == ["backbone", "indicator", "method", "targets", "mean", "over", "targets", "[95%",
                                "CI]", "pooled", "[95%", "CI]", "pairs"]
    assert len(lines) == 1 + len(got)
    for line, row in zip(lines[1:], got, strict=True):
        assert line.split()[:4] == ["tiny-bert", row["indicator"], row["method"],
                                    f"{row['n_targets_defined']}/{row['n_targets']}"]
        mean = row["mean_over_targets"]
        shown = "n/a" if mean is None else f"{mean:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        assert shown in line and line.endswith(str(row["n_pairs"]))
