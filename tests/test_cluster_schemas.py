"""cluster/ against the schemas of the software that reads it; unknown fields are errors everywhere.

- RayCluster / RayJob: the KubeRay CRDs of the operator version cluster/README.md installs, vendored under
  tests/schemas/ (source and version in its README), made strict: an object schema that lists its properties
  and does not declare x-kubernetes-preserve-unknown-fields accepts no other key (the API server prunes unknown
  fields silently, so a typo such as `authOption` would otherwise vanish and KubeRay would make its own token).
- Core objects (Deployment, Service, NetworkPolicy, ...): the strict Kubernetes schemas of `kubernetes-validate`.
- `ray up` configs: tests/test_cluster_files.py validates them against Ray's own ray-schema.json; here, the
  security group and the Ray version.
- Versions: every rayVersion equals the ray pin of constraints.txt (the image installs ray under it).
Mutation tests break each of these on purpose; the checks must then report a problem.
"""

import copy
import re
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S = CLUSTER / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
KUBERNETES_VERSION = "1.30"  # the oldest minor the manifests claim to support (EKS/GKE standard support)
METADATA_KEYS = {"name", "namespace", "labels", "annotations"}
WORLD = {"0.0.0.0/0", "::/0"}
METADATA = "169.254.169.254/32"


def pinned(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert match, f"{package} is not pinned in constraints.txt"
    return match.group(1)


def kuberay_version() -> str:
    """The operator version cluster/README.md installs."""
    match = re.search(r"helm install kuberay-operator kuberay/kuberay-operator --version (\S+)",
                      (CLUSTER / "README.md").read_text())
    assert match, "cluster/README.md does not name the KubeRay operator version it installs"
    return match.group(1)


# ------------------------------------------------------------------------------------------- CRD schemas
def strict(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as JSON Schema in which listed properties are the only ones allowed."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        out["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    return out


@cache
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    """kind -> a validator for its v1 schema, from the vendored CRDs of the README's operator version."""
    folder = SCHEMAS / f"kuberay-v{kuberay_version()}"
    assert folder.is_dir(), f"no vendored CRDs for KubeRay {kuberay_version()} under {folder}"
    out = {}
    for path in sorted(folder.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    return out


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(map(str, error.absolute_path)) or "<root>"


def crd_problems(doc: dict) -> list[str]:
    label = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    validator = crd_validators().get(doc.get("kind"))
    if validator is None:
        return [f"{label}: no vendored CRD for kind {doc.get('kind')!r}"]
    problems = [f"{label}: {_where(e)}: {e.message}" for e in validator.iter_errors(doc)]
    extra = set(doc.get("metadata") or {}) - METADATA_KEYS
    problems += [f"{label}: metadata.{k} is not expected in a committed manifest" for k in sorted(extra)]
    return problems


def core_problems(doc: dict) -> list[str]:
    label = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{label}: {_where(exc)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{label}: {doc.get('apiVersion')} {doc.get('kind')} is not a Kubernetes {KUBERNETES_VERSION} kind"]
    return []


def pod_monitor_problems(doc: dict) -> list[str]:
    """The Prometheus operator's PodMonitor (its CRD is not vendored): the fields ptx relies on, nothing else."""
    label, spec = f"PodMonitor/{(doc.get('metadata') or {}).get('name')}", doc.get("spec") or {}
    problems = [f"{label}: unknown spec field {k}" for k in sorted(set(spec) - {"namespaceSelector", "selector",
                                                                                 "podMetricsEndpoints"})]
    for i, endpoint in enumerate(spec.get("podMetricsEndpoints") or [{}]):
        problems += [f"{label}: podMetricsEndpoints[{i}].{k} is unknown" for k in sorted(
            set(endpoint) - {"port", "path", "interval", "scheme"})]
        if "port" not in endpoint:
            problems.append(f"{label}: podMetricsEndpoints[{i}] names no port")
    return problems


def manifest_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc in docs:
        if doc.get("apiVersion", "").startswith("ray.io/"):
            problems += crd_problems(doc)
        elif doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == "PodMonitor":
            problems += pod_monitor_problems(doc)
        else:
            problems += core_problems(doc)
    return problems


def load_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's own file, not an API object
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


# ------------------------------------------------------------------------------ semantics schemas miss
def ray_version_problems(docs: list[dict]) -> list[str]:
    want, problems = pinned("ray"), []
    for doc in docs:
        spec = {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"]}.get(doc["kind"])
        if spec and spec(doc).get("rayVersion") != want:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: rayVersion {spec(doc).get('rayVersion')!r}, "
                            f"constraints.txt pins ray=={want}")
    return problems


def network_policy_problems(docs: list[dict]) -> list[str]:
    """Every ptx pod is under an ingress policy and an egress policy; no ingress rule admits everything (no
    `from`, an empty namespaceSelector, an ipBlock of the whole internet); no egress rule reaches the cloud
    metadata endpoint (it would hand a trial the node's credentials)."""
    problems, policies = [], [d for d in docs if d["kind"] == "NetworkPolicy"]
    for policy in policies:
        label, spec = f"NetworkPolicy/{policy['metadata']['name']}", policy["spec"]
        for direction in ("ingress", "egress"):
            if spec.get(direction) and direction.capitalize() not in (spec.get("policyTypes") or []):
                problems.append(f"{label}: has {direction} rules but policyTypes lacks {direction.capitalize()}")
        for i, rule in enumerate(spec.get("ingress") or []):
            sources = rule.get("from")
            if not sources:
                problems.append(f"{label}: ingress[{i}] has no `from`: it admits every source")
            for source in sources or []:
                if source.get("namespaceSelector") == {} and not source.get("podSelector"):
                    problems.append(f"{label}: ingress[{i}] admits every pod of every namespace")
                if (source.get("ipBlock") or {}).get("cidr") in WORLD:
                    problems.append(f"{label}: ingress[{i}] admits the whole internet")
        for i, rule in enumerate(spec.get("egress") or []):
            if not rule.get("to"):
                problems.append(f"{label}: egress[{i}] has no `to`: it reaches the metadata endpoint")
            for dest in rule.get("to") or []:
                block = dest.get("ipBlock") or {}
                if block and block.get("cidr") in WORLD and METADATA not in (block.get("except") or []):
                    problems.append(f"{label}: egress[{i}] reaches the cloud metadata endpoint {METADATA}")

    def selected(labels: dict, kind: str) -> bool:
        return any(kind in (p["spec"].get("policyTypes") or []) and
                   all(labels.get(k) == v for k, v in p["spec"].get("podSelector", {}).get("matchLabels", {}).items())
                   and p["spec"].get("podSelector", {}).get("matchLabels") for p in policies)

    for doc in docs:
        for labels in _pod_labels(doc):
            for kind in ("Ingress", "Egress"):
                if not selected(labels, kind):
                    problems.append(f"{doc['kind']}/{doc['metadata']['name']}: pods {labels} under no {kind} policy")
    return problems


def _pod_labels(doc: dict) -> list[dict]:
    """The labels of the long-running pods a manifest creates (Ray pods carry KubeRay's ray.io/is-ray-node)."""
    if doc["kind"] == "Deployment" or doc["kind"] == "StatefulSet":
        return [doc["spec"]["template"]["metadata"]["labels"]]
    if doc["kind"] == "RayCluster":  # KubeRay adds ray.io/is-ray-node to the templates' own labels
        spec = doc["spec"]
    elif doc["kind"] == "RayJob":
        spec = doc["spec"]["rayClusterSpec"]
    else:
        return []
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [{**g["template"]["metadata"].get("labels", {}), "ray.io/is-ray-node": "yes"} for g in groups]
    return []


def ops_problems(docs: list[dict]) -> list[str]:
    """The long-lived RayCluster survives its head (GCS FT on a password-protected Redis, a PDB, do-not-disrupt
    annotations), every workload has its own ServiceAccount, and the dashboard is wired to Prometheus/Grafana."""
    problems = []
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    ft = cluster["spec"].get("gcsFaultToleranceOptions") or {}
    redis = next((d for d in docs if d["kind"] == "Service" and ft.get("redisAddress", "").split(":")[0]
                  == d["metadata"]["name"]), None)
    if redis is None:
        problems.append("RayCluster: gcsFaultToleranceOptions.redisAddress names no Service of the manifests")
    if "secretKeyRef" not in ((ft.get("redisPassword") or {}).get("valueFrom") or {}):
        problems.append("RayCluster: the GCS Redis password must come from a Secret")
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for doc in docs:
        if doc["kind"] not in {"RayCluster", "RayJob"}:
            continue
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        head = spec["headGroupSpec"]["template"]["metadata"]
        label = f"{doc['kind']}/{doc['metadata']['name']}"
        if (head.get("annotations") or {}).get("karpenter.sh/do-not-disrupt") != "true" or \
                (head.get("annotations") or {}).get("cluster-autoscaler.kubernetes.io/safe-to-evict") != "false":
            problems.append(f"{label}: the head template lacks the do-not-disrupt / safe-to-evict annotations")
        # KubeRay adds ray.io/node-type=head (and ray.io/cluster=<generated name> on a RayJob's cluster)
        head_labels = {**(head.get("labels") or {}), "ray.io/node-type": "head"}
        if doc["kind"] == "RayCluster":
            head_labels["ray.io/cluster"] = doc["metadata"]["name"]
        if not any(p["spec"]["selector"].get("matchLabels", {}).items() <= head_labels.items()
                   and p["spec"].get("maxUnavailable") == 0 for p in pdbs):
            problems.append(f"{label}: no PodDisruptionBudget keeps its head (maxUnavailable 0)")
    # workers outlive a head restart only as long as they wait for its GCS; Ray's 60 s is shorter than an image pull
    config = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ptx-config"), {})
    wait = (config.get("data") or {}).get("RAY_gcs_rpc_server_reconnect_timeout_s", "60")
    if int(wait) < 300:
        problems.append(f"ConfigMap/ptx-config: RAY_gcs_rpc_server_reconnect_timeout_s is {wait} s, shorter than "
                        f"pulling the CUDA image onto a fresh node (>= 300 s)")
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            name = doc["spec"]["template"]["spec"].get("serviceAccountName")
            if name not in accounts:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']}: serviceAccountName {name!r} is not one "
                                f"of the manifests' ServiceAccounts")
    env = {e["name"] for e in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
    problems += [f"RayCluster head: {v} not set" for v in ("RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST") if v not in env]
    if not any(d["kind"] == "PodMonitor" for d in docs):
        problems.append("no PodMonitor scrapes the Ray pods")
    return problems


def security_group_problems(config: dict) -> list[str]:
    """A launcher's own security-group rules: nothing but SSH may be open to the world."""
    rules = ((config.get("provider") or {}).get("security_group") or {}).get("IpPermissions") or []
    problems = []
    for rule in rules:
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges") or []] + \
                 [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges") or []]
        ports = (rule.get("FromPort", 0), rule.get("ToPort", 65535))
        if set(ranges) & WORLD and ports != (22, 22):
            problems.append(f"security group opens ports {ports[0]}-{ports[1]} to the world")
    return problems


# ------------------------------------------------------------------------------------------------ tests
def test_vendored_crds_are_the_readme_version():
    assert kuberay_version() == "1.6.2"
    assert set(crd_validators()) >= {"RayCluster", "RayJob"}


def test_manifests_match_their_schemas():
    docs = load_docs()
    assert {d["kind"] for d in docs} >= {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy",
                                         "ConfigMap", "Namespace", "StatefulSet", "PodDisruptionBudget"}
    assert manifest_problems(docs) == []


def test_versions_and_policies_hold():
    docs = load_docs()
    assert ops_problems(docs) == []
    assert ray_version_problems(docs) == []
    assert network_policy_problems(docs) == []
    for path in (CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"):
        assert security_group_problems(yaml.safe_load(path.read_text())) == []
    readme = (CLUSTER / "README.md").read_text()
    assert set(re.findall(r"\bRay (\d+\.\d+\.\d+)", readme)) == {pinned("ray")}


def _first(docs, kind):
    return next(d for d in docs if d["kind"] == kind)


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


MANIFEST_MUTATIONS = {
    "authOptions-typo": lambda docs: _rename(_first(docs, "RayCluster")["spec"], "authOptions", "authOption"),
    "secretName-typo": lambda docs: _rename(_first(docs, "RayJob")["spec"]["rayClusterSpec"]["authOptions"],
                                            "secretName", "secretname"),
    "unknown-worker-field": lambda docs: _first(docs, "RayCluster")["spec"]["workerGroupSpecs"][0].update(
        gpusPerWorker=1),
    "bad-auth-mode": lambda docs: _first(docs, "RayCluster")["spec"]["authOptions"].update(mode="tokens"),
    "unknown-container-field": lambda docs: _first(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    .update(imagePullPolize="Always"),
    "replicas-not-int": lambda docs: _first(docs, "Deployment")["spec"].update(replicas="one"),
    "unknown-service-field": lambda docs: _first(docs, "Service")["spec"].update(clusterIp="None"),
    "unknown-policy-field": lambda docs: _first(docs, "NetworkPolicy")["spec"].update(egres=[]),
    "unknown-pod-field-in-raycluster": lambda docs: _first(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]
    ["spec"].update(securityContxt={}),
}


@pytest.mark.parametrize("name", sorted(MANIFEST_MUTATIONS))
def test_schema_check_catches(name):
    docs = copy.deepcopy(load_docs())
    MANIFEST_MUTATIONS[name](docs)
    assert manifest_problems(docs)


SEMANTIC_MUTATIONS = {
    "rayVersion-differs": lambda docs: _first(docs, "RayCluster")["spec"].update(rayVersion="2.59.0"),
    "rayjob-rayVersion-differs": lambda docs: _first(docs, "RayJob")["spec"]["rayClusterSpec"].update(
        rayVersion="2.61.0"),
    "allow-all-policy": lambda docs: _first(docs, "NetworkPolicy")["spec"].update(ingress=[{}]),
    "all-namespaces": lambda docs: _first(docs, "NetworkPolicy")["spec"]["ingress"][0].update(
        {"from": [{"namespaceSelector": {}}]}),
    "internet-cidr": lambda docs: _first(docs, "NetworkPolicy")["spec"]["ingress"][0].update(
        {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
    "egress-only": lambda docs: _first(docs, "NetworkPolicy")["spec"].update(policyTypes=["Egress"]),
    "metadata-reachable": lambda docs: next(d for d in docs if d["metadata"]["name"] == "egress-no-metadata")
    ["spec"]["egress"][0]["to"][0]["ipBlock"].pop("except"),
    "egress-anywhere": lambda docs: next(d for d in docs if d["metadata"]["name"] == "egress-no-metadata")
    ["spec"]["egress"].append({}),
    "no-egress-policy": lambda docs: docs.remove(next(d for d in docs if d["metadata"]["name"] == "egress-no-metadata")),
    "unselected-pods": lambda docs: docs.remove(
        next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "mlflow")),
}


SEMANTIC_MUTATIONS.update({
    "no-gcs-ft": lambda docs: _first(docs, "RayCluster")["spec"].pop("gcsFaultToleranceOptions"),
    "redis-password-inline": lambda docs: _first(docs, "RayCluster")["spec"]["gcsFaultToleranceOptions"].update(
        redisPassword={"value": "hunter2"}),
    "no-pdb": lambda docs: docs.remove(_first(docs, "PodDisruptionBudget")),
    "head-evictable": lambda docs: _first(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]
    .pop("annotations"),
    "rayjob-head-evictable": lambda docs: _first(docs, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]
    ["template"]["metadata"].pop("annotations"),
    "pdb-misses-rayjob-head": lambda docs: _first(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    .update({"ray.io/cluster": "ptx"}),
    "default-service-account": lambda docs: _first(docs, "StatefulSet")["spec"]["template"]["spec"].pop(
        "serviceAccountName"),
    "no-prometheus-host": lambda docs: _first(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    ["containers"][0]["env"].pop(0),
    "no-podmonitor": lambda docs: docs.remove(_first(docs, "PodMonitor")),
    "gcs-wait-default": lambda docs: next(d for d in docs if d["metadata"]["name"] == "ptx-config")["data"].pop(
        "RAY_gcs_rpc_server_reconnect_timeout_s"),
})


@pytest.mark.parametrize("name", sorted(SEMANTIC_MUTATIONS))
def test_version_and_policy_checks_catch(name):
    docs = copy.deepcopy(load_docs())
    SEMANTIC_MUTATIONS[name](docs)
    assert ray_version_problems(docs) + network_policy_problems(docs) + ops_problems(docs)


@pytest.mark.parametrize("port", [6379, 10001, 8265, 5000])
def test_security_group_check_catches_a_world_open_port(port):
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    from test_cluster_files import schema_problems

    assert schema_problems(config) == []  # Ray's schema accepts it: only this check stands in the way
    assert security_group_problems(config) == [f"security group opens ports {port}-{port} to the world"]
