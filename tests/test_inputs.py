"""Bad input of every kind is one PtxError line, found before any work starts: property-based tests (hypothesis).

(a) any YAML document given to the spec loader: a valid spec (whose dry-run plan works) or a PtxError;
(b) any value of each numeric `ptx train` option: exit 0 with a finished MLflow run, or exit 2 with one error line;
(c) random bytes, random JSON and random tensors as prompt / projector artifact files: a PtxError.
Plus the regressions of issue 18: names, enums, backbone and filesystem errors, signals mid-training.
"""

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import invoke_cli as invoke_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from support import examples

from ptx import track
from ptx.config import StudySpec, load_study
from ptx.errors import PtxError
from ptx.projector import Projector, ProjectorConfig, load_projector, save_projector
from ptx.prompt import load_prompt, save_prompt
from ptx.sweep import plan

FAST = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
BASE_SPEC = {"name": "prop", "backbones": ["tiny-llama"], "tasks": ["tweet_sentiment"], "seeds": [0],
             "prompt_length": 4, "train": {"steps": 2, "eval_every": 1},
             "data": {"train_limit": 8, "dev_limit": 8, "test_limit": 8}}
# every field path of a spec, so mutations reach nested sections (train.lr, indicators.probe, ...)
FIELD_PATHS = ["name", "backbones", "tasks", "seeds", "insertion", "prompt_length", "init", "init_text", "stages",
               "max_concurrent", "max_failures", "workdir", "train.steps", "train.lr", "train.batch_size",
               "train.eval_every", "train.patience", "train.seed", "train.max_grad_norm", "train.bf16",
               "data.max_length", "data.dev_limit", "search.algorithm", "search.space", "search.num_samples",
               "search.space.lr", "scheduler.type", "scheduler.reduction_factor", "resources.cpu", "resources.gpu",
               "resources.custom", "transfer.sources", "transfer.splits", "transfer.unit", "tpt.source", "tpt.seeds",
               "indicators.probe", "indicators.position", "indicators.hook", "indicators.windows",
               "projector.form", "projector.objective", "projector.mix_weight", "projector.train_tasks",
               "projector.source_backbone", "train", "data", "tpt", "indicators"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=12),
                    st.sampled_from(["grid", "asha", "paper", "best", "../../x", "a/b", "", ".", "encoder",
                                     "indicator:", "indicator:e_avg_cos", "tweet_sentiment", "tiny-lama"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["grid", "uniform", "cpu"])),
                                        inner, max_size=4), max_leaves=10)


@pytest.fixture(scope="module", autouse=True)
def _task_registry_read_once():
    """The spec loader re-reads every task YAML on each call (about 1 s here); the registry does not change
    during these tests, so it is read once: the same real task list, memoised."""
    import ptx.tasks

    real = ptx.tasks.list_tasks
    tasks = real()
    ptx.tasks.list_tasks = lambda *a, **k: list(tasks) if not a and not k else real(*a, **k)
    yield
    ptx.tasks.list_tasks = real


def _set(doc: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = doc
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _load_or_error(path: Path):
    """The property of (a): a StudySpec whose plan works, or a one-line PtxError; anything else fails the test."""
    try:
        spec = load_study(path)
    except PtxError as exc:
        assert str(exc), "an empty error"
        return exc
    assert isinstance(spec, StudySpec)
    plan(spec)  # what `ptx run --dry-run` prints
    return spec


# ---- (a) the spec loader ----------------------------------------------------------------------------------
@settings(FAST, max_examples=examples(100))
@given(changes=st.lists(st.tuples(st.sampled_from(FIELD_PATHS), VALUES), min_size=1, max_size=4))
def test_spec_loader_mutated_specs_give_a_spec_or_a_ptx_error(tmp_path_factory, changes):
    doc = copy.deepcopy(BASE_SPEC)
    for path, value in changes:
        _set(doc, path, value)
    spec_file = tmp_path_factory.mktemp("spec") / "s.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    _load_or_error(spec_file)


@settings(FAST, max_examples=examples(60))
@given(doc=st.one_of(VALUES, st.dictionaries(st.one_of(st.sampled_from(FIELD_PATHS), st.text(max_size=6)), VALUES,
                                              max_size=6)))
def test_spec_loader_random_documents_give_a_spec_or_a_ptx_error(tmp_path_factory, doc):
    spec_file = tmp_path_factory.mktemp("spec") / "s.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    _load_or_error(spec_file)


@settings(FAST, max_examples=examples(60))
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_spec_loader_random_bytes_give_a_ptx_error(tmp_path_factory, raw):
    spec_file = tmp_path_factory.mktemp("spec") / "s.yaml"
    spec_file.write_bytes(raw)
    result = _load_or_error(spec_file)
    assert isinstance(result, PtxError)  # no random text is a spec with a name, backbones and tasks


@pytest.mark.parametrize("path, value, needle", [
    ("name", "../../x", "name: expected a name of letters, digits, '.', '_' or '-' (no path separators), found '../../x'"),
    ("name", "a/b", "found 'a/b'"),
    ("indicators.probe", "exampels", "indicators.probe: expected one of ['paper', 'examples'], found 'exampels'; did you mean 'examples'?"),
    ("indicators.position", "frist", "indicators.position: expected one of ['score', 'last', 'mean']"),
    ("indicators.hook", "decodr", "indicators.hook: expected one of ['encoder', 'decoder'], found 'decodr'"),
    ("tpt.source", "best_sme_category", "tpt.source: expected one of ['best_same_category', 'best_cross_category', 'best_any'], indicator:<name> or a task name, found 'best_sme_category'; did you mean 'best_same_category'?"),
    ("tpt.sources", ["best_same_category", "best_crss_category"], "tpt.sources: expected one of ['best_same_category', 'best_cross_category', 'best_any'], indicator:<name> or a task name, found 'best_crss_category'; did you mean 'best_cross_category'?"),
    ("tpt.sources", ["best_any", "best_any"], "tpt.sources: each source mode once, found ['best_any', 'best_any']"),
    ("tpt.sources", [], "tpt.sources: expected a non-empty list of source modes, found []"),
    ("transfer.sources", "bset", "transfer.sources: expected one of ['all', 'best'], found 'bset'; did you mean 'best'?"),
    ("projector.form", "per-token", "projector.form: expected one of ['flat', 'per_token'], found 'per-token'"),
    ("projector.objective", "tsk", "projector.objective: expected one of ['distance', 'task', 'mixed'], found 'tsk'"),
    ("insertion", "papr", "insertion: expected one of ['prepend', 'paper'], found 'papr'"),
    ("train.lr", float("nan"), "train.lr: expected a finite number > 0 and ≤ 1000000, found nan"),
    ("train.steps", 0, "train.steps: expected a whole number ≥ 1, found 0"),
    ("train.steps", "10", "train.steps: expected a whole number ≥ 1, found str '10'"),
    ("search.space", {"lr": {"grid": 5}}, "search.space.lr.grid: expected a non-empty list of values, found 5"),
])
def test_spec_values_are_checked_when_the_spec_loads(tmp_path, path, value, needle):
    """Each of these passed the loader (and `ptx run --dry-run`) before, and failed only when a stage ran."""
    doc = copy.deepcopy(BASE_SPEC)
    _set(doc, path, value)
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    with pytest.raises(PtxError) as err:
        load_study(spec_file)
    assert needle in str(err.value) and "1 error(s)" in str(err.value)
    code, out, stderr = invoke_main("run", spec_file, "--dry-run")
    assert code == 2 and out == "" and stderr.count("\n") == 1 and needle in stderr


# ---- (b) every numeric option of `ptx train` ---------------------------------------------------------------
GARBAGE = st.one_of(st.integers(-5, 0).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.text(max_size=4), st.sampled_from(["1e3", "0x10", "2.5", "", " ", "-0"]))


def _count(lo: int, hi: int):
    return st.one_of(st.integers(lo, hi).map(str), GARBAGE)


TRAIN_OPTIONS = {  # valid values kept small: every accepted example really trains
    "--steps": _count(1, 3), "--prompt-length": _count(1, 6), "--batch-size": _count(1, 64),
    "--eval-every": _count(1, 3), "--patience": _count(1, 2), "--seed": st.one_of(
        st.integers(-3, 2**33).map(str), GARBAGE),
    "--lr": st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), GARBAGE),
    "--train-limit": _count(1, 40), "--dev-limit": _count(1, 12), "--max-length": _count(1, 48),
}


@pytest.fixture(scope="module")
def train_workdir(tmp_path_factory, new_workdir):
    """One workdir for every example, its store a copy of the migrated empty db (a fresh one migrates ~10 s)."""
    return new_workdir(tmp_path_factory.mktemp("train-prop") / "wd")


@settings(FAST, max_examples=10, derandomize=True)  # fixed examples: the suite stays deterministic
@given(values=st.fixed_dictionaries({}, optional=TRAIN_OPTIONS))
def test_train_numeric_options_exit_0_with_a_finished_run_or_2_with_one_line(train_workdir, values):
    args = ["train", "--task", "tweet_sentiment", "--backbone", "tiny-bert", "--workdir", train_workdir,
            "--steps", "2", "--eval-every", "1", "--prompt-length", "2", "--train-limit", "16", "--dev-limit", "8"]
    for flag, value in values.items():  # click keeps the last value of a repeated option
        args += [f"{flag}={value}"]
    code, out, err = invoke_main(*args)
    if code == 0:
        run_id = re.match(r"(?:trained|reused finished run) (\w+): best dev", out).group(1)
        uri = track.resolve_tracking_uri(None, Path(train_workdir))
        assert track.MlflowTracker(uri, workdir=train_workdir).get_run(run_id).status == "FINISHED"
        return
    assert code == 2, (values, err[-2000:])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err[-2000:]
    if "Invalid value" in errors[0]:  # refused while parsing: nothing else ran, nothing else printed
        assert err.count("\n") == 1 and out == ""


def test_out_of_range_options_are_refused_before_any_work(tmp_path):
    """Each of these used to train nothing and exit 0, or end in a traceback from inside torch."""
    for flag, value, needle in [("--steps", "0", "expected a whole number ≥ 1, found 0"),
                                ("--steps", "-3", "found -3"), ("--prompt-length", "0", "≥ 1, found 0"),
                                ("--lr", "nan", "expected a finite number > 0 and ≤ 1000000, found nan"),
                                ("--lr", "-0.1", "found -0.1"), ("--batch-size", "0", "found 0"),
                                ("--init", "vocb", "did you mean 'vocab'?")]:
        code, out, err = invoke_main("train", "--task", "tweet_sentiment", "--backbone", "tiny-bert",
                                     "--workdir", tmp_path / "w", flag, value)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"error: Invalid value for '{flag}': ") and needle in err, err
    assert not (tmp_path / "w").exists()  # refused before the workdir was even created


# ---- (c) damaged artifacts ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A valid prompt artifact and a valid projector artifact to damage."""
    root = tmp_path_factory.mktemp("artifacts")
    prompt = save_prompt(root / "prompt", torch.randn(3, 8),
                         {"backbone": {"name": "tiny-bert", "revision": None, "kind": "masked_lm", "d_model": 8}})
    config = ProjectorConfig("flat", 8, 6, n_tokens=3, hidden=5)
    proj = save_projector(root / "projector", Projector(config), {"name": "a", "d_model": 8},
                          {"name": "b", "d_model": 6}, "task", ["tweet_sentiment"])
    assert load_prompt(prompt).prompt.shape == (3, 8) and load_projector(proj).projector.config == config
    return {"prompt": prompt, "projector": proj}


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                                     st.floats(allow_nan=False), st.text(max_size=8)),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)
FILES = ["prompt/prompt.json", "prompt/prompt.safetensors", "projector/projector.json",
         "projector/projector.safetensors"]


def _random_safetensors(data) -> bytes:
    """A well-formed safetensors file holding random names, dtypes and shapes."""
    names = data.draw(st.lists(st.sampled_from(["prompt", "net.0.weight", "norm.bias", "x"]), min_size=1,
                               max_size=3, unique=True))
    dtypes = [torch.float32, torch.float16, torch.int64, torch.bool, torch.float64]
    tensors = {}
    for name in names:
        shape = data.draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = data.draw(st.sampled_from(dtypes))
        fill = data.draw(st.sampled_from([0.0, 1.0, math.inf, math.nan]))
        tensors[name] = torch.full(shape, fill).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        save_file(tensors, f.name)
        return Path(f.name).read_bytes()


def _load(kind: str, path: Path):
    return load_prompt(path) if kind == "prompt" else load_projector(path)


@settings(FAST, max_examples=examples(120))
@given(data=st.data(), target=st.sampled_from(FILES),
       how=st.sampled_from(["bytes", "json", "safetensors", "truncate", "mutate"]))
def test_damaged_artifacts_give_a_ptx_error(artifacts, tmp_path_factory, data, target, how):
    kind, name = target.split("/")
    work = tmp_path_factory.mktemp("damaged") / kind
    shutil.copytree(artifacts[kind], work)
    file = work / name
    if how == "bytes":
        file.write_bytes(data.draw(st.binary(max_size=300)))
    elif how == "json":
        file.write_text(json.dumps(data.draw(JSON_VALUES)))
    elif how == "safetensors":
        file.write_bytes(_random_safetensors(data))
    elif how == "truncate":
        raw = file.read_bytes()
        file.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 2))])  # the JSON's last '}' goes too
    else:  # one field of the metadata replaced (the file stays valid JSON)
        meta = json.loads((work / f"{kind}.json").read_text())
        key = data.draw(st.sampled_from(sorted(meta) + ["config.d_source", "config.form", "source.d_model"]
                                        if kind == "projector" else sorted(meta) + ["backbone.d_model"]))
        _set(meta, key, data.draw(JSON_VALUES))
        (work / f"{kind}.json").write_text(json.dumps(meta))
    try:
        _load(kind, work)
    except PtxError as exc:
        assert "\n" not in str(exc)
        return
    # only a changed field the loader does not rely on (e.g. git_sha) may still load
    assert how == "mutate", (target, how)


# ---- backbones, the filesystem, signals -----------------------------------------------------------------
def test_unloadable_backbones_are_one_line_naming_what_was_tried_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable here anyway; offline makes it instant
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text('{"model_type": "bert"}')
    fix = "use a ptx alias (tiny-bert, tiny-roberta, tiny-t5, tiny-llama, smollm2-135m, minilm-l6), a local " \
          "directory written by save_pretrained, or run with network access to the Hugging Face hub"
    for backbone, tried in [("someorg/somemodel", "tried the ptx aliases, a local directory, the Hugging Face cache"),
                            (tmp_path / "no-weights", f"tried the local directory {tmp_path / 'no-weights'}: ")]:
        code, out, err = invoke_main("train", "--task", "tweet_sentiment", "--backbone", backbone, "--no-track",
                                     "--workdir", tmp_path / "w")
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: cannot load backbone '{backbone}': {tried}") and err.rstrip().endswith(fix)


def test_filesystem_errors_are_one_line_before_training(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    base = ["train", "--task", "tweet_sentiment", "--backbone", "tiny-bert", "--no-track", "--steps", "1"]
    code, out, err = invoke_main(*base, "--workdir", a_file / "sub")
    assert code == 2 and err == f"error: --workdir {a_file / 'sub'}: cannot create the directory (Not a directory)\n"
    code, out, err = invoke_main(*base, "--workdir", a_file)
    assert code == 2 and err == f"error: --workdir {a_file}: expected a directory, found an existing file\n"
    code, out, err = invoke_main(*base, "--workdir", tmp_path / "w", "--out", a_file)
    assert code == 2 and err == f"error: --out {a_file}: expected a directory, found an existing file\n"
    assert not (tmp_path / "w").exists()


def _train_until_a_step_then_signal(args: list, env: dict, sig) -> subprocess.CompletedProcess:
    """Start `ptx train`, wait until its progress bar shows a finished step, send `sig`; the finished process."""
    import threading

    # a shell that starts the suite in the background leaves SIGINT ignored, and children inherit that: the CLI
    # under test gets the disposition an interactive user's process has
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err: list[str] = []
    stepped = threading.Event()

    def read():
        for chunk in iter(lambda: proc.stderr.read(64), ""):
            err.append(chunk)
            if re.search(r"tuning tweet_sentiment: .*\b[1-9]\d*/1000000", "".join(err)[-400:]):
                stepped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert stepped.wait(300), "training never made a step: " + "".join(err)[-2000:]
        proc.send_signal(sig)
        proc.wait(timeout=120)  # a signal that did not stop it fails here, not forever (stdout is a few lines)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()  # a million-step run must not outlive a failed test
            proc.wait()
    reader.join(timeout=30)
    return subprocess.CompletedProcess(args, proc.returncode, out, "".join(err))


@pytest.mark.slow  # three `ptx train` subprocesses: about 40 s on an idle 2-core machine, minutes under load
def test_a_signal_mid_training_leaves_a_killed_run_no_prompt_and_a_clean_rerun(tmp_path, new_workdir):
    """Real `ptx train` subprocesses get a real SIGINT, then a real SIGTERM, once a training step is done."""
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PTX_WORKDIR")}
    args = [sys.executable, "-m", "ptx", "train", "--task", "tweet_sentiment", "--backbone", "tiny-bert",
            "--workdir", str(tmp_path), "--prompt-length", "2", "--train-limit", "16", "--dev-limit", "8"]
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)):
        done = _train_until_a_step_then_signal([*args, "--steps", "1000000"], env, sig)
        assert done.returncode == code and "Traceback" not in done.stderr, done.stderr[-2000:]
    tracker = track.MlflowTracker(track.resolve_tracking_uri(None, tmp_path), workdir=tmp_path)
    runs = tracker.find_runs({"ptx.kind": "prompt"}, status=None)
    assert [r.status for r in runs] == ["KILLED", "KILLED"]
    assert not (tmp_path / "prompts").exists() or list((tmp_path / "prompts").iterdir()) == []  # not even temp dirs
    rerun = subprocess.run([*args, "--steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    runs = tracker.find_runs({"ptx.kind": "prompt"}, status=None)
    assert sorted(r.status for r in runs) == ["FINISHED", "KILLED", "KILLED"]
    assert [p.name for p in (tmp_path / "prompts").iterdir()] == [r.run_id for r in runs
                                                                    if r.status == "FINISHED"]


def test_invalid_yaml_names_the_line_and_column(tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: x\ndescription: a colon: inside\n")
    code, out, stderr = invoke_main("run", spec_file, "--dry-run")
    assert code == 2 and out == ""
    assert stderr.strip() == (f"error: study spec {spec_file}: invalid YAML at line 2, column 21 "
                              "(mapping values are not allowed here)")
