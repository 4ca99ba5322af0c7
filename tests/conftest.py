"""Shared fixtures: one model cache per test session, tiny backbones loaded once and reused, a fixed split."""

import os
from pathlib import Path

import datasets
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
