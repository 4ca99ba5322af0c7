"""Task examples x backbone tokenizer -> tokenized, Arrow-cached splits; length-bucketed batches."""

import dataclasses
import hashlib
import json
import logging
import random
from pathlib import Path

import datasets
import torch

from ptx.backbones import Backbone
from ptx.io import cache_dir

log = logging.getLogger(__name__)
ENCODING_VERSION = 3  # bump when encode() changes what it writes


def _fingerprint(spec, backbone: Backbone, split: str, limit: int | None) -> str:
    """Cache key: the whole task spec, tokenizer identity, insertion, split and size."""
    from ptx.tasks.sources import data_origin

    tok = backbone.tokenizer
    # the whole spec, not just name+version: an edited template or a temp task file must not hit a stale entry;
    # and where the rows come from: a PTX_DATA_<TASK> or PTX_HF_MIRROR copy must not hit the source's entry
    task = json.dumps([dataclasses.asdict(spec), data_origin(spec)], sort_keys=True, default=str)
    key = json.dumps([ENCODING_VERSION, task, spec.max_length, backbone.name, backbone.revision,
                      backbone.kind.value, backbone.insertion.value, type(tok).__name__, len(tok),
                      tok.name_or_path, split, limit], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def encode_split(spec, backbone: Backbone, split: str, limit: int | None = None,
                 use_cache: bool = True) -> datasets.Dataset:
    """Tokenize one split of a task for one backbone; columns input_ids, score_index, length, label|target_ids."""
    from ptx.tasks import load_split

    path = cache_dir() / "encoded" / f"{spec.name}-v{spec.version}-{split}-{_fingerprint(spec, backbone, split, limit)}"
    if use_cache and path.exists():
        return datasets.load_from_disk(str(path))
    datasets.disable_progress_bars()
    raw = load_split(spec, split, limit=limit)
    generation = spec.kind == "generation"
    if not generation:
        backbone.label_ids(spec.label_words(backbone.kind))  # fail early, before tokenizing, on a multi-token label word

    def encode(example):
        before, after = spec.render(example)
        ids, score = backbone.encode(before, after, spec.max_length)
        row = {"input_ids": ids, "score_index": score, "length": len(ids)}
        if generation:
            # the training target, cut to the task's generation budget; scoring reads the full references
            target = backbone.tokenizer(example["target"], truncation=True, max_length=spec.max_new_tokens)["input_ids"]
            row["target_ids"] = list(target)
            row["references"] = [str(r) for r in (example.get("references") or [example["target"]])]
        else:
            row["label"] = int(example["label"])
        return row

    keep = ["label"] if not generation else ["references"]
    encoded = raw.map(encode, remove_columns=[c for c in raw.column_names if c not in keep])
    if use_cache:
        tmp = path.with_name(path.name + f".tmp-{random.getrandbits(32):08x}")
        encoded.save_to_disk(str(tmp))
        try:
            tmp.rename(path)
        except OSError:  # another process on this node wrote it first: theirs is identical
            pass
        encoded = datasets.load_from_disk(str(path)) if path.exists() else encoded
    return encoded


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-pad a list of encoded rows to the batch's longest: input_ids/attention_mask [B, T]."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        attn[i, : len(r["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": attn,
             "score_index": torch.tensor([r["score_index"] for r in rows], dtype=torch.long)}
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    if "target_ids" in rows[0]:
        tw = max(len(r["target_ids"]) for r in rows)
        tgt = torch.full((len(rows), tw), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tgt[i, : len(r["target_ids"])] = torch.tensor(r["target_ids"])
        batch["target_ids"] = tgt
    if "references" in rows[0]:  # every acceptable answer, untruncated: what generation metrics score against
        batch["references"] = [list(r["references"]) for r in rows]
    return batch


def bucketed_order(lengths: list[int], batch_size: int, rng: random.Random | None) -> list[list[int]]:
    """Index batches of similar length (less padding); batch order shuffled when `rng` is given."""
    idx = list(range(len(lengths)))
    if rng is not None:
        rng.shuffle(idx)
    chunk = batch_size * 32  # sort inside large chunks so epochs still differ
    out = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s: s + chunk], key=lambda i: lengths[i])
        out += [part[j: j + batch_size] for j in range(0, len(part), batch_size)]
    if rng is not None:
        rng.shuffle(out)
    return out


def iterate_batches(encoded: datasets.Dataset, batch_size: int, pad_id: int, seed: int | None = None,
                    epochs: int | None = 1, skip: int = 0):
    """Yield collated batches; `seed` shuffles (training), None keeps a fixed order (evaluation).

    `skip` drops that many batches first without collating them: a resumed run sees exactly the batches an
    uninterrupted run would have seen from there on.
    """
    rows = encoded.to_list()
    if not rows:  # with epochs=None an empty split would loop forever without yielding
        return
    lengths = [r["length"] for r in rows]
    rng = random.Random(seed) if seed is not None else None
    epoch = 0
    while epochs is None or epoch < epochs:
        for group in bucketed_order(lengths, batch_size, rng):
            if skip > 0:
                skip -= 1
                continue
            yield collate([rows[i] for i in group], pad_id)
        epoch += 1


def cache_path() -> Path:
    """Where tokenized splits are cached (shared by every trial on a node)."""
    return cache_dir() / "encoded"


def describe_split(spec, split: str, encoded: datasets.Dataset) -> dict:
    """Lineage of an encoded split: {name: TASK/SPLIT, digest, rows, source, source_type, task, split}.

    The digest covers the encoded columns (token ids, scoring positions, labels), so it changes with the data, the
    template, the tokenizer, the length cap and the row limit, and not with where the split was cached.
    """
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc

    table = getattr(encoded.data, "table", encoded.data)
    h = hashlib.sha256()
    for name in sorted(table.column_names):
        col = table.column(name)
        h.update(name.encode())
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            h.update(pc.list_value_length(col).to_numpy().astype("int64").tobytes())
            col = pc.list_flatten(col)
        h.update(col.to_numpy().astype("int64").tobytes())
    src = spec.source
    if src.kind == "hf":
        source = f"hf://{src.path}" + (f"/{src.name}" if src.name else "") + (f"@{src.revision}" if src.revision else "")
    elif src.kind == "package":
        source = f"package://{src.package}/{src.file or ''}"
    else:
        files = dict(src.files)
        source = files.get(getattr(spec.splits, split, None) or "") or ", ".join(sorted(files.values()))
    return {"name": f"{spec.name}/{split}", "digest": h.hexdigest()[:16], "rows": len(encoded), "source": source,
            "source_type": src.kind, "task": spec.name, "split": split}
