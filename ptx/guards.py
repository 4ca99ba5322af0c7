"""Refusals before a cluster run starts: a placeholder left in a path, a local storage_path on several nodes.

The shipped cluster files and specs only carry placeholders nobody can own: `CHANGE-ME` (upper case, which no
S3 or GCS bucket name may contain) and the `.invalid` top-level domain (RFC 6761: never resolves). ptx refuses
a storage path or tracking URI that still holds one, so a forgotten edit fails at once instead of writing a
study into somebody else's bucket.
"""

import re
from urllib.parse import urlparse

from ptx.errors import PtxError

PLACEHOLDER = re.compile(r"CHANGE-ME|(?:^|[/.@])[\w-]*\.invalid(?=$|[/:])", re.IGNORECASE)
SHARED_SCHEMES = {"s3", "gs", "gcs", "hdfs", "abfs", "az"}  # pyarrow / fsspec stores every node reaches


def is_placeholder(value: str) -> bool:
    """True for a value still holding a shipped placeholder (CHANGE-ME, a .invalid host)."""
    return bool(PLACEHOLDER.search(value or ""))


def check_not_placeholder(value: str | None, field: str) -> None:
    """One-line refusal of a placeholder in `field` (e.g. storage_path)."""
    if value and is_placeholder(value):
        raise PtxError(f"{field} is the placeholder {value!r}: give your own, e.g. --set {field}=s3://<your-bucket>/...")


def is_shared_uri(storage: str) -> bool:
    """True for an object-store URI (s3://, gs://, ...) that every node reaches by itself."""
    return urlparse(storage).scheme.lower() in SHARED_SCHEMES


def check_storage(storage: str, nodes: int, joined: bool, shared_fs: bool) -> None:
    """Refuse a local storage_path where trials may run on more than one node (their checkpoints would die
    with the node that wrote them), unless the spec declares it a shared filesystem mounted everywhere."""
    check_not_placeholder(storage, "storage_path")
    if is_shared_uri(storage) or shared_fs or (nodes <= 1 and not joined):
        return
    where = f"{nodes} nodes" if nodes > 1 else "a cluster joined with --address (its autoscaler may add nodes)"
    raise PtxError(f"storage_path {storage!r} is a local directory on {where}: give a store every node shares, "
                   f"--set storage_path=s3://<bucket>/ptx/ray-results (or gs://), or, for a filesystem mounted at "
                   f"that path on every node (NFS, a ReadWriteMany volume), --set storage_shared=true")
