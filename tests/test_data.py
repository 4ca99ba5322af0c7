"""Encoding keeps the template tail under max_length; the Arrow cache is reused and keyed; batching is exact."""

import dataclasses
import random

import pytest
import torch

import ptx.tasks
from ptx.data import bucketed_order, cache_path, collate, encode_split, iterate_batches
from ptx.errors import PtxError
from ptx.tasks import load_task

LONG = " ".join(f"word{i % 7} good" for i in range(400)).replace("word", "w")  # far longer than any max_length
NAMES = ["tiny-bert", "tiny-roberta", "tiny-t5", "tiny-llama"]


def tokens(backbone, ids):
    return [t.lstrip("Ġ▁") for t in backbone.tokenizer.convert_ids_to_tokens(ids)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("max_length", [8, 9, 12, 32, 96])
def test_truncation_keeps_the_template_tail_within_max_length(tiny, name, max_length):
    backbone = tiny(name)
    ids, score = backbone.encode(f"first {LONG} it was", ". and a long text after the mask " * 20, max_length)
    assert len(ids) == max_length  # filled to the limit, never past it
    toks = tokens(backbone, ids)
    if name == "tiny-llama":  # causal: "it was" is the very end, the label word comes next
        assert toks[-2:] == ["it", "was"] and score == len(ids) - 1
    elif name == "tiny-t5":  # seq2seq: the encoder text still holds "it was" before the text after the mask
        assert "was" in toks and toks[toks.index("was") - 1] == "it" and score == 0
    else:  # masked LM: "it was <mask>"
        assert ids[score] == backbone.tokenizer.mask_token_id and toks[score - 2:score] == ["it", "was"]
    if max_length >= 32:  # room enough to keep the start of the text too: the middle is what was cut
        assert "first" in toks


@pytest.mark.parametrize("name", NAMES)
def test_short_texts_are_not_truncated(tiny, name):
    backbone = tiny(name)
    ids, score = backbone.encode("the movie was great . it was", "!", 96)
    mask = backbone.tokenizer.mask_token
    whole = {"tiny-llama": "the movie was great . it was", "tiny-t5": "the movie was great . it was !"}.get(
        name, f"the movie was great . it was {mask} !")
    assert ids == backbone.tokenizer(whole).input_ids  # exactly the tokenizer's own encoding with its specials
    with pytest.raises(PtxError, match="max_length 1 leaves no room"):
        backbone.encode("the movie", ".", 1)


def _spec(**changes):
    return dataclasses.replace(load_task("tweet_sentiment"), **changes)


def test_encoded_split_is_cached_and_keyed(tiny, tmp_path, monkeypatch):
    backbone = tiny("tiny-bert")  # loaded before the cache dir moves: the model itself stays where it was
    monkeypatch.setenv("PTX_CACHE_DIR", str(tmp_path))
    spec = _spec()
    first = encode_split(spec, backbone, "dev", limit=20)
    entries = sorted(p.name for p in cache_path().iterdir())
    assert len(entries) == 1 and entries[0].startswith("tweet_sentiment-v1-dev-")
    assert first.cache_files[0]["filename"].startswith(str(cache_path() / entries[0]))

    def no_reload(*args, **kwargs):
        raise AssertionError("load_split called: the cached encoding was not reused")

    monkeypatch.setattr(ptx.tasks, "load_split", no_reload)  # a spy, not a stand-in: it must never run
    second = encode_split(spec, backbone, "dev", limit=20)
    assert second.to_list() == first.to_list()
    assert second.cache_files[0]["filename"].startswith(str(cache_path() / entries[0]))
    monkeypatch.undo()
    monkeypatch.setenv("PTX_CACHE_DIR", str(tmp_path))

    short = encode_split(_spec(max_length=12), backbone, "dev", limit=20)  # different max_length: new entry
    assert len(list(cache_path().iterdir())) == 2
    assert max(short["length"]) <= 12 < max(first["length"])
    encode_split(_spec(template="Review: {text} It was {mask}."), backbone, "dev", limit=20)  # edited template
    encode_split(spec, backbone, "dev", limit=10)  # different size
    encode_split(spec, tiny("tiny-llama"), "dev", limit=20)  # different tokenizer
    assert len(list(cache_path().iterdir())) == 5
    assert not list(cache_path().glob("*.tmp-*"))  # temp dirs renamed into place


def test_encoded_split_columns(tiny):
    backbone = tiny("tiny-roberta")
    enc = encode_split(_spec(), backbone, "train", limit=16)
    assert set(enc.column_names) == {"input_ids", "score_index", "length", "label"}
    for row in enc:
        assert row["length"] == len(row["input_ids"]) <= 96
        assert row["input_ids"][row["score_index"]] == backbone.tokenizer.mask_token_id
        assert row["label"] in (0, 1, 2)


def test_multi_token_verbalizer_fails_before_tokenizing(tiny):
    with pytest.raises(PtxError, match="verbalizer word 'very-good' is not one known token of backbone 'tiny-bert'"):
        encode_split(_spec(verbalizer=("bad", "very-good", "good")), tiny("tiny-bert"), "dev", limit=4)


def test_collate_pads_right():
    rows = [{"input_ids": [5, 6, 7], "score_index": 2, "label": 1},
            {"input_ids": [8], "score_index": 0, "label": 0},
            {"input_ids": [9, 10], "score_index": 1, "label": 2}]
    batch = collate(rows, pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3], [9, 10, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["score_index"].tolist() == [2, 0, 1] and batch["labels"].tolist() == [1, 0, 2]
    gen = collate([{"input_ids": [1], "score_index": 0, "target_ids": [4, 5]},
                   {"input_ids": [1, 2], "score_index": 0, "target_ids": [6]}], pad_id=0)
    assert gen["target_ids"].tolist() == [[4, 5], [6, 0]] and "labels" not in gen


@pytest.mark.parametrize("n", [0, 1, 7, 64, 1000])
@pytest.mark.parametrize("batch_size", [1, 8, 13])
@pytest.mark.parametrize("seed", [None, 0, 1])
def test_bucketed_order_covers_every_index_once(n, batch_size, seed):
    lengths = [(i * 37) % 101 for i in range(n)]
    batches = bucketed_order(lengths, batch_size, random.Random(seed) if seed is not None else None)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)
    chunks = [min(batch_size * 32, n - s) for s in range(0, n, batch_size * 32)]
    assert len(batches) == sum(-(-c // batch_size) for c in chunks)  # at most one short batch per sorted chunk
    if seed is None and n:  # evaluation order is fixed and length-sorted within chunks
        assert batches == bucketed_order(lengths, batch_size, None)
        assert [lengths[i] for i in batches[0]] == sorted(lengths[i] for i in batches[0])


def test_training_order_depends_on_the_seed_only():
    lengths = list(range(100))
    a = bucketed_order(lengths, 8, random.Random(3))
    assert a == bucketed_order(lengths, 8, random.Random(3))
    assert a != bucketed_order(lengths, 8, random.Random(4))


def test_iterate_batches_skip_resumes_the_same_stream(tiny):
    enc = encode_split(_spec(), tiny("tiny-bert"), "train", limit=20)
    full = iterate_batches(enc, 4, pad_id=0, seed=5, epochs=None)
    stream = [next(full) for _ in range(13)]  # more than two epochs of 5 batches
    resumed = iterate_batches(enc, 4, pad_id=0, seed=5, epochs=None, skip=7)
    for want in stream[7:]:
        got = next(resumed)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    one_epoch = list(iterate_batches(enc, 4, pad_id=0, seed=None))
    assert sum(len(b["labels"]) for b in one_epoch) == 20
    assert list(iterate_batches(enc.select([]), 4, pad_id=0, seed=0, epochs=None)) == []  # no endless loop
