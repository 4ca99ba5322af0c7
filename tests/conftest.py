"""Shared fixtures: one model cache per test session, and tiny backbones loaded once and reused."""

import os
from pathlib import Path

import pytest

from ptx.backbones import Backbone, load_backbone


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
