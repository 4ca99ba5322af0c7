"""Benchmarks in their CI-sized form (tiny backbone): the multi-prompt one and the scale one; their output format
and JSON, not their timing."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_bench_multiprompt_ci_sized(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_multiprompt.py", "--backbone", "tiny-llama", "--prompts",
                           "2", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--prompt-length", "4",
                           "--seq-len", "8", "--repeats", "1", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"multi-prompt K=2: \d+\.\d\dx examples/s vs one at a time, peak memory \d+\.\d\dx", last)
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"grouped", "ptx", "peft"}
    # K=2 prompts of batch 2: the grouped step handles both prompts' examples, the single runs one prompt's
    assert results["grouped"]["examples_per_step"] == 4 and results["ptx"]["examples_per_step"] == 2
    assert f"{results['grouped']['speed_vs_ptx']:.2f}x examples/s" in last


@pytest.mark.slow
def test_bench_multiprompt_memory_only_takes_the_median_of_fresh_processes(tmp_path):
    out = tmp_path / "mem.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_multiprompt.py", "--backbone", "tiny-roberta", "--prompts",
                           "2", "--members-per-pass", "2", "--batch-size", "2", "--prompt-length", "4", "--seq-len", "8",
                           "--memory-only", "--repeats", "3", "--allocator", "fixed", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"grouped", "ptx"}
    for r in results.values():
        runs = r["peak_mib_runs"]
        assert len(runs) == 3 and runs == sorted(runs) and r["peak_mib"] == runs[1]  # the median of three processes
        assert r["predicted_mib"] > 0 and r["measured_vs_predicted"] > 0
        assert "median of 3 fresh processes, allocator fixed" in r["memory_measure"]
    assert results["grouped"]["members_per_pass"] == 2
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"multi-prompt K=2 memory: grouped \d+ MiB \(model \d+\), one run \d+ MiB \(model \d+\), "
                        r"peak memory \d+\.\d\dx", last), last


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.cluster  # a fake autoscaling Ray cluster, PostgreSQL (when installed) and an MLflow server
def test_bench_scale_tiny_form(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--trials", "2", "--baseline-trials", "1",
                           "--max-nodes", "1", "--steps", "1", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"scale: \d+\.\d\dx slot-seconds per trial vs the in-process baseline, trial itself "
                        r"\d+\.\d\dx, MLflow writes/trial \d+\.\d\dx, write p99 \d+\.\d\dx", last), last
    result = json.loads(out.read_text())
    assert result["store"] in ("postgresql", "sqlite")
    assert result["tune"]["trials"] == 2 and result["tune"]["errored"] == 0
    assert result["tune"]["max_nodes_seen"] == 1 and result["tune"]["slots_per_node"] == 4  # aws.yaml gpu_1x
    # each run logs at least its creation, an evaluation and its end; the relay saw every write of both runs
    assert result["baseline"]["writes"] >= 3 and result["tune"]["writes"] >= 2 * result["baseline"]["writes"]
    assert f"{result['ratios_vs_baseline']['writes_per_trial_x']:.2f}x" in last
