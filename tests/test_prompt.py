"""The prompt artifact: round trip, a frozen format-v1 fixture, strict loading, atomic writes; init modes."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptx.errors import PtxError
from ptx.io import atomic_dir
from ptx.prompt import FORMAT_VERSION, SoftPrompt, backbone_meta, init_prompt, load_prompt, save_prompt

FIXTURES = Path(__file__).parent / "fixtures"
# sha256 of the fixture tensor's float32 bytes, recorded when tests/fixtures/prompt_v1 was written (never rewrite it)
FIXTURE_V1_SHA256 = "398df37799cab8b71a458a3c61e7ec89b8a74b7162b54456c5f519ddc97e8e5c"


def _meta(backbone, **changes):
    meta = {"config_hash": "abc", "mlflow_run_id": None, "backbone": backbone_meta(backbone),
            "task": {"name": "tweet_sentiment", "version": 1}, "verbalizer": ["negative", "neutral", "positive"],
            "insertion": "prepend", "init": {"mode": "random", "source": None}, "seed": 0, "best_step": 3,
            "dev_metric": {"name": "accuracy", "value": 0.5}}
    meta.update(changes)
    return meta


@pytest.fixture
def artifact(tiny, tmp_path):
    backbone = tiny("tiny-bert")
    prompt = init_prompt(backbone, 6, "random", seed=0)
    return save_prompt(tmp_path / "p", prompt, _meta(backbone)), prompt


def test_round_trip(tiny, artifact):
    path, prompt = artifact
    assert sorted(p.name for p in path.iterdir()) == ["prompt.json", "prompt.safetensors"]
    loaded = load_prompt(path, backbone=tiny("tiny-bert"))
    assert torch.equal(loaded.prompt, prompt) and loaded.prompt.dtype == torch.float32
    assert loaded.path == path
    text = (path / "prompt.json").read_text()
    meta = json.loads(text)
    assert list(meta) == sorted(meta)  # sorted keys
    assert meta["format_version"] == FORMAT_VERSION == 1 and meta["n_tokens"] == 6
    assert meta["backbone"] == {"name": "tiny-bert", "revision": tiny("tiny-bert").revision, "kind": "masked_lm",
                               "d_model": 32}
    assert set(load_file(str(path / "prompt.safetensors"))) == {"prompt"}
    assert loaded.meta == meta


def test_frozen_v1_fixture_loads_with_the_current_code(tiny):
    """tests/fixtures/prompt_v1 was written once by format v1; today's loader must still read it unchanged."""
    loaded = load_prompt(FIXTURES / "prompt_v1", backbone=tiny("tiny-bert"))
    assert hashlib.sha256(loaded.prompt.numpy().tobytes()).hexdigest() == FIXTURE_V1_SHA256
    assert loaded.prompt.shape == (4, 32)
    assert loaded.meta["format_version"] == 1 and loaded.meta["backbone"]["name"] == "tiny-bert"
    assert loaded.meta["task"] == {"name": "tweet_sentiment", "version": 1}
    # and it still scores on the backbone it names
    from ptx.data import collate
    backbone = tiny("tiny-bert")
    ids, score = backbone.encode("good movie . it was", ".", 32)
    logits = backbone.label_logits(loaded.prompt, collate([{"input_ids": ids, "score_index": score}], 0),
                                   backbone.label_ids(loaded.meta["verbalizer"]))
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def _edit_json(path, **changes):
    meta = json.loads((path / "prompt.json").read_text())
    meta.update(changes)
    (path / "prompt.json").write_text(json.dumps(meta))


def test_unknown_format_version(artifact):
    path, _ = artifact
    _edit_json(path, format_version=2)
    with pytest.raises(PtxError, match=r"format_version 2 is not supported \(this ptx reads 1\)"):
        load_prompt(path)
    _edit_json(path, format_version=None)
    with pytest.raises(PtxError, match="format_version None"):
        load_prompt(path)


def test_wrong_width_names_both_sides(tiny, artifact):
    path, _ = artifact
    with pytest.raises(PtxError) as err:
        load_prompt(path, backbone=tiny("tiny-llama"))
    msg = str(err.value)
    assert "width 32" in msg and "'tiny-bert'" in msg and "'tiny-llama'" in msg and "width 64" in msg
    assert "\n" not in msg


def test_wrong_backbone_name_with_the_same_width(tiny, artifact):
    path, _ = artifact
    assert tiny("tiny-t5").d_model == 32
    with pytest.raises(PtxError, match="trained on backbone 'tiny-bert', not 'tiny-t5'"):
        load_prompt(path, backbone=tiny("tiny-t5"))


def test_tensor_width_must_match_its_own_metadata(artifact):
    path, _ = artifact
    save_file({"prompt": torch.zeros(6, 48)}, str(path / "prompt.safetensors"))
    with pytest.raises(PtxError, match=r"prompt shape \[6, 48\] does not match prompt.json d_model 32"):
        load_prompt(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(artifact, damage):
    path, _ = artifact
    weights = path / "prompt.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) - 40], "garbage": b"\x00\x01not safetensors" * 9,
                         "empty": b""}[damage])
    with pytest.raises(PtxError, match="corrupt or truncated safetensors"):
        load_prompt(path)


def test_extra_or_renamed_tensors(artifact):
    path, prompt = artifact
    save_file({"prompt": prompt, "other": prompt.clone()}, str(path / "prompt.safetensors"))
    with pytest.raises(PtxError, match=r"expected one tensor 'prompt', found \['other', 'prompt'\]"):
        load_prompt(path)


def test_corrupt_json(artifact):
    path, _ = artifact
    (path / "prompt.json").write_text("{not json")
    with pytest.raises(PtxError, match="corrupt JSON"):
        load_prompt(path)
    (path / "prompt.json").write_text("[1, 2]")
    with pytest.raises(PtxError, match="expected a JSON object"):
        load_prompt(path)


@pytest.mark.parametrize("missing", ["prompt.json", "prompt.safetensors", "."])
def test_missing_files(artifact, missing):
    path, _ = artifact
    if missing == ".":
        shutil.rmtree(path)
    else:
        (path / missing).unlink()
    with pytest.raises(PtxError, match=f"{path} is not a prompt artifact: prompt.(json|safetensors) is missing"):
        load_prompt(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(artifact, bad):
    path, prompt = artifact
    broken = prompt.clone()
    broken[2, 5] = bad
    save_file({"prompt": broken}, str(path / "prompt.safetensors"))
    with pytest.raises(PtxError, match="NaN or inf"):
        load_prompt(path)


def test_save_rejects_a_wrong_rank(tiny, tmp_path):
    with pytest.raises(PtxError, match=r"\[n_tokens, d_model\]; got shape \[2, 3, 32\]"):
        save_prompt(tmp_path / "p", torch.zeros(2, 3, 32), _meta(tiny("tiny-bert")))
    assert not list(tmp_path.iterdir())


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(final) as tmp:
        (tmp / "half.json").write_text("{}")
        raise RuntimeError("boom")
    assert not final.exists() and list(tmp_path.iterdir()) == []  # no final dir, no temp dir


def test_failed_overwrite_keeps_the_old_artifact(tiny, artifact):
    path, prompt = artifact
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(path) as tmp:
        save_file({"prompt": torch.zeros(1, 32)}, str(tmp / "prompt.safetensors"))
        raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["p"]
    save_prompt(path, prompt * 2, _meta(tiny("tiny-bert")))  # a successful overwrite replaces it whole
    assert torch.equal(load_prompt(path).prompt, prompt * 2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["p"]


# ---- init modes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("mode", ["random", "vocab"])
def test_sampled_inits_are_shaped_and_seeded(tiny, name, mode):
    backbone = tiny(name)
    a = init_prompt(backbone, 7, mode, seed=1)
    assert a.shape == (7, backbone.d_model) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, init_prompt(backbone, 7, mode, seed=1))
    assert not torch.equal(a, init_prompt(backbone, 7, mode, seed=2))
    emb = backbone.input_embeddings()
    if mode == "vocab":  # every row is some token's embedding
        assert all((emb == row).all(-1).any() for row in a)
    else:  # Gaussian at the embeddings' scale
        assert 0.5 < a.std() / emb.std() < 2


def test_text_init_cycles_the_text_tokens(tiny):
    backbone = tiny("tiny-llama")
    p = init_prompt(backbone, 5, "text", text="good movie")
    ids = backbone.tokenizer("good movie", add_special_tokens=False).input_ids
    emb = backbone.input_embeddings()
    assert torch.equal(p, emb[[ids[0], ids[1], ids[0], ids[1], ids[0]]])
    with pytest.raises(PtxError, match="init mode 'text' needs --init-text"):
        init_prompt(backbone, 5, "text")
    with pytest.raises(PtxError, match="unknown init mode 'vocabulary'"):
        init_prompt(backbone, 5, "vocabulary")


def test_artifact_init(tiny, artifact):
    path, prompt = artifact
    got = init_prompt(tiny("tiny-bert"), 6, "artifact", artifact=path)
    assert torch.equal(got, prompt)
    got[0, 0] = 99.0  # a copy: the caller may train it without touching the loaded tensor
    assert torch.equal(init_prompt(tiny("tiny-bert"), 6, "artifact", artifact=path), prompt)
    with pytest.raises(PtxError, match=f"init prompt {path} has 6 tokens; this run wants 5"):
        init_prompt(tiny("tiny-bert"), 5, "artifact", artifact=path)
    with pytest.raises(PtxError, match="prompt width 32 .* backbone 'tiny-llama' width 64"):
        init_prompt(tiny("tiny-llama"), 6, "artifact", artifact=path)
    with pytest.raises(PtxError, match="needs the path of a prompt artifact"):
        init_prompt(tiny("tiny-bert"), 6, "artifact")


def test_soft_prompt_holds_the_only_parameter():
    init = torch.randn(3, 4)
    soft = SoftPrompt(init)
    assert [n for n, _ in soft.named_parameters()] == ["weight"] and soft.weight.requires_grad
    assert torch.equal(soft(), init) and soft.weight.data_ptr() != init.data_ptr()
