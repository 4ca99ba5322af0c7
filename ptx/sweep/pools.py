"""Generic distribution for the stages other than training: a Ray task per item (map_tasks, with progress units
relayed to the driver) and a pool of actors whose dead members' work is redone (map_actors).
"""

import logging
import os
import time

from ptx.errors import PtxError

log = logging.getLogger(__name__)


def map_tasks(fn, items: list, resources: dict | None = None, names: list[str] | None = None, on_done=None,
              on_units=None) -> list:
    """Run fn(item) as one Ray task per item (readable names), results in order; a failed item raises.

    on_done(i, result) runs on the driver as each item finishes; on_units(n) receives the units a task reports
    while it runs (`report_units` inside fn), relayed to the driver about once a second.
    """
    import ray

    res = dict(resources or {"cpu": 1})
    custom = res.pop("custom", None) or {}
    relay = _Relay.options(num_cpus=0).remote() if on_units else None
    target = _with_relay if relay is not None else fn
    remote = ray.remote(target)  # options() once per call: Ray's options() result has no options() of its own
    opts = {"num_cpus": res.get("cpu", 1), "num_gpus": res.get("gpu", 0), "resources": custom or None,
            "max_retries": 2, "retry_exceptions": False}
    refs = [remote.options(name=(names[i] if names else f"{fn.__name__}-{i}"), **opts).remote(
        *((fn, item, relay) if relay is not None else (item,))) for i, item in enumerate(items)]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(items)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if relay is not None:
                units = ray.get(relay.take.remote())
                if units:
                    on_units(units)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                if on_done is not None:
                    on_done(index[ref], results[index[ref]])
        if relay is not None:  # what the last tasks reported after the last poll
            units = ray.get(relay.take.remote())
            if units:
                on_units(units)
    finally:
        if relay is not None:
            ray.kill(relay)
    return results


class _RelayState:
    """A counter that Ray tasks add their finished units to and the driver drains (see map_tasks)."""

    def __init__(self):
        self.units = 0

    def add(self, n: int) -> None:
        self.units += n

    def take(self) -> int:
        n, self.units = self.units, 0
        return n


class _LazyRelay:
    """ray.remote(_RelayState), made on first use: nothing registers with Ray at import time."""

    _cls = None

    def options(self, **opts):
        import ray

        if _LazyRelay._cls is None:
            _LazyRelay._cls = ray.remote(_RelayState)
        return _LazyRelay._cls.options(**opts)


_Relay = _LazyRelay()
_relay = None  # inside a task started by map_tasks(on_units=...): the driver's relay actor


def _with_relay(fn, item, relay):
    global _relay
    _relay = relay
    try:
        return fn(item)
    finally:
        _relay = None


def report_units(n: int) -> None:
    """Inside a map_tasks task: `n` more units done (shown on the driver's progress bar); elsewhere nothing."""
    if _relay is not None and n:
        _relay.add.remote(int(n))


def map_actors(actor_factory, method: str, items: list, num_actors: int = 2, resources: dict | None = None,
               name: str = "worker", max_resubmits: int = 3, init_args: tuple = (), on_done=None) -> list:
    """Map items over a pool of actors (each built once, `cls(*init_args)`); a dead actor's work is redone.

    on_done(i, result) runs on the driver as each item finishes (progress)."""
    import ray
    from ray.exceptions import RayActorError

    res = dict(resources or {"cpu": 1})
    custom = res.pop("custom", None) or {}
    # one options() call per actor (an options wrapper has no .options); a per-call token keeps names unique
    # while a previous pool's actors are still being torn down
    opts = dict(num_cpus=res.get("cpu", 1), num_gpus=res.get("gpu", 0), resources=custom or None, max_restarts=0)
    cls, token = ray.remote(actor_factory), os.urandom(3).hex()
    actors = [cls.options(name=f"{name}-{i}-{os.getpid()}-{token}", **opts).remote(*init_args)
              for i in range(max(1, min(num_actors, len(items))))]
    results: list = [None] * len(items)
    pending = list(range(len(items)))
    attempts = [0] * len(items)
    in_flight: dict = {}
    spawned = len(actors)
    while pending or in_flight:
        while pending and actors:
            i, actor = pending.pop(0), actors.pop(0)
            in_flight[getattr(actor, method).remote(items[i])] = (i, actor)
        done, _ = ray.wait(list(in_flight), num_returns=1)
        i, actor = in_flight.pop(done[0])
        try:
            results[i] = ray.get(done[0])
            actors.append(actor)
            if on_done is not None:
                on_done(i, results[i])
        except RayActorError:
            attempts[i] += 1
            if attempts[i] > max_resubmits:
                raise PtxError(f"item {i} failed on {attempts[i]} actors; giving up") from None
            log.warning("actor died while processing item %d; resubmitting to a new actor", i)
            # a node that just died still looks alive to Ray for a few seconds (missed health checks): back off
            # so the new actor is not placed on it again and the item's budget is not spent there
            time.sleep(min(2.0 ** attempts[i], 8.0))
            pending.insert(0, i)
            actors.append(cls.options(name=f"{name}-{spawned}-{os.getpid()}-{token}", **opts).remote(*init_args))
            spawned += 1
    return results
