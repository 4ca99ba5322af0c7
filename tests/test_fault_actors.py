"""An activation actor's node dies in the middle of the indicators' actor pool (a real multi-node Ray from
ray.cluster_utils.Cluster): the pool redoes the lost chunks on actors of a fresh node, and the masks equal those
computed without any fault, in the caller's order.

The pool's actors carry a custom resource only the worker nodes offer, so every actor runs on the node that is
killed (raylet and workers SIGKILLed: `remove_node(allow_graceful=False)`). Each chunk is slowed by 1 s and
announces itself in a marker directory, so the kill lands while chunks are in flight, not after the pool ended.
"""

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from ptx import activations, sweep
from ptx.stages.indicators import compute_bank_activations

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.slow]  # ~1-3 min on 2 busy cores
CHUNK_SECONDS = 1.0


class SlowWorker:
    """ActivationWorker with a pause per chunk and a marker file per chunk started."""

    def __init__(self, config: dict):
        self.inner = activations.ActivationWorker({k: v for k, v in config.items() if k != "started_dir"})
        self.started = Path(config["started_dir"])

    def masks(self, item: dict) -> dict:
        import os

        (self.started / f"{os.getpid()}-{time.monotonic_ns()}").write_text("")
        time.sleep(CHUNK_SECONDS)
        return self.inner.masks(item)


def test_actor_node_lost_mid_indicators_chunks_are_redone(tmp_path, monkeypatch, caplog, tiny, own_ray):
    import ray
    from ray.cluster_utils import Cluster

    prompts = torch.randn(6, 4, tiny("tiny-bert").d_model, generator=torch.Generator().manual_seed(0))
    started = tmp_path / "started"
    started.mkdir()

    # the nodes' workers import this module (the actor class) by name: put tests/ on their path
    here = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", f"{here.parent}{os.pathsep}{here}")
    monkeypatch.setattr(activations, "ActivationWorker", _bind(SlowWorker, started))
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        doomed = cluster.add_node(num_cpus=2, resources={"act": 2})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        # the pool runs in a thread; the node is killed and replaced from this (main) thread: Ray starts nodes
        # only from the main thread (signal handlers)
        outcome = {}

        def run_pool():
            try:
                outcome["masks"] = compute_bank_activations(
                    "tiny-bert", prompts, num_actors=2, chunk_size=1, resources={"cpu": 1, "custom": {"act": 1}})
            except Exception as exc:  # re-raised below, in the test's thread
                outcome["error"] = exc

        with caplog.at_level(logging.WARNING, logger="ptx.sweep"):
            pool = threading.Thread(target=run_pool, daemon=True)
            pool.start()
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not any(started.iterdir()) and pool.is_alive():
                time.sleep(0.1)
            chunks_before_kill = len(list(started.iterdir()))
            assert 0 < chunks_before_kill < len(prompts), "the kill would not land mid-pool"
            cluster.remove_node(doomed, allow_graceful=False)
            cluster.add_node(num_cpus=2, resources={"act": 2})
            pool.join(timeout=300)
        assert not pool.is_alive(), "the pool never finished after the node loss"
        if "error" in outcome:
            raise outcome["error"]
        got = outcome["masks"]
    finally:
        sweep.shutdown()
        cluster.shutdown()
    resubmitted = [r for r in caplog.records if "actor died while processing item" in r.getMessage()]
    assert resubmitted, "no chunk was in flight on the lost node"
    # the reference: the same masks computed in this process, no Ray, no fault
    reference = activations.capture_activations(tiny("tiny-bert"), prompts, "paper", None, "score", "decoder",
                                                prompts_per_pass=1)
    assert torch.equal(got, reference)
    print(f"FIGURES actor_node_lost: chunks started before the kill {chunks_before_kill}, "
          f"chunks redone {len(resubmitted)}")


def _bind(cls, started: Path):
    """A factory with the marker directory folded into the actor's config."""

    class Bound:
        def __init__(self, config: dict):
            self.worker = cls({**config, "started_dir": str(started)})

        def masks(self, item: dict) -> dict:
            return self.worker.masks(item)

    Bound.__name__ = "ActivationWorker"
    return Bound
