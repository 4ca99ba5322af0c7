#!/usr/bin/env bash
# Build the ptx cluster image (cluster/Dockerfile), push it, and pin every node and pod to the pushed digest.
#
#   IMAGE=ghcr.io/<your-org>/ptx TAG=0.1.0 cluster/build.sh          build, push, record the digest
#   IMAGE=ghcr.io/<your-org>/ptx DIGEST=sha256:... cluster/build.sh record   record a digest pushed before
#   cluster/build.sh pin-ami                 record the region's current Deep Learning Base AMI in aws.yaml
#   cluster/build.sh check                   refuse (exit 3) while a placeholder image or AMI is left
#
# Environment (all optional):
#   IMAGE             repository to tag and push, one you control           (required, no default)
#   TAG               image tag; use an immutable one  (default 0.1.0, the version in pyproject.toml)
#   PUSH              1: push after building, 0: build only              (default 1)
#   PLATFORM          target platform                                    (default linux/amd64: the GPU VMs)
#   TORCH_INDEX_URL   PyTorch CUDA wheel index for torch 2.13.0          (default: the Dockerfile's)
#   BASE_IMAGE        CUDA base image                                    (default: the Dockerfile's)
#   WITH_DEMO_ASSETS  1: also install the Makefile's ASSETS (the demo's shipped weights and data)   (default 0)
#
# Log in to the registry first, with a token that never lands in a file or in shell history, e.g.
#   printf '%s' "$GHCR_TOKEN" | docker login ghcr.io -u <user> --password-stdin
# After the push the script writes IMAGE@DIGEST over the image of cluster/aws.yaml, cluster/gcp.yaml and every
# manifest of cluster/k8s/ (the kustomization's `images:` entry included): a tag can be re-pushed, a digest
# cannot, so every node and pod runs the bytes that were tested. Commit the result.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PLACEHOLDER_IMAGE="CHANGE-ME.invalid/ptx:0.1.0"
PLACEHOLDER_AMI="ami-CHANGE-ME"
AMI_PARAMETER="/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
MANIFESTS=(cluster/aws.yaml cluster/gcp.yaml cluster/k8s/*.yaml)

# Replace the image of every launcher and manifest (the placeholder, or a digest recorded before) by $1.
record_image() {
    local pinned="$1" repo="${1%@*}" digest="${1#*@}"
    python3 - "$pinned" "$repo" "$digest" "${MANIFESTS[@]}" <<'PY'
import re, sys
pinned, repo, digest, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
# the shipped placeholder, or whatever an earlier run recorded (repository@sha256:...)
old = re.compile(r"CHANGE-ME\.invalid/ptx:[\w.-]+|[\w.-]+(?::\d+)?(?:/[\w.-]+)*/ptx@sha256:[0-9a-f]{64}")
for path in files:
    text = open(path).read()
    new = re.sub(r"(?m)^(\s*(?:-\s+)?image:\s*)(\S+)\s*$",
                 lambda m: m.group(1) + (pinned if old.fullmatch(m.group(2)) else m.group(2)), text)
    if path.endswith("kustomization.yaml"):
        new = re.sub(r"(?ms)^images:\n.*\Z", f"images:\n  - name: {repo}\n    digest: {digest}\n", new)
    if new != text:
        with open(path + ".tmp", "w") as f:
            f.write(new)
        import os
        os.replace(path + ".tmp", path)
        print(f"build.sh: pinned {path} to {pinned}")
PY
}

if [ "${1:-}" = "check" ]; then
    left="$(grep -nE "(image|ImageId): *($PLACEHOLDER_IMAGE|$PLACEHOLDER_AMI)|name: CHANGE-ME.invalid/ptx" "${MANIFESTS[@]}" || true)"
    if [ -n "$left" ]; then
        echo "build.sh check: unfilled placeholders (run cluster/build.sh, and build.sh pin-ami for AWS):" >&2
        echo "$left" >&2
        exit 3
    fi
    echo "build.sh check: every image is pinned by digest and every AMI by id"
    exit 0
fi
if [ "${1:-}" = "pin-ami" ]; then
    region="$(sed -n 's/^  region: //p' cluster/aws.yaml)"
    ami="$(aws ssm get-parameter --region "$region" --name "$AMI_PARAMETER" --query Parameter.Value --output text)"
    [[ "$ami" =~ ^ami-[0-9a-f]{8,17}$ ]] || { echo "build.sh pin-ami: got '$ami' from $AMI_PARAMETER" >&2; exit 2; }
    sed -i -E "s/^(      ImageId: ).*/\1$ami/" cluster/aws.yaml
    echo "build.sh pin-ami: cluster/aws.yaml boots $ami ($region)"
    exit 0
fi

IMAGE="${IMAGE:-}"
TAG="${TAG:-0.1.0}"
PUSH="${PUSH:-1}"
PLATFORM="${PLATFORM:-linux/amd64}"
WITH_DEMO_ASSETS="${WITH_DEMO_ASSETS:-0}"

case "$IMAGE" in
    "" | *CHANGE-ME* | *.invalid/*)
        echo "build.sh: set IMAGE to a repository you control, e.g. IMAGE=ghcr.io/<your-org>/ptx (got '${IMAGE}')" >&2
        exit 2 ;;
esac
if [ "${1:-}" = "record" ]; then
    [[ "${DIGEST:-}" =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "build.sh record: set DIGEST=sha256:<64 hex> (got '${DIGEST:-}')" >&2; exit 2; }
    record_image "${IMAGE}@${DIGEST}"
    exit 0
fi
if [ "$TAG" = "latest" ]; then
    echo "build.sh: refusing TAG=latest; nodes must all run the same, known image (use a version or a sha)" >&2
    exit 2
fi

git_sha="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then
    echo "build.sh: warning: the working tree has uncommitted changes; the image will not match $git_sha" >&2
    git_sha="${git_sha}-dirty"
fi

build_args=(--build-arg "PTX_GIT_SHA=${git_sha}")
if [ -n "${TORCH_INDEX_URL:-}" ]; then build_args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL}"); fi
if [ -n "${BASE_IMAGE:-}" ]; then build_args+=(--build-arg "BASE_IMAGE=${BASE_IMAGE}"); fi
if [ "$WITH_DEMO_ASSETS" = "1" ]; then
    # One list, kept in the Makefile: read it rather than copy it.
    assets="$(sed -n 's/^ASSETS := //p' Makefile)"
    [ -n "$assets" ] || { echo "build.sh: no 'ASSETS := ...' line in the Makefile" >&2; exit 2; }
    build_args+=(--build-arg "PTX_ASSETS=${assets}")
fi

echo "build.sh: building ${IMAGE}:${TAG} (${PLATFORM}, commit ${git_sha})"
DOCKER_BUILDKIT=1 docker build \
    --platform "$PLATFORM" \
    --file cluster/Dockerfile \
    "${build_args[@]}" \
    --tag "${IMAGE}:${TAG}" \
    .

if [ "$PUSH" = "1" ]; then
    docker push "${IMAGE}:${TAG}"
    # the registry's digest of what was just pushed (RepoDigests holds repository@sha256:...)
    pinned="$(docker inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "${IMAGE}:${TAG}" | grep -m1 "^${IMAGE}@sha256:" || true)"
    [ -n "$pinned" ] || { echo "build.sh: pushed ${IMAGE}:${TAG} but found no digest for it" >&2; exit 1; }
    echo "build.sh: pushed ${IMAGE}:${TAG} = ${pinned}"
    record_image "$pinned"
else
    echo "build.sh: built ${IMAGE}:${TAG} (not pushed, nothing recorded; PUSH=1 to push)"
fi
