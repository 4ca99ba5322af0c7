"""Shared fixtures: one model cache per test session, tiny backbones loaded once and reused, a fixed split, and
real MLflow sqlite stores copied from one migrated empty db. (Plain helpers: support.py; the CLI: cli_runner.py.)"""

import os
import shutil
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, settings

from ptx.backbones import Backbone, load_backbone

# Hypothesis profiles: `ci`, the default (every run draws new examples: no example database, no derandomising; the
# counts each test names), and `thorough`, ten times as many, for a change to the spec loader or the artifact
# readers: HYPOTHESIS_PROFILE=thorough pytest tests/test_inputs.py. Tests scale their counts with support.examples().
# (Halving `ci` was measured: it saved about 2 s of CPU in all, so `ci` keeps the full counts.)
settings.register_profile("ci", max_examples=100, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", settings.get_profile("ci"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def ptx_cache_dir(tmp_path_factory) -> Path:
    """$PTX_CACHE_DIR for the whole session: the caller's when set (CI caches the SmolLM2 conversion there),
    else a session temp dir, so each tiny model is built once per session."""
    given = os.environ.get("PTX_CACHE_DIR")
    if given:
        yield Path(given)
        return
    path = tmp_path_factory.mktemp("ptx-cache")
    os.environ["PTX_CACHE_DIR"] = str(path)
    try:
        yield path
    finally:
        os.environ.pop("PTX_CACHE_DIR", None)


@pytest.fixture(scope="session")
def tiny(ptx_cache_dir):
    """tiny(name, insertion="prepend") -> a Backbone, loaded once per session (never mutate its model)."""
    loaded: dict[tuple[str, str], Backbone] = {}

    def get(name: str, insertion: str = "prepend") -> Backbone:
        if (name, insertion) not in loaded:
            loaded[name, insertion] = load_backbone(name, insertion=insertion)
        return loaded[name, insertion]

    return get


# ---- shared backbones (test helpers written once; the Ray fixtures live in their own block) -----------------
@pytest.fixture(scope="session")
def llama(tiny) -> Backbone:
    """tiny-llama, the session's one copy (never mutate its model)."""
    return tiny("tiny-llama")


FIXED = [("the movie was great", 2), ("a terrible film", 0), ("it was fine i guess", 1),
         ("bad acting and a bad plot", 0), ("good fun for the whole family", 2), ("nothing special", 1),
         ("the best film of the year", 2), ("boring", 0)]


@pytest.fixture(scope="session")
def fixed_split():
    """fixed_split(backbone) -> FIXED (8 labelled sentences, 3 classes) encoded like encode_split does with the
    template "{text} It was {mask}." for tweet_sentiment's labels; no task data involved."""

    def build(backbone: Backbone) -> datasets.Dataset:
        rows = []
        for text, label in FIXED:
            ids, score = backbone.encode(f"{text} it was", ".", 96)
            rows.append({"input_ids": ids, "score_index": score, "length": len(ids), "label": label})
        return datasets.Dataset.from_list(rows)

    return build


# ---- MLflow: a real sqlite store per test, copied from one migrated empty db ----------------------------------
@pytest.fixture
def no_env_uri(monkeypatch):
    """No MLFLOW_TRACKING_URI from the caller's environment: each test names its store (or the workdir's)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """A real, migrated, empty MLflow sqlite db, made once per session: a fresh db spends ~10 s in MLflow's
    migrations, a copy of this one none."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def new_workdir(empty_db):
    """new_workdir(path) -> path (made if missing) whose default store, sqlite:///<path>/mlflow.db, is a copy of the
    empty migrated db: what ptx would create there, without the migrations."""

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        shutil.copy(empty_db, path / "mlflow.db")
        return path

    return make


@pytest.fixture
def wd(tmp_path, new_workdir) -> Path:
    """A workdir of this test's own, with an empty MLflow store."""
    return new_workdir(tmp_path / "wd")


# ---- Ray: one shared local Ray for the session ----------------------------------------------------------------
# Starting a local Ray costs seconds of CPU (GCS, raylet, dashboard) and every new worker imports torch again, so
# the modules that only need "a local Ray started the way ptx starts it" share one, started on first use and
# stopped at the end of the session. A test that needs a Ray of its own (another shape, a cluster it kills, the
# CLI's own start-up) asks for `own_ray`, which stops the shared one first; the next `ray_local` starts it again.
_SHARED_RAY: dict = {"node": None}


def _shared_ray_running() -> bool:
    import ray

    # the node id, not the address: a Ray started later (by a CLI call in a test) may reuse the same port
    return ray.is_initialized() and ray.get_runtime_context().get_node_id() == _SHARED_RAY["node"]


@pytest.fixture(scope="session")
def ray_faults(tmp_path_factory) -> Path:
    """The directory the shared Ray's fault hook watches (sweep.FAIL_ONCE_ENV = "6:<dir>"): a trial raises once after
    its step-6 report while the directory exists, so a test arms the hook by creating it and disarms it by removing
    it. Not created here: unarmed, the hook does nothing."""
    return tmp_path_factory.mktemp("ray-faults") / "armed"


@pytest.fixture(scope="session")
def _ray_session_end():
    yield
    from ptx import sweep

    if _SHARED_RAY["node"] is not None:
        sweep.shutdown()


@pytest.fixture(scope="module")
def ray_local(ptx_cache_dir, ray_faults, _ray_session_end) -> Path:
    """The session's shared local Ray, started by `sweep.connect(num_cpus=2)` as the CLI starts one (the workers'
    setup hook, the runtime env), with the session's model cache and the fault hook (unarmed, see ray_faults) in
    its workers' environment. A Ray left running by someone else (a CLI call in an earlier test) is stopped first:
    its workers lack that environment. Yields ray_faults."""
    import ray

    from ptx import sweep

    if ray.is_initialized() and not _shared_ray_running():
        sweep.shutdown()
    if not ray.is_initialized():
        # sweep.connect copies these from os.environ into the workers' runtime env, once, at start-up
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PTX_CACHE_DIR", str(ptx_cache_dir))
            mp.setenv(sweep.FAIL_ONCE_ENV, f"6:{ray_faults}")
            sweep.connect(num_cpus=2)
        _SHARED_RAY["node"] = ray.get_runtime_context().get_node_id()
    yield ray_faults


@pytest.fixture(scope="module")
def own_ray():
    """For a test (or a module's fixture) that starts a Ray of its own (a cluster of another shape, one it kills,
    the CLI's start-up and dashboard): no Ray is connected when it starts. It stops its own; a later `ray_local`
    restarts the shared one."""
    from ptx import sweep

    sweep.shutdown()
    yield
