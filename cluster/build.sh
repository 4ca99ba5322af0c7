#!/usr/bin/env bash
# Build the ptx cluster image (cluster/Dockerfile) and push it.
#
#   IMAGE=ghcr.io/<your-org>/ptx TAG=0.1.0 cluster/build.sh
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
# Then point cluster/aws.yaml, cluster/gcp.yaml and cluster/k8s/ at "$IMAGE:$TAG" (or, better, at the digest
# printed at the end).
set -euo pipefail

IMAGE="${IMAGE:-}"
TAG="${TAG:-0.1.0}"
PUSH="${PUSH:-1}"
PLATFORM="${PLATFORM:-linux/amd64}"
WITH_DEMO_ASSETS="${WITH_DEMO_ASSETS:-0}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

case "$IMAGE" in
    "" | *CHANGE-ME* | *.invalid/*)
        echo "build.sh: set IMAGE to a repository you control, e.g. IMAGE=ghcr.io/<your-org>/ptx (got '${IMAGE}')" >&2
        exit 2 ;;
esac
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
    digest="$(docker inspect --format '{{index .RepoDigests 0}}' "${IMAGE}:${TAG}" 2>/dev/null || true)"
    echo "build.sh: pushed ${IMAGE}:${TAG}"
    if [ -n "$digest" ]; then echo "build.sh: pin the clusters to ${digest}"; fi
else
    echo "build.sh: built ${IMAGE}:${TAG} (not pushed; PUSH=1 to push)"
fi
