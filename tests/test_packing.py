"""Trials per GPU, computed from what the cluster files declare, against what the specs and READMEs promise.

Every paper spec x every GPU node type of cluster/aws.yaml, cluster/gcp.yaml and the KubeRay manifests: the node's
Ray resources (launcher `resources`; KubeRay: the container's cpu / nvidia.com/gpu limits, rayStartParams
overrides and the group's custom `resources`) and the spec's per-trial request give the trials that run at once.
That number must equal the spec's own comment and both tables of cluster/README.md ("Sizes and costs").
"""

import re
from pathlib import Path

import pytest
import yaml

from ptx.config import load_study
from ptx.errors import PtxError
from ptx.packing import packing, ray_request, trials_per_node

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SPECS = sorted((ROOT / "experiments").glob("paper_*.yaml"))
STAGE_BLOCKS = ("resources", "transfer.resources", "indicators.resources")


def _quantity(value) -> float:
    """A Kubernetes quantity for cpu or a count: "6", 6, "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def launcher_node_types() -> dict[str, dict]:
    """'aws.yaml gpu_1x' -> the Ray resources that node type declares (GPU types only)."""
    out = {}
    for path in (CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"):
        config = yaml.safe_load(path.read_text())
        for name, node_type in config["available_node_types"].items():
            res = {k: float(v) for k, v in node_type.get("resources", {}).items()}
            if res.get("GPU", 0) >= 1:
                out[f"{path.name} {name}"] = res
    return out


def kuberay_node_types() -> dict[str, dict]:
    """'raycluster.yaml gpu-1x' -> the Ray resources a worker pod of that group offers."""
    out = {}
    for path in sorted((CLUSTER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in {"RayCluster", "RayJob"}:
                continue
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            for group in spec.get("workerGroupSpecs") or []:
                container = group["template"]["spec"]["containers"][0]
                limits = (container.get("resources") or {}).get("limits") or {}
                params = group.get("rayStartParams") or {}
                res = {"CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
                       "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
                res.update({k: _quantity(v) for k, v in (group.get("resources") or {}).items()})
                if res["GPU"] >= 1:
                    out[f"{path.name} {group['groupName']}"] = res
    return out


NODE_TYPES = {**launcher_node_types(), **kuberay_node_types()}


def _block(spec, dotted: str) -> dict:
    obj = spec
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return {"cpu": obj.cpu, "gpu": obj.gpu, "custom": dict(obj.custom)}


def spec_claims(path: Path) -> dict[str, int]:
    """The trials per GPU each `resources:` line of a spec promises in its comment."""
    claims, section = {}, None
    for line in path.read_text().splitlines():
        top = re.match(r"^(\w+):", line)
        if top:
            section = top.group(1)
        m = re.match(r"^(\s*)resources:.*#\s*(\d+) (?:trials )?per GPU", line)
        if m:
            claims["resources" if not m.group(1) else f"{section}.resources"] = int(m.group(2))
    return claims


def readme_tables() -> tuple[list[dict], list[dict]]:
    """The two packing tables of cluster/README.md, as rows of {header: cell}."""
    text = (CLUSTER / "README.md").read_text()
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    rows = [[dict(zip(t[0], r, strict=False)) for r in t[2:]] for t in tables]
    by_spec = next(r for r in rows if r and "trials per GPU" in r[0])
    by_node = next(r for r in rows if r and "node type" in r[0])
    return by_spec, by_node


def test_the_files_declare_gpu_node_types():
    assert len(NODE_TYPES) >= 6, sorted(NODE_TYPES)
    assert {r["GPU"] for r in NODE_TYPES.values()} == {1.0, 8.0}
    assert len(SPECS) == 3


def test_packing_arithmetic():
    assert ray_request({"cpu": 1, "gpu": 0.25}) == {"CPU": 1.0, "GPU": 0.25}
    assert trials_per_node({"CPU": 1, "GPU": 0.25}, {"CPU": 4, "GPU": 1}) == (4, "GPU")
    # the old paper request on the clusters' single-GPU nodes: CPU, not the GPU, was the limit
    assert packing({"cpu": 4, "gpu": 0.25}, {"CPU": 4, "GPU": 1})["trials"] == 1
    assert packing({"cpu": 4, "gpu": 0.25}, {"CPU": 8, "GPU": 1})["per_gpu"] == 2
    assert packing({"cpu": 4, "gpu": 0.25}, {"CPU": 6, "GPU": 1}) == {"trials": 1, "per_gpu": 1.0, "limit": "CPU"}
    # a fraction never spans two GPUs: 0.3 packs 3 per GPU, 24 on 8 GPUs (not 26)
    assert trials_per_node({"GPU": 0.3}, {"GPU": 8}) == (24, "GPU")
    assert trials_per_node({"CPU": 1, "gpu_1x": 0.25}, {"CPU": 96, "GPU": 8, "gpu_8x": 8}) == (0, "gpu_1x")
    assert packing({"cpu": 1}, {"CPU": 4})["per_gpu"] is None


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
@pytest.mark.parametrize("node", sorted(NODE_TYPES))
def test_spec_packs_as_promised_on_every_gpu_node_type(spec_path, node):
    spec, claims = load_study(spec_path), spec_claims(spec_path)
    assert set(claims) == set(STAGE_BLOCKS), f"{spec_path.name}: a resources line without its per-GPU comment"
    for block in STAGE_BLOCKS:
        got = packing(_block(spec, block), NODE_TYPES[node])
        assert got["per_gpu"] == claims[block], f"{spec_path.name} {block} on {node}: {got}"
        assert got["limit"] == "GPU", f"{spec_path.name} {block} on {node}: bounded by {got['limit']}"


def test_readme_tables_match_the_computed_packing():
    by_spec, by_node = readme_tables()
    backbone_spec = {}
    for row in by_spec:
        path = ROOT / "experiments" / row["spec"].strip("`")
        spec = load_study(path)
        backbone_spec[row["backbone"]] = spec
        res = _block(spec, "resources")
        assert row["`resources` per trial"] == f"`{{cpu: {res['cpu']:g}, gpu: {res['gpu']:g}}}`", row
        assert int(row["trials per GPU"]) == spec_claims(path)["resources"], row
    assert set(backbone_spec) == {load_study(p).backbones[0] for p in SPECS}
    assert len(by_node) == 6
    for row in by_node:
        where, group = re.match(r"`([\w.]+)` ([\w-]+)", row["node type"]).groups()
        matches = {k: v for k, v in NODE_TYPES.items() if k.split()[1] == group
                   and (k.split()[0] == where or where == "k8s" and not k.endswith((".yaml gpu_1x", ".yaml gpu_8x")))}
        assert matches, row["node type"]
        for node in matches.values():
            assert (int(row["GPUs"]), int(row["CPUs offered to Ray"])) == (node["GPU"], node["CPU"]), row
            for backbone, spec in backbone_spec.items():
                assert int(row[backbone]) == packing(_block(spec, "resources"), node)["trials"], (row, backbone)


@pytest.mark.ray
def test_dry_run_prints_the_live_packing_and_a_local_storage_path_is_refused(tmp_path):
    """A real local Ray cluster of two nodes with logical GPUs, shaped like aws.yaml's and gcp.yaml's gpu_1x
    (4 and 8 CPUs): `ptx run --dry-run --address` reads the alive nodes and prints what each runs at once."""
    from click.testing import CliRunner
    from ray.cluster_utils import Cluster

    from ptx import sweep
    from ptx.cli import cli

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 4, "num_gpus": 1, "resources": {"gpu_1x": 1}})
    try:
        cluster.add_node(num_cpus=8, num_gpus=1, resources={"gpu_1x": 1})
        cluster.wait_for_nodes()
        outputs = []
        for extra in ([], ["--set", "resources.cpu=4"]):  # the paper specs' old request
            args = ["run", str(ROOT / "experiments" / "paper_roberta_base.yaml"), "--dry-run",
                    "--address", cluster.address, *extra]
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, result.output
            outputs.append(result.output)
        # the guards, on the same live cluster: nothing starts, one line names the fix
        refusals = []
        for extra in ([], ["--set", "storage_path=s3://CHANGE-ME-ptx-bucket/ptx/ray-results"]):
            args = ["run", str(ROOT / "experiments" / "paper_roberta_base.yaml"), "--stage", "train",
                    "--address", cluster.address, "--workdir", str(tmp_path),
                    "--offline-ok", *extra]  # the paper tasks' Hub data is out of reach here
            result = CliRunner().invoke(cli, args)
            sweep.shutdown()  # `ptx run` stays connected after an error (the CLI process would exit)
            assert isinstance(result.exception, PtxError), result.output
            refusals.append(str(result.exception))
    finally:
        sweep.shutdown()
        cluster.shutdown()
    assert refusals[0].startswith(f"storage_path '{tmp_path / 'ray_results'}' is a local directory on 2 nodes")
    assert "--set storage_path=s3://" in refusals[0] and "--set storage_shared=true" in refusals[0]
    assert refusals[1].startswith("storage_path is the placeholder 's3://CHANGE-ME-ptx-bucket/ptx/ray-results'")
    assert all("\n" not in r for r in refusals)

    def trial_lines(out: str) -> list[tuple[str, int, str]]:
        found = re.findall(r"^ {4}trial .*\((CPU [^)]*)\): (\d+) at once.*\(bounded by (\w+)\)$", out, re.M)
        return sorted((offer, int(n), limit) for offer, n, limit in found)

    assert trial_lines(outputs[0]) == [("CPU 4, GPU 1, gpu_1x 1", 4, "GPU"),
                                       ("CPU 8, GPU 1, gpu_1x 1", 4, "GPU")]
    assert "trials at once on the whole cluster: 8" in outputs[0]
    assert "2 node(s) alive" in outputs[0]
    assert trial_lines(outputs[1]) == [("CPU 4, GPU 1, gpu_1x 1", 1, "CPU"),
                                       ("CPU 8, GPU 1, gpu_1x 1", 2, "CPU")]
    assert "trials at once on the whole cluster: 3" in outputs[1]
