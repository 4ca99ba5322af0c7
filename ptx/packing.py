"""How many trials a node runs at once, from the node's declared Ray resources and a trial's request.

Pure arithmetic, no Ray: the same numbers for the cluster files (tests read aws.yaml, gcp.yaml and the KubeRay
manifests) and for a live cluster (`ptx run --dry-run --address ...` reads the alive nodes).
"""

import math

EPS = 1e-9  # Ray keeps resource amounts in 1/10000 units: 0.25 * 4 must count as exactly 1


def ray_request(resources: dict) -> dict:
    """A spec's `resources` ({cpu, gpu, custom}) -> Ray resource names and amounts, zero amounts dropped."""
    need = {"CPU": float(resources.get("cpu", 1)), "GPU": float(resources.get("gpu", 0) or 0)}
    need.update({k: float(v) for k, v in (resources.get("custom") or {}).items()})
    return {k: v for k, v in need.items() if v > 0}


def trials_per_node(need: dict, node: dict) -> tuple[int, str | None]:
    """(trials that fit at once on `node`, the resource that bounds them); a fractional GPU stays on one GPU."""
    best, limit = math.inf, None
    for name, amount in sorted(need.items(), key=lambda kv: kv[0] != "GPU"):  # a tie names the GPU
        have = float(node.get(name, 0))
        if name == "GPU" and amount < 1:
            fit = math.floor(1 / amount + EPS) * math.floor(have + EPS)  # fractions never span two GPUs
        else:
            fit = math.floor(have / amount + EPS)
        if fit < best:
            best, limit = fit, name
    return (0, limit) if best is math.inf else (int(best), limit)


def packing(resources: dict, node: dict) -> dict:
    """Trials at once, trials per GPU (None on a GPU-less node) and the bounding resource, for one node."""
    trials, limit = trials_per_node(ray_request(resources), node)
    gpus = float(node.get("GPU", 0))
    return {"trials": trials, "per_gpu": trials / gpus if gpus else None, "limit": limit}
