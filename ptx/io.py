"""Atomic writes of artifact directories and JSON, the user cache directory, and the config hash."""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def config_hash(obj) -> str:
    """A short stable hash of a JSON-able config (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


ASSET_MARKER = "ptx_asset.json"  # written last inside a model cache dir's temp dir: a dir holding it is complete


def cache_dir() -> Path:
    """The ptx cache: $PTX_CACHE_DIR, else ~/.cache/ptx (created on demand)."""
    path = Path(os.environ.get("PTX_CACHE_DIR") or Path.home() / ".cache" / "ptx").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_dir(path: Path, what: str) -> Path:
    """Create `path` (and parents) or raise one PtxError line naming `what`, the path and the reason."""
    from ptx.errors import PtxError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PtxError(f"{what} {path}: expected a directory, found an existing file") from None
    except OSError as exc:
        raise PtxError(f"{what} {path}: cannot create the directory ({exc.strerror or type(exc).__name__})") from None
    return path


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = True):
    """Yield a temp directory beside `final`; on success it replaces `final` in one rename."""
    final = Path(final).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    """Write `obj` as sorted, indented JSON through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def git_sha() -> str | None:
    """The git commit of the ptx checkout, when ptx runs from one ($PTX_GIT_SHA in images without git)."""
    if os.environ.get("PTX_GIT_SHA"):
        return os.environ["PTX_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
