"""The multi-prompt benchmark runs in its CI-sized form (tiny backbone): its output format and JSON, not its timing."""

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
                           "--seq-len", "8", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"multi-prompt K=2: \d+\.\d\dx examples/s vs one at a time, peak memory \d+\.\d\dx", last)
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"grouped", "ptx", "peft"}
    # K=2 prompts of batch 2: the grouped step handles both prompts' examples, the single runs one prompt's
    assert results["grouped"]["examples_per_step"] == 4 and results["ptx"]["examples_per_step"] == 2
    assert f"{results['grouped']['speed_vs_ptx']:.2f}x examples/s" in last
