"""Offline checks of cluster/: the `ray up` configs, the KubeRay manifests, the Dockerfile and build script.

Each check is a plain function that returns a list of problems. The tests assert that the shipped files have
none, and that a deliberately broken copy has at least one, so no check can pass vacuously.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S = CLUSTER / "k8s"
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
# The study specs are written in parallel with cluster/: a RayJob may name one of these before it exists.
EXPECTED_STUDIES = {"paper_roberta_base.yaml", "paper_roberta_large.yaml", "paper_t5_base.yaml", "demo.yaml"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY", re.IGNORECASE)
LOOPBACK = {"127.0.0.1", "localhost"}


# ---------------------------------------------------------------------------------------------- helpers
def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def load_k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        with path.open() as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def walk(node, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """Every (path, value) in a parsed YAML tree, depth first."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*path, str(i)))


def ray_schema() -> dict:
    """The launcher schema shipped inside the installed ray package (found without importing ray)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations, "ray is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def torch_pin() -> str:
    """torch's version in constraints.txt, without a local label (the image uses the CUDA build of it)."""
    match = re.search(r"^torch==([^\s+#]+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    return match.group(1) if match else "2.13.0"


# ------------------------------------------------------------------------------------- launcher checks
def schema_problems(config: dict) -> list[str]:
    validator_cls = jsonschema.validators.validator_for(ray_schema())
    validator = validator_cls(ray_schema())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(config)]


def commands(config: dict, role: str) -> str:
    """All shell commands that run on a head or worker node, joined (node-type initialization included)."""
    keys = ["initialization_commands", "setup_commands", f"{role}_setup_commands", f"{role}_start_ray_commands"]
    parts = [c for k in keys for c in config.get(k) or []]
    for name, node_type in config.get("available_node_types", {}).items():
        if (name == config.get("head_node_type")) == (role == "head"):
            parts += node_type.get("initialization_commands") or []
    return "\n".join(parts)


def launcher_problems(config: dict) -> list[str]:
    problems = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    if head not in types:
        return [f"head_node_type {head!r} is not one of available_node_types"]
    if types[head].get("resources", {}).get("GPU") != 0:
        problems.append("the head type must declare \"GPU\": 0 (Ray otherwise detects GPUs from the instance)")
    gpu_types = {n: t for n, t in types.items() if n != head and t.get("resources", {}).get("GPU", 0) >= 1}
    if len(gpu_types) < 2:
        problems.append(f"need >= 2 GPU worker types, found {sorted(gpu_types)}")
    if not {1, 8} <= {t["resources"]["GPU"] for t in gpu_types.values()}:
        problems.append("need a single-GPU and an 8-GPU worker type")
    for name, t in gpu_types.items():
        if not t.get("max_workers", 0) > t.get("min_workers", 0):
            problems.append(f"{name}: max_workers must exceed min_workers (autoscaling)")
        if not set(t["resources"]) - {"CPU", "GPU", "memory", "object_store_memory"}:
            problems.append(f"{name}: no custom resource to pin trials to this type")
    problems += image_problems({"docker.image": (config.get("docker") or {}).get("image")})

    head_cmds, worker_cmds = commands(config, "head"), commands(config, "worker")
    everything = head_cmds + "\n" + worker_cmds
    hosts = re.findall(r"--dashboard-host[= ]+[\"']?([^\s\"';]+)", everything)
    if not hosts:
        problems.append("ray start --head must set --dashboard-host (Ray's default may change)")
    problems += [f"dashboard bound to {h}, not loopback" for h in hosts if h not in LOOPBACK]
    if "0.0.0.0" in everything or "::/0" in everything:
        problems.append("a command binds 0.0.0.0: dashboard and MLflow must not listen on every interface")
    if "ray start --head" not in head_cmds:
        problems.append("head_start_ray_commands never runs `ray start --head`")
    if "RAY_AUTH_MODE=disabled" in everything:
        problems.append("Ray token authentication is disabled")
    for role, text in (("head", head_cmds), ("worker", worker_cmds)):
        for needle in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH=", "MLFLOW_TRACKING_URI=http://"):
            if needle not in text:
                problems.append(f"{role} nodes never set {needle}")
    if not re.search(r"ptx mlflow-server --host \"?\$PTX_HEAD_IP\b", head_cmds):
        problems.append("the head must start `ptx mlflow-server` on its private address ($PTX_HEAD_IP)")
    # the tracking store outlives `ray down`: a database URI from the cloud's secret store, artifacts in a bucket
    if not re.search(r'PTX_MLFLOW_BACKEND_STORE_URI="\$\(python -c "[^\n]*secret', head_cmds, re.I):
        problems.append("the MLflow server's database URI must come from the cloud's secret manager")
    if not re.search(r"ptx mlflow-server [^;]*--artifacts-destination (s3|gs)://", head_cmds):
        problems.append("the MLflow server's artifacts must go to a bucket (--artifacts-destination s3:// or gs://)")
    token_dir = re.search(r"RAY_AUTH_TOKEN_PATH=\$HOME/([^/\s\"]+)/", everything)
    if token_dir and f"~/{token_dir.group(1)}" not in (config.get("file_mounts") or {}):
        problems.append(f"the token directory ~/{token_dir.group(1)} is not in file_mounts")
    literal = re.findall(r"\b[A-Z_]*(?:PASSWORD|TOKEN|SECRET)[A-Z_]*=(?![\"']?\$)[^\s;\"']+", everything)
    problems += [f"literal secret in a command: {s.split('=')[0]}=..." for s in literal]
    return problems


@pytest.fixture(params=LAUNCHERS, ids=lambda p: p.name)
def launcher(request) -> dict:
    return load_yaml(request.param)


def test_launcher_configs_match_rays_schema(launcher):
    assert schema_problems(launcher) == []


def test_schema_check_rejects_a_broken_config(launcher):
    broken = copy.deepcopy(launcher)
    broken["max_workers"] = "ten"
    broken["dashboard_public"] = True  # the schema allows no unknown top-level keys
    broken["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5  # resources are integers
    assert len(schema_problems(broken)) >= 3


def test_launcher_configs_pass_rays_own_validation(launcher):
    """Ray's own merge-with-defaults and semantic checks (head type exists, min_workers fit, docker)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_launcher_configs_are_safe_and_autoscale(launcher):
    assert launcher_problems(launcher) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["available_node_types"][c["head_node_type"]]["resources"].update(GPU=1),
        lambda c: c["available_node_types"].pop("gpu_8x"),
        lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=8, max_workers=8),
        lambda c: c["head_start_ray_commands"].__setitem__(
            -1, c["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0")
        ),
        lambda c: c["worker_setup_commands"].__setitem__(
            0, c["worker_setup_commands"][0].replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")
        ),
        lambda c: c["worker_start_ray_commands"].append("RAY_AUTH_TOKEN=hunter2 ray status"),
        lambda c: c.update(file_mounts={}),
        lambda c: c["docker"].update(image="rayproject/ray:latest-gpu"),
        lambda c: c["head_start_ray_commands"].__setitem__(
            1, c["head_start_ray_commands"][1].replace('--host "$PTX_HEAD_IP"', "--host 127.0.0.1")
        ),
        lambda c: c["head_start_ray_commands"].__setitem__(
            1, re.sub(r"--artifacts-destination \S+", "", c["head_start_ray_commands"][1])
        ),
        lambda c: c["head_start_ray_commands"].__setitem__(
            1, re.sub(r'PTX_MLFLOW_BACKEND_STORE_URI="[^\n]*?" \|\|', 'PTX_MLFLOW_BACKEND_STORE_URI="sqlite:///x.db" ||',
                      c["head_start_ray_commands"][1])
        ),
    ],
    ids=["gpu-head", "one-gpu-type", "no-autoscaling", "public-dashboard", "auth-off", "literal-token",
         "no-token-mount", "other-image", "mlflow-on-loopback", "artifacts-on-head-disk", "sqlite-store"],
)
def test_launcher_check_catches(launcher, mutate):
    broken = copy.deepcopy(launcher)
    mutate(broken)
    assert launcher_problems(broken)


# ------------------------------------------------------------------------------------------ images
THIRD_PARTY = {"postgres", "redis"}  # official images of the services beside ptx (postgres.yaml, redis.yaml)


def _repository(image: str) -> str:
    name = image.partition("@")[0]
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def image_problems(images: dict[str, str | None]) -> list[str]:
    """Every image reference pinned: by digest, or by a version tag (pyproject's version for the ptx image, a
    release number for the third-party services); never latest."""
    problems = []
    for where, image in images.items():
        if not image:
            problems.append(f"{where}: no image")
            continue
        name, _, digest = image.partition("@")
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
        third_party = _repository(image) in THIRD_PARTY
        if digest:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                problems.append(f"{where}: {image!r} has a malformed digest")
        elif tag is None:
            problems.append(f"{where}: {image!r} has no tag: pin a version or a digest")
        elif third_party and not re.match(r"\d+\.\d+", tag):
            problems.append(f"{where}: {image!r} is tagged {tag!r}, not a release number or a digest")
        elif not third_party and tag != VERSION:
            problems.append(f"{where}: {image!r} is tagged {tag!r}, not the version {VERSION} or a digest")
    return problems


def all_images(launchers: dict[str, dict], k8s_docs: list[dict], kustomization: dict) -> dict[str, str | None]:
    """Every image reference of cluster/: the launchers' docker images, every container of every manifest, and
    the image the kustomization rewrites them to."""
    images = {}
    for name, config in launchers.items():
        docker = config.get("docker") or {}
        for key in ("image", "head_image", "worker_image"):
            if key in docker:
                images[f"{name} docker.{key}"] = docker[key]
    for doc in k8s_docs:
        label = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        for path, value in walk(doc):
            if path and path[-1] == "image" and isinstance(value, str):
                images[f"{label}/{'/'.join(path)}"] = value
    for entry in kustomization.get("images") or []:
        ref = entry.get("newName", entry["name"])
        images[f"kustomization images/{entry['name']}"] = (f"{ref}@{entry['digest']}" if entry.get("digest")
                                                           else f"{ref}:{entry.get('newTag', '')}")
    return images


def one_image_problems(images: dict[str, str | None], kustomization: dict) -> list[str]:
    problems = image_problems(images)
    distinct = sorted({i for i in images.values() if i and _repository(i) not in THIRD_PARTY})
    if len(distinct) != 1:
        problems.append(f"every node and pod must run one image, found {distinct}")
    names = [e["name"] for e in kustomization.get("images") or []]
    repos = {_repository(i) for i in distinct}
    if [n for n in names if n not in repos]:
        problems.append(f"kustomization images {names} match no image of the manifests {sorted(repos)}")
    return problems


def _shipped_images() -> tuple[dict, dict]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return all_images({p.name: load_yaml(p) for p in LAUNCHERS}, load_k8s_docs(), kustomization), kustomization


def test_one_pinned_image_everywhere():
    images, kustomization = _shipped_images()
    assert len(images) >= 10
    assert one_image_problems(images, kustomization) == []


@pytest.mark.parametrize("mutate", [
    lambda images, k: images.update({"aws.yaml docker.image": "ghcr.io/acme/ptx:0.1.0"}),
    lambda images, k: images.update({key: v.replace(":0.1.0", ":latest") for key, v in images.items()}),
    lambda images, k: images.update({key: v.rsplit(":", 1)[0] for key, v in images.items()}),
    lambda images, k: images.update({key: v.replace(":0.1.0", "@sha256:abc") for key, v in images.items()}),
    lambda images, k: k["images"][0].update(name="ghcr.io/acme/other"),
    lambda images, k: images.update({"db": "postgres:latest"}),
    lambda images, k: images.update({"db": "postgres"}),
], ids=["two-images", "latest", "untagged", "bad-digest", "kustomize-misses", "latest-postgres", "untagged-postgres"])
def test_image_check_catches(mutate):
    images, kustomization = _shipped_images()
    mutate(images, kustomization)
    assert one_image_problems(images, kustomization)


def test_a_digest_pin_passes():
    digest = "ghcr.io/acme/ptx@sha256:" + "ab" * 32
    assert image_problems({"x": digest}) == []


def test_shipped_placeholders_cannot_be_owned():
    """Every bucket and image named in cluster/ and experiments/ is one ptx refuses at run time (a placeholder
    no one can register), so a forgotten edit never writes into somebody else's bucket."""
    from ptx.guards import is_placeholder

    files = [p for p in [*CLUSTER.rglob("*"), *(ROOT / "experiments").glob("*.yaml")] if p.is_file()]
    text = "\n".join(p.read_text() for p in files)
    # the README's walkthrough creates `my-ptx-bucket` itself (step 2) before any command uses it
    buckets = set(re.findall(r"\b(?:s3|gs)://([A-Za-z0-9][A-Za-z0-9.-]+)", text)) - {"my-ptx-bucket"}
    images = {i for i in _shipped_images()[0].values() if _repository(i) not in THIRD_PARTY}
    assert buckets and images
    assert sorted(b for b in buckets if not is_placeholder(b)) == []
    assert sorted(i for i in images if not is_placeholder(i)) == []


# ------------------------------------------------------------------------------------------ k8s checks
def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """Every PodSpec in a manifest (anything holding a list of containers), with where it was found."""
    return [("/".join(p), v) for p, v in walk(doc) if isinstance(v, dict) and isinstance(v.get("containers"), list)]


def ray_cluster_specs(doc: dict) -> list[dict]:
    if doc.get("kind") == "RayCluster":
        return [doc["spec"]]
    if doc.get("kind") == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    return []


def study_problems(name: str) -> list[str]:
    existing = {p.name for p in (ROOT / "experiments").glob("*.yaml")}
    problems = []
    if name not in EXPECTED_STUDIES | existing:
        problems.append(f"experiments/{name} is neither an expected study nor a file in experiments/")
    if any(n.startswith("paper_") for n in existing) and name not in existing:
        problems.append(f"experiments/ has the paper specs but not {name}")
    return problems


def container_problems(where: str, pod: dict, container: dict) -> list[str]:
    name = f"{where}/{container.get('name')}"
    problems = []
    pod_sc, sc = pod.get("securityContext") or {}, container.get("securityContext") or {}
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        problems.append(f"{name}: runAsNonRoot is not true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        problems.append(f"{name}: runs as uid 0")
    if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
        problems.append(f"{name}: privilege escalation not disabled")
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(resources.get(part) or {}):
            problems.append(f"{name}: no cpu/memory {part}")
    for env in container.get("env") or []:
        if SECRET_NAME.search(env["name"]) and ("value" in env or "secretKeyRef" not in (env.get("valueFrom") or {})):
            problems.append(f"{name}: env {env['name']} must come from a Secret (valueFrom.secretKeyRef)")
    problems += image_problems({name: container.get("image")})
    return problems


def k8s_problems(docs: list[dict]) -> list[str]:
    problems = []
    kinds = {d.get("kind") for d in docs}
    if not {"RayCluster", "RayJob"} <= kinds:
        problems.append(f"need a RayCluster and a RayJob, found {sorted(k for k in kinds if k)}")
    for doc in docs:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
        label = f"{kind}/{name}"
        if kind in {"RayCluster", "RayJob"} and doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"{label}: apiVersion must be ray.io/v1")
        if kind == "Service" and (doc.get("spec") or {}).get("type") != "ClusterIP":
            problems.append(f"{label}: Services must be type ClusterIP explicitly")
        if kind in {"Ingress", "Gateway", "HTTPRoute"}:
            problems.append(f"{label}: nothing of ptx is exposed outside the cluster")
        if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"{label}: Secrets are created with kubectl, never committed")
        if kind == "ConfigMap":
            problems += [f"{label}: key {k} looks secret" for k in doc.get("data") or {} if SECRET_NAME.search(k)]
        for path, value in walk(doc):
            key = path[-1] if path else ""
            if key in {"type", "serviceType"} and value in {"LoadBalancer", "NodePort"}:
                problems.append(f"{label}: {'/'.join(path)} is {value}")
            if key in {"enableIngress", "hostNetwork", "hostPID", "hostIPC"} and value is True:
                problems.append(f"{label}: {'/'.join(path)} is true")
            if key == "hostPort":
                problems.append(f"{label}: {'/'.join(path)} opens a port on the node")
        for where, pod in pod_specs(doc):
            for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
                problems += container_problems(f"{label}/{where}", pod, container)
            if (pod.get("securityContext") or {}).get("runAsNonRoot") is not True:
                problems.append(f"{label}/{where}: pod securityContext.runAsNonRoot is not true")
        for spec in ray_cluster_specs(doc):
            problems += ray_cluster_problems(label, kind, spec)
        if kind == "RayJob":
            problems += ray_job_problems(label, doc["spec"])
    return problems


def ray_cluster_problems(label: str, kind: str, spec: dict) -> list[str]:
    problems = []
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{label}: authOptions.mode must be token")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{label}: enableInTreeAutoscaling must be true")
    autoscaler_sc = (spec.get("autoscalerOptions") or {}).get("securityContext") or {}
    if autoscaler_sc.get("runAsNonRoot") is not True:
        problems.append(f"{label}: the autoscaler sidecar must run as non-root")
    head = spec.get("headGroupSpec") or {}
    if head.get("serviceType") != "ClusterIP":
        problems.append(f"{label}: headGroupSpec.serviceType must be ClusterIP")
    dashboard = (head.get("rayStartParams") or {}).get("dashboard-host")
    # A RayCluster keeps the dashboard on loopback (port-forward only); a RayJob's submitter and the operator
    # need the pod address, so it may bind the pod's own 0.0.0.0 behind the ClusterIP head Service.
    allowed = LOOPBACK if kind == "RayCluster" else LOOPBACK | {"0.0.0.0"}
    if dashboard not in allowed:
        problems.append(f"{label}: dashboard-host is {dashboard!r}, expected one of {sorted(allowed)}")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{label}: no worker group")
    for group in groups:
        name = f"{label}/{group.get('groupName')}"
        if group.get("minReplicas") != 0 or not group.get("maxReplicas", 0) > 0:
            problems.append(f"{name}: must autoscale from minReplicas 0 to maxReplicas > 0")
        container = group["template"]["spec"]["containers"][0]
        limits = (container.get("resources") or {}).get("limits") or {}
        if int(limits.get("nvidia.com/gpu", 0)) < 1:
            problems.append(f"{name}: the worker must request nvidia.com/gpu")
    return problems


def ray_job_problems(label: str, spec: dict) -> list[str]:
    problems = []
    match = re.search(r"\bptx run experiments/([\w.-]+\.yaml)\b", spec.get("entrypoint", ""))
    if not match:
        return [f"{label}: the entrypoint must run `ptx run experiments/<study>.yaml`"]
    problems += [f"{label}: {p}" for p in study_problems(match.group(1))]
    if "--address auto" not in spec["entrypoint"]:
        problems.append(f"{label}: the entrypoint must join the job's cluster (--address auto)")
    storage = re.search(r"--set storage_path=(\S+)", spec["entrypoint"])
    if not storage or not re.match(r"(s3|gs)://|/mnt/", storage.group(1)):
        problems.append(f"{label}: the entrypoint must set storage_path to a store every pod shares (s3, gs, RWX)")
    if re.search(r"&&|;|\||\$", spec["entrypoint"]):
        problems.append(f"{label}: shell syntax in the entrypoint would run in the submitter pod")
    if spec.get("shutdownAfterJobFinishes") is not True or not spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append(f"{label}: the cluster must shut down after the job (shutdownAfterJobFinishes + ttl)")
    return problems


def test_k8s_manifests_are_internal_non_root_and_gpu():
    assert k8s_problems(load_k8s_docs()) == []


def _first(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d.get("kind") == kind)


def _ray_head(doc: dict) -> dict:
    return ray_cluster_specs(doc)[0]["headGroupSpec"]


def _drop_security_contexts(doc: dict) -> None:
    for _, pod in pod_specs(doc):
        pod.pop("securityContext", None)
        for container in pod["containers"]:
            container.pop("securityContext", None)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda docs: _first(docs, "Service")["spec"].update(type="LoadBalancer"),
        lambda docs: _ray_head(_first(docs, "RayCluster")).update(serviceType="NodePort"),
        lambda docs: docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                                  "spec": {"ports": [{"port": 8265}]}}),
        lambda docs: _ray_head(_first(docs, "RayCluster"))["rayStartParams"].update({"dashboard-host": "0.0.0.0"}),
        lambda docs: _drop_security_contexts(_first(docs, "Deployment")),
        lambda docs: _first(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "MLFLOW_AUTH_ADMIN_PASSWORD", "value": "hunter2"}),
        lambda docs: [g["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
                      for g in _first(docs, "RayCluster")["spec"]["workerGroupSpecs"]],
        lambda docs: _first(docs, "RayCluster")["spec"].pop("authOptions"),
        lambda docs: _first(docs, "RayJob")["spec"].update(
            entrypoint="ptx run experiments/paper_bert_tiny.yaml --address auto"),
        lambda docs: _first(docs, "RayJob")["spec"].update(
            entrypoint="cd $HOME && ptx run experiments/paper_roberta_base.yaml --address auto"),
        lambda docs: _first(docs, "RayJob")["spec"].update(
            entrypoint="ptx run experiments/paper_roberta_base.yaml --address auto --set storage_path=./results"),
        lambda docs: docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ptx-ray-auth"},
                                  "stringData": {"auth_token": "hunter2"}}),
        lambda docs: _first(docs, "RayCluster")["spec"]["workerGroupSpecs"][0].update(minReplicas=2),
    ],
    ids=["lb-service", "nodeport-head", "implicit-service-type", "public-dashboard", "root-container",
         "plain-password", "no-gpu", "auth-off", "unknown-study", "shell-entrypoint", "local-storage", "committed-secret",
         "no-scale-to-zero"],
)
def test_k8s_check_catches(mutate):
    docs = copy.deepcopy(load_k8s_docs())
    mutate(docs)
    assert k8s_problems(docs)


def test_rayjob_study_is_expected_or_exists():
    entrypoint = _first(load_k8s_docs(), "RayJob")["spec"]["entrypoint"]
    study = re.search(r"experiments/([\w.-]+\.yaml)", entrypoint).group(1)
    assert study in EXPECTED_STUDIES
    if (ROOT / "experiments" / study).exists() or any((ROOT / "experiments").glob("paper_*.yaml")):
        assert (ROOT / "experiments" / study).is_file()
    assert study_problems("no_such_study.yaml")


def test_kustomization_lists_existing_manifests():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["resources"], "empty kustomization"
    missing = [r for r in kustomization["resources"] if not (K8S / r).is_file()]
    assert missing == []
    assert "rayjob.yaml" not in kustomization["resources"], "the RayJob would start a second cluster on apply"


# ----------------------------------------------------------------------------- Dockerfile and build.sh
def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def dockerfile_problems(dockerfile: str, torch_version: str) -> list[str]:
    steps = instructions(dockerfile)
    problems = []
    users = [args for op, args in steps if op == "USER"]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append("the image must end with a non-root USER")
    froms = [args for op, args in steps if op == "FROM"]
    arg_defaults = dict(re.findall(r"^(\w+)=(\S+)", "\n".join(a for op, a in steps if op == "ARG"), re.M))
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: arg_defaults.get(m.group(1), m.group(0)), froms[-1] if froms else "")
    if not re.search(r"cuda|pytorch", base):
        problems.append(f"the base image {base!r} is not a CUDA/PyTorch image")
    runs = "\n".join(args for op, args in steps if op == "RUN")
    if f"torch=={torch_version}" not in runs:
        problems.append(f"torch is not pinned to {torch_version} (constraints.txt)")
    if "download.pytorch.org/whl/cu" not in dockerfile:
        problems.append("torch does not come from the PyTorch CUDA index")
    if "-c constraints.txt" not in runs:
        problems.append("dependencies are not installed with -c constraints.txt")
    torch_runs = [args for op, args in steps if op == "RUN" and "torch==" in args]
    if not torch_runs or "-c constraints.txt" not in torch_runs[0]:
        problems.append("torch is not installed under -c constraints.txt")
    if not re.search(r"@sha256:[0-9a-f]{64}$", base):
        problems.append(f"the base image {base!r} is not pinned by digest")
    # a build argument reaches every RUN below its declaration: the per-commit one must come after the heavy ones
    sha_at = next((i for i, (op, args) in enumerate(steps) if op == "ARG" and re.match(r"PTX_GIT_SHA(=|$)", args)), None)
    heavy = [i for i, (op, args) in enumerate(steps) if op == "RUN" and re.search(r"apt-get|pip install", args)]
    if sha_at is None or not heavy or sha_at < max(heavy):
        problems.append("ARG PTX_GIT_SHA must be declared after the last apt-get / pip install layer")
    if "python3.11" not in runs:
        problems.append("the image does not install Python 3.11")
    env_args = " ".join(args for op, args in steps if op in {"ENV", "ARG"})
    problems += [f"{n} in ENV/ARG bakes a secret into the image" for n in re.findall(r"(\w+)=", env_args)
                 if SECRET_NAME.search(n)]
    if not re.search(r"\bHOME=/home/ptx\b", env_args):
        problems.append("ENV HOME=/home/ptx is needed (ray up maps ~/ of file_mounts with it)")
    if [args for op, args in steps if op == "WORKDIR"][-1:] != ["/home/ptx"]:
        problems.append("the final WORKDIR must be /home/ptx")
    return problems


def test_dockerfile_is_non_root_and_pinned():
    assert dockerfile_problems((CLUSTER / "Dockerfile").read_text(), torch_pin()) == []


@pytest.mark.parametrize(
    "old, new",
    [
        ("USER 1000:1000", "USER root"),
        ("USER 1000:1000", ""),
        ("torch==2.13.0", "torch"),
        ("ENV HOME=/home/ptx", "ENV AWS_SECRET_ACCESS_KEY=abc HOME=/home/ptx"),
        ("ARG BASE_IMAGE=nvidia/cuda:", "ARG BASE_IMAGE=python:3.11-slim #"),
        ("-base-ubuntu24.04@sha256:", "-base-ubuntu24.04 #"),
        ('-c constraints.txt torch==2.13.0', 'torch==2.13.0'),
        ("# 1) torch first", "ARG PTX_GIT_SHA=unknown\n# 1) torch first"),
        ("ARG PTX_GIT_SHA=unknown", "ARG PTX_GIT_SHA_UNUSED=unknown"),
    ],
    ids=["user-root", "no-user", "unpinned-torch", "baked-secret", "not-cuda", "base-by-tag",
         "torch-unconstrained", "sha-before-heavy-layers", "no-sha-arg"],
)
def test_dockerfile_check_catches(old, new):
    text = (CLUSTER / "Dockerfile").read_text()
    assert old in text
    assert dockerfile_problems(text.replace(old, new), torch_pin())


def test_build_script_takes_image_and_tag():
    script = (CLUSTER / "build.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    # no default repository (any default would be a name someone else may own); the tag defaults to the version
    assert 'IMAGE="${IMAGE:-}"' in script and f'TAG="${{TAG:-{VERSION}}}"' in script
    assert "docker build" in script and "--file cluster/Dockerfile" in script and "docker push" in script
    assert (CLUSTER / "build.sh").stat().st_mode & 0o111, "build.sh is not executable"


def test_image_extras_are_pinned():
    lines = [ln.split("#")[0].strip() for ln in (CLUSTER / "requirements-image.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln]
    assert {"boto3", "google-api-python-client", "Flask-WTF"} <= {r.split("==")[0] for r in reqs}
    assert [r for r in reqs if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", r)] == []
    assert "-r cluster/requirements-image.txt" in (CLUSTER / "Dockerfile").read_text()


# -------------------------------------------------------------------------------- leaked credentials
CREDENTIAL_PATTERNS = {
    "AWS access key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "Slack token": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
}


def credential_problems(name: str, text: str) -> list[str]:
    return [f"{name}: looks like a {what}" for what, pattern in CREDENTIAL_PATTERNS.items() if re.search(pattern, text)]


def test_no_credentials_in_cluster_files():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 10
    assert [p for f in files for p in credential_problems(str(f.relative_to(ROOT)), f.read_text())] == []
    assert credential_problems("x", "aws_access_key_id = " + "AKIA" + "Q" * 16)
    assert credential_problems("x", "token: hf_" + "a1" * 17)


def test_readme_covers_security_and_access():
    readme = (CLUSTER / "README.md").read_text()
    for needle in ["## Security", "RAY_AUTH_MODE=token", "CVE-2023-48022", "ray dashboard cluster/aws.yaml",
                   "kubectl -n ptx port-forward svc/mlflow 5000:5000", "ptx prompts get", "--app-name basic-auth",
                   "ray job submit --address http://127.0.0.1:8265", "ray://127.0.0.1:10001", "GPU-hours"]:
        assert needle in readme, needle
