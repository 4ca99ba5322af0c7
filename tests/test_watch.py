"""Watching a study: the smoke study through the CLI (real local Ray, sqlite MLflow, tiny models), run once for the
module, then what a person sees: the progress lines, the MLflow UI (served by `ptx ui`, rendered in headless
Chromium), the records behind it (experiment kind, datasets, run names, the report's links) and the Ray dashboard
entered with the token.

The study runs in this process (click's CliRunner) rather than in a subprocess so that its local Ray, dashboard
included, is still up for the dashboard test; the module shuts it down at the end.
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import free_port, wait_healthy

from ptx import sweep, track

pytestmark = pytest.mark.ray
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium missing: run `make browser`")
RAY_FORWARDED = re.compile(r"(\x1b\[[\d;]*m)*\([^\s()]+ pid=\d+(, ip=[\w.:-]+)?\)")
smoke_test = pytest.mark.slow  # the tests of the smoke study: the study alone takes 80 s on 2 nearly idle cores
STAGE_UNITS = {"train": "trials", "transfer": "pairs", "tpt": "trials", "indicators": "batches",
               "projector": "steps", "report": "stage"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, new_workdir, own_ray):
    """`ptx demo --smoke` with its output captured (not a terminal: plain progress lines), starting its own Ray
    (own_ray: the demo's dashboard line is the test's business)."""
    from click.testing import CliRunner

    from ptx.cli import cli

    workdir = new_workdir(tmp_path_factory.mktemp("watch") / "smoke")  # its store: the migrated empty db, copied
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, ["demo", "--smoke", "--workdir", str(workdir)], catch_exceptions=False)
    import ray

    out = SimpleNamespace(workdir=workdir, output=result.output, code=result.exit_code,
                          seconds=time.perf_counter() - t0, uri=f"sqlite:///{workdir / 'mlflow.db'}",
                          gcs=ray.get_runtime_context().gcs_address if ray.is_initialized() else None)
    (workdir.parent / "demo-output.txt").write_text(result.output)  # kept with the tmp dir, for a failure's reader
    yield out
    sweep.shutdown()


@smoke_test
def test_smoke_study_prints_one_progress_line_per_stage(smoke):
    out = smoke.output
    assert smoke.code == 0, out[-3000:]
    lines = out.splitlines()
    for stage, unit in STAGE_UNITS.items():  # each stage ends on a line with all of its units done
        final = [ln for ln in lines if re.fullmatch(rf"\[{stage}\] (\d+)/\1 {unit} 100% \| \d+:\d\d elapsed.*", ln)]
        assert final, (stage, [ln for ln in lines if ln.startswith(f"[{stage}]")])
        assert int(re.match(r"\[\w+\] (\d+)", final[-1]).group(1)) > 0
    assert re.search(r"^\[train\] 4/4 trials 100% \| .*best 0\.\d{3}", out, re.M)  # best dev figure so far
    assert re.search(r"^\[transfer\] 20/20 pairs 100%", out, re.M)  # 4 targets x (4 prompts + a random one)
    # Ray forwards its workers' warnings and errors as "(NAME pid=N[, ip=A]) ..." lines (NAME a class, task or
    # actor name such as a trial's "drug_sentiment-tiny-llama-s0-1a2b_00001", maybe coloured), which stay as Ray
    # writes them
    ours = [ln for ln in lines if not RAY_FORWARDED.match(ln)]
    wide = [ln for ln in ours if len(ln) > 120]
    assert not wide, wide
    for noise in ("Traceback", "Exception ignored", "Writing model shards", "Loading weights", "it/s]"):
        assert noise not in out, noise  # no worker's shutdown traceback, no third-party bar
    for noise in ("Configuration for experiment", "Trial status", "Checkpoint successfully created",
                  "View detailed results here"):  # Tune's own tables and lines: only with -v
        assert noise not in out
    logged = (smoke.workdir / "study.log").read_text()
    for stage, unit in STAGE_UNITS.items():
        assert re.search(rf"\[{stage}\] (\d+)/\1 {unit} 100%", logged), stage
    assert "  Ray dashboard (while this runs): http://127.0.0.1:" in out
    assert "log in: paste the token from `ray get-auth-token` (file ~/.ray/auth_token) into its login box" in out
    assert out.rstrip().splitlines()[-3:] == [  # it ends with the report, the MLflow UI and the dashboard
        f"report: {smoke.workdir / 'report' / 'index.html'}", f"MLflow UI: ptx ui {smoke.workdir}",
        f"Ray dashboard: {_dashboard(smoke)} (its local Ray stops with this command)"]


def test_ray_forwarded_line_filter_matches_the_shapes_ray_writes():
    """The filter above, on the prefixes Ray puts before a worker's forwarded line (checked by hand against Ray's
    log monitor output): class, task and hyphenated trial-actor names, with and without colour and node address."""
    forwarded = ["(ResourceTrainable pid=4211) warning", "\x1b[36m(_score_target pid=88)\x1b[0m Traceback",
                 "(drug_sentiment-tiny-llama-s0-1a2b3c4d_00001 pid=9120) Exception ignored in: <function WeakSet",
                 "\x1b[2m\x1b[36m(bbc_topic-smollm2-135m-s2-ab12_00003 pid=77, ip=10.0.0.5)\x1b[0m x"]
    ours = ["[train] 4/4 trials 100% | 0:12 elapsed", "study smoke: results under /tmp/x (pid=3)",
            "  (w pid=12) not at the line start", "( pid=1) no name"]
    assert [bool(RAY_FORWARDED.match(ln)) for ln in forwarded + ours] == [True] * 4 + [False] * 4


@smoke_test
def test_smoke_demo_runs_every_stage_and_its_report_renders(smoke, tmp_path):
    """Every stage through the CLI, then the report rendered in Chromium (moved here from test_report.py so that
    the suite runs the smoke study once)."""
    from mlflow import MlflowClient
    from test_report import _open_in_chromium

    workdir, out = smoke.workdir, smoke.output
    assert smoke.code == 0, out[-3000:]
    for line in ("stage train: trials=4, errored=0", "stage transfer:", "stage tpt:", "stage indicators:",
                 "stage projector: skipped=False", f"report: {workdir / 'report' / 'index.html'}",
                 f"mlflow ui --backend-store-uri sqlite:///{workdir / 'mlflow.db'}", "Ray dashboard"):
        assert line in out, (line, out[-3000:])
    summary = json.loads((workdir / "report" / "summary.json").read_text())
    assert summary["sections"] == {k: "ok" for k in ("training", "transfer", "tpt", "indicators", "projector")}
    assert summary["facts"]["training"]["tasks"] == 4 and summary["facts"]["training"]["prompt_runs"] >= 4
    client = MlflowClient(summary["tracking_uri"])
    for rid in summary["runs"]:  # every number's run is a real, finished run in the store
        assert client.get_run(rid).info.status == "FINISHED"
    if Path(CHROMIUM).exists():
        _, n_img = _open_in_chromium(workdir / "report" / "index.html", tmp_path)
        assert n_img >= 5  # heatmaps, TPT curves, indicator scatter plots, projector figure


@smoke_test
def test_mlflow_records_kind_datasets_names_and_report_links(smoke):
    from ptx.backbones import load_backbone
    from ptx.data import describe_split, encode_split
    from ptx.tasks import load_task

    tracker = track.MlflowTracker(smoke.uri, "smoke", workdir=smoke.workdir)
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    prompts = tracker.find_runs({"ptx.kind": "prompt"})
    assert len(prompts) >= 6  # 4 trained + TPT runs (+ the projector stage's)
    for run in prompts:
        task, backbone = run.tags["ptx.task"], run.tags["ptx.backbone"]
        assert run.name == f"{task} · {backbone} · s0"
        inputs = {(d.name, d.context) for d in run.datasets}
        assert inputs == {(f"{task}/train", "train"), (f"{task}/dev", "dev")}
    # the digest is the encoded split's (recomputed here), and it finds every run trained on that split
    spec = load_task("tweet_sentiment")
    split = describe_split(spec, "train", encode_split(spec, load_backbone("tiny-llama"), "train", limit=128))
    on_split = tracker.runs_on_dataset("tweet_sentiment/train", split["digest"], context="train")
    expected = {r.run_id for r in prompts if r.tags["ptx.task"] == "tweet_sentiment"
                and r.tags["ptx.backbone"] == "tiny-llama"}
    sweeps = {r.run_id for r in tracker.find_runs({"ptx.kind": "sweep"})}  # they list their trials' splits
    assert len(expected) == 2 and len(sweeps) == 2  # vanilla and TPT; the train and TPT sweeps
    assert {r.run_id for r in on_split} == expected | sweeps
    logged = next(d for r in on_split for d in r.datasets if d.name == split["name"])
    assert json.loads(logged.profile)["num_rows"] == 128 and json.loads(logged.source)["uri"] == split["source"]
    assert tracker.runs_on_dataset("tweet_sentiment/train", "0" * 16) == []
    # the report run links the latest run of each stage
    report = tracker.find_runs({"ptx.kind": "report"})[0]
    links = {k[len("ptx.link."):]: v for k, v in report.tags.items() if k.startswith("ptx.link.")}
    assert set(links) == {"train/smoke/sweep", "tpt/smoke/sweep", "transfer/smoke/tiny-llama",
                          "tpt/smoke/tiny-llama", "indicators/smoke/tiny-llama", "projector/smoke"}
    for key, rid in links.items():
        name = tracker.get_run(rid).name
        assert name == key.replace("/", " · ")
        assert f"[{name}](#/experiments/{tracker.experiment_id}/runs/{rid})" in report.tags["mlflow.note.content"]


def _dashboard(smoke) -> str:
    return re.search(r"Ray dashboard \(while this runs\): (\S+)", smoke.output).group(1)


@smoke_test
@needs_chromium
def test_ptx_ui_opens_the_runs_table_with_datasets(smoke, tmp_path):
    port = free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "ptx", "ui", str(smoke.workdir), "--port", str(port),
                                 "--address", smoke.gcs], stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log, 180)
        printed = log.read_text()
        assert f"MLflow UI: http://127.0.0.1:{port}  (store {smoke.uri}; Ctrl-C stops it)" in printed
        eid = track.MlflowTracker(smoke.uri, "smoke").experiment_id
        page = f"http://127.0.0.1:{port}/#/experiments/{eid}?workflowType=machine_learning"
        assert f"  smoke: {page}" in printed  # the study's runs table, in the model-training view
        assert f"Ray dashboard: {_dashboard(smoke)}  (log in: paste the token" in printed  # a cluster is up
        dom = _dump_dom(page, tmp_path / "u")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = _text(dom)
    assert text.startswith(" Runs - Experiment"), text[:3000]  # the runs table, not the GenAI overview
    for run in ("train · smoke · sweep", "tpt · smoke · sweep", "transfer · smoke · tiny-llama",
                "indicators · smoke · tiny-llama", "projector · smoke", "report · smoke"):  # sweep and stage runs
        assert run in text, (run, text[:3000])
    # the Dataset column: the sweeps list their trials' splits
    assert re.search(r"(tweet_sentiment|drug_sentiment|bbc_topic|drug_condition)/(train|dev)", text), text[:3000]
    assert "No data available" not in text  # the GenAI overview's empty charts


def _dump_dom(url: str, profile: Path) -> str:
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1600,1200", "--virtual-time-budget=30000", "--dump-dom", url]
    return subprocess.run(flags, check=True, capture_output=True, text=True, timeout=180).stdout


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", "", html, flags=re.S)))


@smoke_test
@needs_chromium
def test_ray_dashboard_lists_the_trial_actors_with_the_token(smoke, tmp_path):
    """The dashboard is a single-page app behind a token: --dump-dom cannot log in, so Chromium is driven over its
    DevTools protocol (the HTTP client of the aiohttp package Ray ships with): first without the token, then with
    the token in the cookie the dashboard's own login box sets, on the Actors view."""
    url, token = _dashboard(smoke), sweep.dashboard_token()
    assert token, "token authentication is on, so this process holds a token"
    trials = sorted(p.name for p in smoke.workdir.glob("ray_results/smoke-train-*/*-tiny-llama-s0-*") if p.is_dir())
    assert len(trials) == 4
    locked, actors = asyncio.run(_browse_dashboard(url, token, trials, tmp_path / "c"))
    assert "Authentication Token Required" in locked
    shown = [t for t in trials if t in actors]
    assert shown, actors[:3000]  # Tune reuses a trial's actor for the next trial: at least the first ones show
    assert "ResourceTrainable" in actors


async def _browse_dashboard(url: str, token: str, expect: list, profile: Path) -> tuple[str, str]:
    import aiohttp

    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "--window-size=1600,1200", "about:blank"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                page = next(t for t in await resp.json() if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 10_000))

                async def call(method: str, **params) -> dict:
                    n = next(ids)
                    await ws.send_json({"id": n, "method": method, "params": params})
                    while True:
                        msg = json.loads((await ws.receive()).data)
                        if msg.get("id") == n:
                            return msg.get("result", {})

                async def text_when(predicate, seconds: float) -> str:
                    deadline, text = time.monotonic() + seconds, ""
                    while time.monotonic() < deadline:
                        got = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                         returnByValue=True)
                        text = got.get("result", {}).get("value", "")
                        if predicate(text):
                            break
                        await asyncio.sleep(1)
                    return text

                await call("Page.navigate", url=f"{url}/#/actors")
                locked = await text_when(lambda t: "Authentication Token Required" in t, 90)
                await call("Network.setCookie", name="ray-authentication-token", value=token, url=url)
                await call("Page.navigate", url=f"{url}/#/actors")
                await call("Page.reload")
                actors = await text_when(lambda t: any(e in t for e in expect), 120)
                return locked, actors
    finally:
        proc.terminate()
        proc.wait(timeout=30)
