"""Trials per GPU, computed from what the cluster files declare, against what the specs and READMEs promise.

Every paper spec x every GPU node type of cluster/aws.yaml, cluster/gcp.yaml and the KubeRay manifests: the node's
Ray resources (launcher `resources`; KubeRay: the container's cpu / nvidia.com/gpu limits, rayStartParams
overrides and the group's custom `resources`) and the spec's per-trial request give the trials that run at once.
That number must equal the spec's own comment and both tables of cluster/README.md ("Sizes and costs").

Memory: every GPU node type declares one GPU's memory (the label ptx/gpu-memory-mib); every paper spec loaded for
every node type (its memory and GPU count) either plans trials that fit their share, or is refused at load with one
line naming the trial's predicted memory, the GPU's memory and the fix; the spec lists the node types it fits.
"""

import re
from pathlib import Path

import pytest
import yaml

from ptx.config import load_study
from ptx.errors import PtxError
from ptx.packing import choose_group_size, gpu_slots, packing, ray_request, trial_count, trials_per_node

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SPECS = sorted((ROOT / "experiments").glob("paper_*.yaml"))
STAGE_BLOCKS = ("resources", "transfer.resources", "indicators.resources")
MEMORY_LABEL = "ptx/gpu-memory-mib"


def _quantity(value) -> float:
    """A Kubernetes quantity for cpu or a count: "6", 6, "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def launcher_node_types(memory: bool = False) -> dict[str, dict]:
    """'aws.yaml gpu_1x' -> the Ray resources that node type declares (GPU types only); memory: its labels."""
    out = {}
    for path in (CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"):
        config = yaml.safe_load(path.read_text())
        for name, node_type in config["available_node_types"].items():
            res = {k: float(v) for k, v in node_type.get("resources", {}).items()}
            if res.get("GPU", 0) >= 1:
                out[f"{path.name} {name}"] = node_type.get("labels") or {} if memory else res
    return out


def kuberay_node_types(memory: bool = False) -> dict[str, dict]:
    """'raycluster.yaml gpu-1x' -> the Ray resources a worker pod of that group offers; memory: its pod labels."""
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
                    labels = (group["template"].get("metadata") or {}).get("labels") or {}
                    out[f"{path.name} {group['groupName']}"] = labels if memory else res
    return out


NODE_TYPES = {**launcher_node_types(), **kuberay_node_types()}
NODE_LABELS = {**launcher_node_types(memory=True), **kuberay_node_types(memory=True)}


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
@pytest.mark.slow  # a two-node local Ray cluster of its own: 20-80 s on a shared 2-core machine
def test_dry_run_prints_the_live_packing_and_a_local_storage_path_is_refused(tmp_path, own_ray):
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


# ---- memory -------------------------------------------------------------------------------------------------------
def test_every_gpu_node_type_declares_its_gpu_memory():
    assert set(NODE_LABELS) == set(NODE_TYPES)
    memory = {node: labels.get(MEMORY_LABEL) for node, labels in NODE_LABELS.items()}
    assert all(isinstance(v, str) and v.isdigit() for v in memory.values()), memory
    # the cards the files name: A10G 23028 MiB and L4 23034 (1-GPU types; k8s gpu-1x takes either: the smaller),
    # A100 40 GB 40960 (8-GPU types)
    for node, mib in memory.items():
        gpus = NODE_TYPES[node]["GPU"]
        assert int(mib) == (40960 if gpus == 8 else 23034 if node == "gcp.yaml gpu_1x" else 23028), node


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
@pytest.mark.parametrize("node", sorted(NODE_TYPES))
def test_every_paper_spec_fits_or_is_refused_on_every_gpu_node_type(spec_path, node):
    """The spec loaded for one node type (its GPU memory; as many GPUs as one node has): a plan whose every trial fits
    its share where the spec targets the node type, else the one-line refusal."""
    mib, gpus = int(NODE_LABELS[node][MEMORY_LABEL]), int(NODE_TYPES[node]["GPU"])
    spec = load_study(spec_path)
    assert set(spec.cluster.node_types) <= set(NODE_TYPES), spec.cluster.node_types
    overrides = [f"cluster.gpu_memory_mib={mib}", f"cluster.gpus={gpus}"]
    if node in spec.cluster.node_types:
        plans = load_study(spec_path, overrides).gpu_plans()
        assert plans and all(p.fits and p.need <= p.share for p in plans), plans
        assert all(p.share == int(spec.resources.gpu * mib * 2**20) for p in plans)
    else:
        with pytest.raises(PtxError) as err:
            load_study(spec_path, overrides)
        msg = str(err.value)
        assert "\n" not in msg and f"of a {mib} MiB GPU" in msg and "GiB (predicted peak" in msg and "fix:" in msg


def test_the_paper_specs_target_every_gpu_node_type_of_cluster():
    for path in SPECS:
        assert sorted(load_study(path).cluster.node_types) == sorted(NODE_TYPES), path.name


def test_thirteen_roberta_large_prompts_at_half_a_24_gb_card_are_refused_in_one_line():
    over = ["train.group_size=13", "resources.gpu=0.5", "cluster.gpu_memory_mib=23028"]
    with pytest.raises(PtxError) as err:
        load_study(ROOT / "experiments" / "paper_roberta_large.yaml", over)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(r"train\.group_size: 13 does not fit the GPU: a roberta-large trial of 13 prompt\(s\) needs "
                     r"[\d.]+ GiB \(predicted peak [\d.]+ GiB \+ CUDA context\) but its share is 11\.2 GiB "
                     r"\(resources\.gpu 0\.5 of a 23028 MiB GPU, cluster\.gpu_memory_mib\); fix: train\.group_size: auto "
                     r"\(picks at most 3 here\) or a group of at most 3$", msg), msg
    # one prompt per trial fits the same share: the refusal is about the group, not the backbone
    assert load_study(ROOT / "experiments" / "paper_roberta_large.yaml", [*over[1:], "train.group_size=1"])


def test_choose_group_size_by_hand():
    # 39 runs (13 tasks x 3 seeds), groups of at most 3 fit the memory; 2 trials per GPU (resources.gpu 0.5)
    def fits(k):
        return k <= 3

    assert [gpu_slots(g, 0.5) for g in (1, 8, 64)] == [2, 16, 128]
    assert choose_group_size(39, 0, 1, 2, fits) == 3  # 13 trials >= 2 slots
    assert choose_group_size(39, 0, 1, 16, fits) == 2  # groups of 3: 13 trials < 16 slots; of 2: 20 >= 16
    assert choose_group_size(39, 0, 1, 128, fits) == 1  # not even 39 single trials fill 128 slots: the most trials
    assert choose_group_size(39, 0, 1, 2, lambda k: False) is None
    assert trial_count(39, 12, 4, repeats=2) == (10 + 12) * 2  # runs trained alone stay one per trial
    assert choose_group_size(5, 0, 1, 1, lambda k: True) == 5  # never a group larger than the runs


@pytest.mark.parametrize(("gpus", "large", "base"), [(1, (3, 13), (4, 10)), (8, (2, 20), (1, 39)),
                                                     (64, (1, 39), (1, 39))])
def test_group_size_auto_on_1_8_and_64_gpus(gpus, large, base):
    """The paper specs on 24 GB cards (A10G, 23028 MiB), 39 runs each. Largest group that fits: roberta-large at
    resources.gpu 0.5 (an 11.2 GiB share) 3, since a member adds about 2.6 GiB (bf16: 16 x 228 tokens x 24 layers x
    24 KiB of kept activations) to 1.3 GiB of weights, 0.6 of bf16 weight cache and 0.6 of CUDA context, with 10%
    allocator margin: 3 members need about 10.9 GiB, 4 about 13.8; roberta-base at 0.25 (a 5.6 GiB share) 4, from
    about 0.8 GiB a member (12 layers x 18 KiB x 3648 tokens... ) on 0.5 + 0.2 + 0.6 GiB. Then by hand:
    roberta-large, 2 trials per GPU: 1 GPU = 2 slots -> 3 (13 trials); 8 GPUs = 16 slots -> 2 (20 trials);
    64 GPUs = 128 slots -> 1 (39 trials). roberta-base, 4 per GPU: 1 GPU = 4 slots -> 4 (10 trials);
    8 GPUs = 32 slots -> 1 (groups of 2 leave 20 trials); 64 -> 1."""
    for name, want in (("paper_roberta_large.yaml", large), ("paper_roberta_base.yaml", base)):
        spec = load_study(ROOT / "experiments" / name, [f"cluster.gpus={gpus}", "cluster.gpu_memory_mib=23028"])
        (plan,) = spec.gpu_plans()
        assert (plan.group_size, plan.trials) == want, (name, plan)
        assert plan.fits and plan.per_pass == plan.group_size and plan.max_fit == (3 if "large" in name else 4)
        from ptx import sweep

        assert sweep.group_size(spec) == want[0]
        assert sweep.plan(spec)["trials"] == want[1]


def test_a_cpu_study_is_not_sized_and_auto_means_one():
    from ptx import sweep

    spec = load_study(ROOT / "experiments" / "paper_roberta_base.yaml", ["resources.gpu=0"])
    assert spec.gpu_plans() == [] and sweep.group_size(spec) == 1


def test_group_size_must_be_a_number_or_auto(tmp_path):
    with pytest.raises(PtxError, match=r"train.group_size: expected a whole number ≥ 1, auto or null, found 'aut'; "
                                       r"did you mean 'auto'"):
        load_study(ROOT / "experiments" / "paper_roberta_base.yaml", ["train.group_size=aut"])


def test_the_dry_run_prints_memory_per_trial_and_a_plan_that_fits():
    from cli_runner import invoke_cli

    code, out, err = invoke_cli("run", ROOT / "experiments" / "paper_roberta_large.yaml", "--dry-run")
    assert code == 0, err
    assert "GPU plan: 8 GPU(s) of 23028 MiB, 2 trial(s) per GPU" in out
    assert re.search(r"roberta-large: groups of 2 \(2 per pass\), 20 trials; memory per trial [\d.]+ GiB "
                     r"\(predicted peak [\d.]+ GiB \+ CUDA context\) of a 11\.2 GiB share: fits; GPU slots used 16 of 16", out)
    assert re.search(r"about \d+ H100/H200 GPU-h for 30000 steps per prompt", out)
    code, out, err = invoke_cli("run", ROOT / "experiments" / "paper_roberta_large.yaml", "--dry-run",
                                "--set", "train.group_size=13", "--set", "resources.gpu=0.5")
    assert code != 0 and "does not fit the GPU" in err and len(err.strip().splitlines()) == 1


def test_the_cluster_block_and_group_size_auto_keep_the_spec_hash(tmp_path):
    """Where a study runs is not what it computes: a spec with a cluster block and group_size auto hashes like the
    same spec before either existed (an explicit group size still counts, as it did)."""
    plain = tmp_path / "s.yaml"
    plain.write_text("name: s\nbackbones: [tiny-bert]\ntasks: [sst2]\nresources: {gpu: 0.5}\n")
    before = load_study(plain).hash()
    placed = load_study(plain, ["cluster.gpus=64", "cluster.gpu_memory_mib=40960", "train.group_size=auto"])
    assert placed.hash() == before
    assert load_study(plain, ["train.group_size=2"]).hash() != before
