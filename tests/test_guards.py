"""Guards before a cluster run: placeholders nobody can own are refused, a local storage_path only runs where
every trial sees the same disk. (The same refusals on a live two-node Ray: tests/test_packing.py.)"""

import pytest

from ptx.errors import PtxError
from ptx.guards import check_not_placeholder, check_storage, is_placeholder, is_shared_uri


@pytest.mark.parametrize("value", ["s3://CHANGE-ME-ptx-bucket/ptx/ray-results", "gs://change-me/x",
                                   "CHANGE-ME.invalid/ptx:0.1.0", "registry.invalid/ptx/ptx:0.1.0",
                                   "http://mlflow.invalid:5000"])
def test_placeholders_are_recognised(value):
    assert is_placeholder(value)
    with pytest.raises(PtxError, match="placeholder"):
        check_not_placeholder(value, "storage_path")


@pytest.mark.parametrize("value", ["s3://my-ptx-bucket/ptx", "gs://lab-results/paper", "/mnt/ptx-results",
                                   "ghcr.io/acme/ptx:0.1.0", "s3://invalidation-logs/x"])
def test_real_names_pass(value):
    assert not is_placeholder(value)
    check_not_placeholder(value, "storage_path")


def test_local_storage_is_refused_where_trials_may_run_on_other_nodes():
    check_storage("/tmp/ray_results", nodes=1, joined=False, shared_fs=False)  # a laptop: one disk
    check_storage("s3://my-bucket/r", nodes=4, joined=True, shared_fs=False)
    check_storage("/mnt/ptx-results", nodes=4, joined=True, shared_fs=True)  # declared NFS / RWX mount
    for nodes, joined in ((2, False), (1, True)):
        with pytest.raises(PtxError) as info:
            check_storage("/tmp/ray_results", nodes=nodes, joined=joined, shared_fs=False)
        message = str(info.value)
        assert "\n" not in message and "storage_path=s3://" in message and "storage_shared=true" in message
    with pytest.raises(PtxError, match="placeholder"):
        check_storage("s3://CHANGE-ME-ptx-bucket/r", nodes=4, joined=True, shared_fs=False)
    assert is_shared_uri("gs://b/x") and not is_shared_uri("file:///tmp/x") and not is_shared_uri("/tmp/x")


def test_mlflow_server_refuses_a_placeholder_store(tmp_path):
    from click.testing import CliRunner

    from ptx.cli import cli

    for args in (["--artifacts-destination", "s3://CHANGE-ME-ptx-bucket/ptx/mlflow-artifacts"],
                 ["--backend-store-uri", "postgresql+psycopg2://mlflow@db.invalid:5432/mlflow"]):
        result = CliRunner().invoke(cli, ["mlflow-server", "--workdir", str(tmp_path), *args])
        assert isinstance(result.exception, PtxError) and "placeholder" in str(result.exception), result.output
