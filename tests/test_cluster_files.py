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
LAUNCHERS = sorted(CLUSTER.glob("*.yaml"))  # every `ray up` config of cluster/ (aws.yaml, gcp.yaml)
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
    if types[head].get("resources", {}).get("CPU") != 0:
        problems.append(f"available_node_types.{head}.resources.CPU: the head must offer 0 CPUs to Ray (trials "
                        f"would run beside the autoscaler's identity and the MLflow server's secrets)")
    problems += identity_problems(config)
    problems += node_image_problems(config)
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
    if not re.search(r"ptx mlflow-server [^;]*--auth basic\b", head_cmds):
        problems.append("head_start_ray_commands: `ptx mlflow-server` must run with --auth basic (MLflow without auth)")
    for role, text in (("head", head_cmds), ("worker", worker_cmds)):
        user = re.search(r"MLFLOW_TRACKING_USERNAME=([\w.-]+)", text)
        if not user or user.group(1) in {"admin", "root"} or "MLFLOW_TRACKING_PASSWORD=" not in text:
            problems.append(f"{role}_setup_commands: trials must log in to MLflow as the writer account "
                            f"(MLFLOW_TRACKING_USERNAME/PASSWORD), found {user.group(1) if user else None!r}")
    token_dir = re.search(r"RAY_AUTH_TOKEN_PATH=\$HOME/([^/\s\"]+)/", everything)
    if token_dir and f"~/{token_dir.group(1)}" not in (config.get("file_mounts") or {}):
        problems.append(f"the token directory ~/{token_dir.group(1)} is not in file_mounts")
    literal = re.findall(r"\b[A-Z_]*(?:PASSWORD|TOKEN|SECRET)[A-Z_]*=(?![\"']?\$)[^\s;\"']+", everything)
    problems += [f"literal secret in a command: {s.split('=')[0]}=..." for s in literal]
    return problems


AWS_WORKER_POLICY = CLUSTER / "iam" / "aws-worker-policy.json"
GCP_BUCKET_SCOPES = {"https://www.googleapis.com/auth/devstorage.read_write",
                     "https://www.googleapis.com/auth/devstorage.read_only"}


def trial_types(config: dict) -> dict[str, dict]:
    """The node types trial code can run on: every type that offers Ray a CPU or a GPU."""
    return {n: t for n, t in config.get("available_node_types", {}).items()
            if (t.get("resources") or {}).get("CPU", 1) or (t.get("resources") or {}).get("GPU", 0)}


def aws_policy_problems(policy: dict, where: str) -> list[str]:
    """A policy a trial may use grants S3 object/list actions on named bucket resources, nothing else."""
    problems = []
    for i, st in enumerate(policy.get("Statement") or []):
        actions = st.get("Action") if isinstance(st.get("Action"), list) else [st.get("Action")]
        resources = st.get("Resource") if isinstance(st.get("Resource"), list) else [st.get("Resource")]
        if st.get("Effect") != "Allow":
            continue
        if "NotAction" in st or "NotResource" in st:
            problems.append(f"{where} Statement[{i}]: NotAction/NotResource grants everything else")
        problems += [f"{where} Statement[{i}]: action {a!r} is more than bucket access" for a in actions
                     if not re.fullmatch(r"s3:(Get|Put|Delete)Object|s3:AbortMultipartUpload|s3:ListBucket", a or "")]
        problems += [f"{where} Statement[{i}]: resource {r!r} is not a bucket path" for r in resources
                     if not re.fullmatch(r"arn:aws:s3:::[\w.-]+(/[\w./-]+\*?)?", r or "")]
        if "s3:ListBucket" in actions and not (st.get("Condition") or {}).get("StringLike", {}).get("s3:prefix"):
            problems.append(f"{where} Statement[{i}]: s3:ListBucket without an s3:prefix condition lists the whole bucket")
    return problems


def identity_problems(config: dict) -> list[str]:
    """Where trials run, the node's cloud identity is the worker one and it reaches the bucket only; no node
    gets the provider's default identity (Ray's own: EC2/S3 full access, compute admin); metadata hop limit 1."""
    problems, provider = [], (config.get("provider") or {}).get("type")
    trial = trial_types(config)
    for name, node_type in config.get("available_node_types", {}).items():
        node, where = node_type.get("node_config") or {}, f"available_node_types.{name}.node_config"
        if provider == "aws":
            arn = (node.get("IamInstanceProfile") or {}).get("Arn", "")
            if not arn:
                problems.append(f"{where}.IamInstanceProfile: missing, so Ray attaches its default ray-autoscaler-v1 "
                                f"profile (EC2 and S3 full access)")
            elif name in trial and not arn.endswith("/ptx-ray-worker"):
                problems.append(f"{where}.IamInstanceProfile: trials run here under {arn!r}, not ptx-ray-worker")
            hop = (node.get("MetadataOptions") or {}).get("HttpPutResponseHopLimit")
            if name in trial and hop != 1:
                problems.append(f"{where}.MetadataOptions.HttpPutResponseHopLimit: {hop}, expected 1 where trials run")
        elif provider == "gcp":
            accounts = node.get("serviceAccounts") or []
            if not accounts:
                problems.append(f"{where}.serviceAccounts: missing, so Ray attaches ray-autoscaler-sa-v1 (compute admin)")
            for account in accounts if name in trial else []:
                if not account.get("email", "").startswith("ptx-ray-worker@"):
                    problems.append(f"{where}.serviceAccounts: trials run here as {account.get('email')!r}")
                extra = set(account.get("scopes") or []) - GCP_BUCKET_SCOPES
                if extra:
                    problems.append(f"{where}.serviceAccounts.scopes: {sorted(extra)} is more than bucket access")
    if provider == "aws" and trial:
        problems += aws_policy_problems(json.loads(AWS_WORKER_POLICY.read_text()), "cluster/iam/aws-worker-policy.json")
    return problems


AMI_PLACEHOLDER = "ami-CHANGE-ME"  # filled by `cluster/build.sh pin-ami`, refused by `build.sh check` and by EC2


def node_image_problems(config: dict) -> list[str]:
    """Every node boots a pinned machine image: an AMI id (or the placeholder build.sh fills), a dated GCE image
    (never an image family, which moves to each new release, nor `resolve:ssm:` ... /latest)."""
    problems = []
    for name, node_type in config.get("available_node_types", {}).items():
        node, where = node_type.get("node_config") or {}, f"available_node_types.{name}.node_config"
        if "ImageId" in node and not re.fullmatch(r"ami-[0-9a-f]{8,17}", node["ImageId"]) \
                and node["ImageId"] != AMI_PLACEHOLDER:
            problems.append(f"{where}.ImageId: {node['ImageId']!r} is not a pinned AMI id")
        for i, disk in enumerate(node.get("disks") or []):
            image = (disk.get("initializeParams") or {}).get("sourceImage", "")
            if "/family/" in image or not re.search(r"/images/[a-z0-9-]+-v\d{8}$", image):
                problems.append(f"{where}.disks[{i}].initializeParams.sourceImage: {image!r} is not a dated image")
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


def _worker_node(config: dict) -> dict:
    return config["available_node_types"]["gpu_1x"]["node_config"]


def _widen_worker_identity(config: dict) -> None:
    node = _worker_node(config)
    if "serviceAccounts" in node:
        node["serviceAccounts"][0]["scopes"] = ["https://www.googleapis.com/auth/cloud-platform"]
    else:
        node["MetadataOptions"]["HttpPutResponseHopLimit"] = 2


def _unpin_node_image(config: dict) -> None:
    node = _worker_node(config)
    if "ImageId" in node:
        node["ImageId"] = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base/latest/ami-id"
    else:
        disk = node["disks"][0]["initializeParams"]
        disk["sourceImage"] = disk["sourceImage"].rsplit("/", 1)[0] + "/family/common-cu128-ubuntu-2204-nvidia-570"


def test_aws_worker_policy_is_bucket_only():
    """The policy of the only identity trial code reaches on AWS: S3 object actions on the bucket prefix."""
    assert aws_policy_problems(json.loads(AWS_WORKER_POLICY.read_text()), "worker") == []
    for extra in ({"Effect": "Allow", "Action": "ec2:*", "Resource": "*"},
                  {"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::b/*"]},
                  {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "*"},
                  {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::b"]},
                  {"Effect": "Allow", "NotAction": ["iam:*"], "Action": ["s3:GetObject"],
                   "Resource": ["arn:aws:s3:::b/*"]}):
        assert aws_policy_problems({"Statement": [extra]}, "worker"), extra


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
        lambda c: c["available_node_types"][c["head_node_type"]]["resources"].update(CPU=4),
        lambda c: _worker_node(c).pop("IamInstanceProfile" if "IamInstanceProfile" in _worker_node(c)
                                      else "serviceAccounts"),
        lambda c: _widen_worker_identity(c),
        lambda c: c["head_start_ray_commands"].__setitem__(
            1, c["head_start_ray_commands"][1].replace(" --auth basic", "")),
        lambda c: c["worker_setup_commands"].__setitem__(
            0, c["worker_setup_commands"][0].replace("MLFLOW_TRACKING_USERNAME=ptx-writer", "MLFLOW_TRACKING_USERNAME=admin")),
        lambda c: _unpin_node_image(c),
    ],
    ids=["gpu-head", "one-gpu-type", "no-autoscaling", "public-dashboard", "auth-off", "literal-token",
         "no-token-mount", "other-image", "mlflow-on-loopback", "artifacts-on-head-disk", "sqlite-store",
         "cpu-head", "default-identity", "wide-identity", "mlflow-no-auth", "trials-as-admin", "unpinned-node-image"],
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


PTX_PLACEHOLDER = "CHANGE-ME.invalid/ptx:0.1.0"  # recorded over by cluster/build.sh, refused by `build.sh check`


def image_problems(images: dict[str, str | None]) -> list[str]:
    """Every image reference pinned by digest: the ptx image by the digest cluster/build.sh records after its push
    (or the one shipped placeholder it replaces, which no registry serves); the third-party services by release
    number and digest (the tag says which release, the digest fixes its bytes). Never latest, never a bare tag."""
    problems = []
    for where, image in images.items():
        if not image:
            problems.append(f"{where}: no image")
            continue
        name, _, digest = image.partition("@")
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
        third_party = _repository(image) in THIRD_PARTY
        if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            problems.append(f"{where}: {image!r} has a malformed digest")
        elif third_party and not (digest and tag and re.match(r"\d+\.\d+", tag)):
            problems.append(f"{where}: {image!r} must carry its release number and a digest (name:X.Y@sha256:...)")
        elif not third_party and not digest and image != PTX_PLACEHOLDER:
            problems.append(f"{where}: {image!r} is not pinned by digest (cluster/build.sh records it)")
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
    lambda images, k: images.update({"aws.yaml docker.image": "ghcr.io/acme/ptx@sha256:" + "ab" * 32}),
    lambda images, k: images.update({key: "ghcr.io/acme/ptx:0.1.0" for key, v in images.items() if "ptx" in v}),
    lambda images, k: images.update({key: v.replace(":0.1.0", ":latest") for key, v in images.items()}),
    lambda images, k: images.update({key: v.replace(":0.1.0", "@sha256:abc") for key, v in images.items()}),
    lambda images, k: k["images"][0].update(name="ghcr.io/acme/other"),
    lambda images, k: images.update({"db": "postgres:latest"}),
    lambda images, k: images.update({"db": "postgres:17.6-bookworm"}),
    lambda images, k: images.update({"db": "postgres@sha256:" + "ab" * 32}),
], ids=["two-images", "ptx-by-tag", "latest", "bad-digest", "kustomize-misses", "latest-postgres",
        "postgres-by-tag", "postgres-no-release"])
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
            problems += ray_identity_problems(label, spec)
        if kind == "Deployment" and (doc.get("metadata") or {}).get("name") == "mlflow":
            problems += mlflow_server_problems(label, doc)
        for where, pod in pod_specs(doc):
            for container in pod.get("containers") or []:
                problems += command_secret_problems(f"{label}/{where}/{container.get('name')}", container)
        if kind == "RayJob":
            problems += ray_job_problems(label, doc["spec"])
    return problems


ADMIN_KEYS = {"username", "password"}  # ptx-mlflow-auth's admin keys: only the MLflow pod may read them
API_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def _secret_keys(container: dict) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})}


def ray_identity_problems(label: str, spec: dict) -> list[str]:
    """Trial code runs in every Ray container (job drivers on the head, trials on the workers): none of them
    holds a Kubernetes API token (only the autoscaler sidecar does) or the MLflow admin login."""
    problems = []
    groups = [("head", spec.get("headGroupSpec") or {})] + [
        (g.get("groupName"), g) for g in spec.get("workerGroupSpecs") or []]
    for name, group in groups:
        pod = (group.get("template") or {}).get("spec") or {}
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{label}/{name}: automountServiceAccountToken is not false: trial code could use the "
                            f"Kubernetes API as {pod.get('serviceAccountName') or 'the autoscaler'}")
        for container in pod.get("containers") or []:
            if any(m.get("mountPath", "").startswith(API_TOKEN_PATH) for m in container.get("volumeMounts") or []):
                problems.append(f"{label}/{name}/{container.get('name')}: mounts the Kubernetes API token")
            for var, (secret, key) in _secret_keys(container).items():
                if secret == "ptx-mlflow-auth" and key in ADMIN_KEYS:
                    problems.append(f"{label}/{name}/{container.get('name')}: env {var} is the MLflow admin login "
                                    f"(ptx-mlflow-auth/{key}); Ray pods log in as the writer account")
    mounts = (spec.get("autoscalerOptions") or {}).get("volumeMounts") or []
    if spec.get("enableInTreeAutoscaling") and not any(m.get("mountPath") == API_TOKEN_PATH for m in mounts):
        problems.append(f"{label}: autoscalerOptions.volumeMounts must give the autoscaler (alone) its API token")
    return problems


def mlflow_server_problems(label: str, doc: dict) -> list[str]:
    """The MLflow server authenticates every request, and keeps its artifacts in object storage (a volume of the
    kustomization would be deleted with `kubectl delete -k`, prompts and all)."""
    pod = doc["spec"]["template"]["spec"]
    container = pod["containers"][0]
    line = " ".join(container.get("command") or []) + " " + " ".join(container.get("args") or [])
    env = {e["name"]: e.get("value", "") for e in container.get("env") or []}
    problems = []
    if not re.search(r"--auth[= ]basic\b|--app-name[= ]basic-auth\b", line):
        problems.append(f"{label}: MLflow runs without authentication (--auth=basic)")
    dest = re.search(r"--artifacts-destination[= ](\S+)", line)
    dest = dest.group(1) if dest else env.get("MLFLOW_ARTIFACTS_DESTINATION") or env.get("PTX_MLFLOW_ARTIFACTS_DESTINATION")
    if not dest or not re.match(r"(s3|gs)://", dest):
        problems.append(f"{label}: artifacts go to {dest!r}, not object storage: teardown would delete them")
    if pod.get("volumes") and any("persistentVolumeClaim" in v for v in pod["volumes"]):
        problems.append(f"{label}: a PersistentVolumeClaim of the kustomization holds MLflow data")
    return problems


def command_secret_problems(where: str, container: dict) -> list[str]:
    """No secret on a command line (/proc/PID/cmdline is readable by every process of the node)."""
    secret_vars = set(_secret_keys(container))
    line = " ".join(container.get("command") or []) + " " + " ".join(container.get("args") or [])
    return [f"{where}: secret env {v} is expanded into the command line" for v in sorted(secret_vars)
            if f"$({v})" in line]


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


def teardown_problems(kustomization: dict, docs_by_file: dict[str, list[dict]]) -> list[str]:
    """`kubectl delete -k cluster/k8s` deletes every object the kustomization lists: no PersistentVolumeClaim of
    it may hold data (a StatefulSet's volumeClaimTemplates survive it; PostgreSQL's and Redis's live there)."""
    problems = []
    for resource in kustomization.get("resources") or []:
        for doc in docs_by_file.get(resource, []):
            if doc.get("kind") == "PersistentVolumeClaim":
                problems.append(f"{resource}: PersistentVolumeClaim/{doc['metadata']['name']} is deleted by "
                                f"`kubectl delete -k`; keep artifacts in object storage")
    return problems


def chart_problems(texts: dict[str, str]) -> list[str]:
    """Every Helm chart the walkthrough installs is pinned to a version."""
    problems = []
    for name, text in texts.items():
        for line in re.findall(r"helm (?:install|upgrade)[^\n]*(?:\\\n[^\n]*)*", text):
            if not re.search(r"--version \d+\.\d+\.\d+", line):
                problems.append(f"{name}: `{line.splitlines()[0].strip()}` installs a chart without --version")
    return problems


def _docs_by_file() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def _cluster_texts() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in CLUSTER.rglob("*") if p.is_file()}


def test_k8s_manifests_are_internal_non_root_and_gpu():
    assert k8s_problems(load_k8s_docs()) == []


def test_nothing_teardown_deletes_holds_data_and_charts_are_pinned():
    assert teardown_problems(load_yaml(K8S / "kustomization.yaml"), _docs_by_file()) == []
    assert chart_problems(_cluster_texts()) == []
    with_claim = _docs_by_file()
    with_claim["mlflow.yaml"].append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                      "metadata": {"name": "mlflow-data"}})
    assert teardown_problems(load_yaml(K8S / "kustomization.yaml"), with_claim)
    texts = _cluster_texts()
    texts["cluster/k8s/monitoring.yaml"] = texts["cluster/k8s/monitoring.yaml"].replace(" --version 82.10.1", "")
    assert chart_problems(texts) == ["cluster/k8s/monitoring.yaml: `helm install prometheus prometheus-community/"
                                     "kube-prometheus-stack -n monitoring --create-namespace` installs a chart "
                                     "without --version"]


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
        lambda docs: _ray_head(_first(docs, "RayJob"))["template"]["spec"].pop("automountServiceAccountToken"),
        lambda docs: _ray_head(_first(docs, "RayCluster"))["template"]["spec"]["containers"][0].setdefault(
            "volumeMounts", []).append({"name": "autoscaler-api-token", "mountPath": API_TOKEN_PATH}),
        lambda docs: _first(docs, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        ["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"].update(key="username"),
        lambda docs: _first(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].remove(
            "--auth=basic"),
        lambda docs: _first(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0].update(args=[
            a for a in _first(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
            if not a.startswith("--artifacts-destination")] + ["--artifacts-destination=/mlflow/artifacts"]),
        lambda docs: next(d for d in docs if d.get("kind") == "StatefulSet" and d["metadata"]["name"] == "redis")
        ["spec"]["template"]["spec"]["containers"][0].update(args=["--requirepass", "$(REDIS_PASSWORD)"]),
        lambda docs: next(d for d in docs if d.get("kind") == "StatefulSet" and d["metadata"]["name"] == "redis")
        ["spec"]["template"]["spec"]["containers"][0].update(image="redis:7.4.5-bookworm"),
    ],
    ids=["lb-service", "nodeport-head", "implicit-service-type", "public-dashboard", "root-container",
         "plain-password", "no-gpu", "auth-off", "unknown-study", "shell-entrypoint", "local-storage", "committed-secret",
         "no-scale-to-zero", "head-api-token", "token-in-ray-container", "trials-as-mlflow-admin", "mlflow-no-auth",
         "artifacts-on-pod-disk", "password-on-command-line", "redis-by-tag"],
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


# ------------------------------------------------------------------------ the whole cluster, signed off
def sign_off_problems(launchers: dict[str, dict], docs_by_file: dict[str, list[dict]], kustomization: dict,
                      texts: dict[str, str]) -> list[str]:
    """Every check above over every launcher and manifest file: what a platform team asks before handing over a
    cloud account (no trials beside the head's identity, trial identities that reach the bucket only, MLflow
    with authentication, no data on what teardown deletes, every image/chart/machine image pinned)."""
    problems = []
    for name, config in launchers.items():
        problems += [f"{name}: {p}" for p in launcher_problems(config)]
    docs = [d for file_docs in docs_by_file.values() for d in file_docs if d.get("kind")]
    problems += k8s_problems(docs)
    problems += teardown_problems(kustomization, docs_by_file)
    problems += chart_problems(texts)
    problems += one_image_problems(all_images(launchers, docs, kustomization), kustomization)
    return problems


def _everything() -> tuple[dict, dict, dict, dict]:
    return ({p.name: load_yaml(p) for p in LAUNCHERS}, _docs_by_file(), load_yaml(K8S / "kustomization.yaml"),
            _cluster_texts())


def test_every_launcher_and_manifest_signs_off():
    launchers, docs_by_file, kustomization, texts = _everything()
    assert set(launchers) == {"aws.yaml", "gcp.yaml"} and len(docs_by_file) >= 10
    assert sign_off_problems(launchers, docs_by_file, kustomization, texts) == []


def _mlflow_deployment(docs_by_file: dict) -> dict:
    return next(d for d in docs_by_file["mlflow.yaml"] if d.get("kind") == "Deployment")


SIGN_OFF_MUTATIONS = {
    "head-offers-cpus": (lambda la, d, k, t: la["gcp.yaml"]["available_node_types"]["head_cpu"]["resources"]
                         .update(CPU=4), "resources.CPU: the head must offer 0 CPUs"),
    "trial-identity-beyond-bucket": (lambda la, d, k, t: la["aws.yaml"]["available_node_types"]["gpu_8x"]
                                     ["node_config"]["IamInstanceProfile"].update(
                                         Arn="arn:aws:iam::1:instance-profile/ray-autoscaler-v1"),
                                     "trials run here under"),
    "mlflow-without-auth": (lambda la, d, k, t: _mlflow_deployment(d)["spec"]["template"]["spec"]["containers"][0]
                            ["args"].remove("--auth=basic"), "MLflow runs without authentication"),
    "artifacts-on-teardown-volume": (lambda la, d, k, t: d["mlflow.yaml"].append(
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "mlflow-data"}}),
        "is deleted by `kubectl delete -k`"),
    "image-without-digest": (lambda la, d, k, t: next(x for x in d["postgres.yaml"] if x.get("kind") == "StatefulSet")
                             ["spec"]["template"]["spec"]["containers"][0].update(image="postgres:17.6-bookworm"),
                             "must carry its release number and a digest"),
    "chart-without-version": (lambda la, d, k, t: t.update({"cluster/k8s/monitoring.yaml": t[
        "cluster/k8s/monitoring.yaml"].replace(" --version 82.10.1", "")}), "installs a chart without --version"),
    "machine-image-family": (lambda la, d, k, t: _unpin_node_image(la["gcp.yaml"]), "is not a dated image"),
}


@pytest.mark.parametrize("name", sorted(SIGN_OFF_MUTATIONS))
def test_sign_off_names_the_file_and_field_that_fails(name):
    everything = copy.deepcopy(_everything())
    mutate, expected = SIGN_OFF_MUTATIONS[name]
    mutate(*everything)
    problems = sign_off_problems(*everything)
    assert any(expected in p for p in problems), problems


def test_build_script_records_the_pushed_digest_and_check_refuses_placeholders(tmp_path):
    """cluster/build.sh writes IMAGE@DIGEST over every image of a copy of cluster/, after which every reference
    is digest-pinned; `build.sh check` refuses the shipped placeholders and accepts the recorded tree."""
    import shutil
    import subprocess

    shutil.copytree(CLUSTER, tmp_path / "cluster")
    script = tmp_path / "cluster" / "build.sh"
    check = subprocess.run(["bash", str(script), "check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 3 and "cluster/aws.yaml:" in check.stderr and "ImageId: ami-CHANGE-ME" in check.stderr
    digest = "sha256:" + "0123456789abcdef" * 4
    env = {"PATH": "/usr/bin:/bin", "IMAGE": "ghcr.io/acme/ptx", "DIGEST": digest}
    done = subprocess.run(["bash", str(script), "record"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    copy_k8s = tmp_path / "cluster" / "k8s"
    docs = [d for p in sorted(copy_k8s.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    launchers = {p.name: load_yaml(p) for p in sorted((tmp_path / "cluster").glob("*.yaml"))}
    kustomization = load_yaml(copy_k8s / "kustomization.yaml")
    images = all_images(launchers, docs, kustomization)
    ptx_images = {v for v in images.values() if _repository(v) not in THIRD_PARTY}
    assert ptx_images == {f"ghcr.io/acme/ptx@{digest}"}
    assert one_image_problems(images, kustomization) == []
    aws = (tmp_path / "cluster" / "aws.yaml").read_text().replace("ami-CHANGE-ME", "ami-0123456789abcdef0")
    (tmp_path / "cluster" / "aws.yaml").write_text(aws)
    check = subprocess.run(["bash", str(script), "check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
