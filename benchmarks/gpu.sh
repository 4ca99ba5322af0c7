#!/usr/bin/env bash
# GPU benchmarks of the prompt-tuning train step (ptx vs PEFT) on random-weight models of real shapes, plus the
# GPU ablations (bf16 autocast vs fp32, SDPA vs eager, decoder-only prompt-once vs one pass), after the CUDA tests
# (tests/test_gpu.py), the grouped step of many prompts (roberta-base K = 4, 8, 16; roberta-large K = 4, 8, 16) with
# each peak beside the memory model's prediction, the CUDA context and the paper plans on this GPU's memory.
# About 10 minutes on one H100/H200. Writes every figure to $OUT/gpu_results.json (or
# benchmarks/gpu_results.json without $OUT).
#
#   bash benchmarks/gpu.sh                        # the real run (needs CUDA)
#   bash benchmarks/gpu.sh --device cpu --steps 2 # dry run: tiny backbones on CPU, catches breakage, no figures
#
# MFU = achieved model FLOP/s / peak, with model FLOPs = 4 x (matmul parameters) x tokens per step (forward and
# activation gradients, no weight gradients; output head and attention scores left out) and peak = 989 TFLOP/s
# (H100 SXM dense bf16; the H200 has the same peak). Change it with PEAK_TFLOPS=... . `mfu` counts the tokens a
# variant really runs (ptx's decoder-only path runs the prompt once per batch, not per example); `effective_mfu`
# counts the one-pass step's tokens, B x (prompt + text), for every variant.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
STEPS=20
WARMUP=3
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown argument '$1' (expected --device, --steps, --warmup)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
DEST="${OUT:-benchmarks}"
PARTS="$(mktemp -d)"
export PTX_CACHE_DIR="${PTX_CACHE_DIR:-$PARTS/cache}"
export TOKENIZERS_PARALLELISM=false

if [ "$DEVICE" = cpu ]; then
  # dry run: the same code paths on tiny backbones, so a syntax or API error shows up without a GPU
  DTYPE=fp32
  MAIN=("tiny-roberta 4 8 16" "random:t5-small 4 8 16" "tiny-llama 4 8 16")
  ROBERTA=tiny-roberta
  LLAMA=tiny-llama
  ABL_SHAPE=(4 8 16)
else
  DTYPE=bf16  # fp32 weights under bf16 autocast: ptx's train_prompt on CUDA
  #     backbone              batch prompt text
  MAIN=("random:roberta-base  32 100 128"
        "random:roberta-large 16 100 128"
        "random:t5-base       32 100 128"
        "random:llama-1b      8  100 256")
  ROBERTA=random:roberta-base
  LLAMA=random:llama-1b
  ABL_SHAPE=(32 100 128)
fi

bench() {  # name, then bench_train_step.py arguments
  local name="$1"; shift
  echo "== $name: $*"
  "$PY" benchmarks/bench_train_step.py --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" \
    --peak-tflops "$PEAK_TFLOPS" --json "$PARTS/$name.json" "$@" || echo "!! $name failed" >&2
}

start=$(date +%s)
if [ "$DEVICE" != cpu ]; then  # correctness first: CUDA scores equal the CPU's, bf16 within tolerance
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py || echo "!! GPU tests failed" >&2
fi
if [ "$DEVICE" = cpu ]; then  # the real run's random-weight configs, built on the meta device (no memory, no time)
  "$PY" - <<'EOF'
import sys
import torch
sys.path.insert(0, "benchmarks")
from bench_train_step import load, step_flops
for name in ["roberta-base", "roberta-large", "t5-base", "llama-1b"]:
    b = load("random:" + name, "meta", torch.float32)
    print(f"config check {name}: {b.kind.value}, {sum(p.numel() for p in b.model.parameters()) / 1e6:.0f}M params, "
          f"{step_flops(b, 8, 100, 256) / 1e12:.2f} model TFLOP per one-pass step of 8 x (100 + 256) tokens")
EOF
fi
for row in "${MAIN[@]}"; do
  read -r bb bs n t <<<"$row"
  bench "step-${bb#random:}" --backbone "$bb" --batch-size "$bs" --prompt-length "$n" --seq-len "$t" \
    --dtype "$DTYPE" --variants ptx,peft,peft-lean
done
bench "ablation-bf16" --backbone "$ROBERTA" --batch-size "${ABL_SHAPE[0]}" --prompt-length "${ABL_SHAPE[1]}" \
  --seq-len "${ABL_SHAPE[2]}" --dtype fp32 --variants ptx,peft
bench "ablation-attn" --backbone "$ROBERTA" --batch-size "${ABL_SHAPE[0]}" --prompt-length "${ABL_SHAPE[1]}" \
  --seq-len "${ABL_SHAPE[2]}" --dtype "$DTYPE" --ablation attn
read -r _ lbs ln lt <<<"${MAIN[${#MAIN[@]}-1]}"
bench "ablation-prompt-once" --backbone "$LLAMA" --batch-size "$lbs" --prompt-length "$ln" --seq-len "$lt" \
  --dtype "$DTYPE" --ablation prompt-once
bench "ablation-head" --backbone "$LLAMA" --batch-size "$lbs" --prompt-length "$ln" --seq-len "$lt" \
  --dtype "$DTYPE" --ablation head

# many prompts, one backbone (issues 20, 30): K prompts grouped (all in one pass) vs one at a time (ptx, PEFT) at
# the paper's shape, batch 16 x (100 + 128); targets on a GPU: a group >= 3x PEFT's aggregate examples/s and
# >= 40% MFU. Each run also records the peak (torch.cuda.max_memory_allocated above the loaded weights) of the
# grouped step and of one run beside ptx.memory's prediction (predicted_mib, measured_vs_predicted).
if [ "$DEVICE" = cpu ]; then
  MP=("tiny-roberta 2 8 16")
else
  #   backbone              K  batch text
  MP=("random:roberta-base   4 16 128"
      "random:roberta-base   8 16 128"
      "random:roberta-base  16 16 128"
      "random:roberta-large  4 16 128"
      "random:roberta-large  8 16 128"
      "random:roberta-large 16 16 128")
fi
for row in "${MP[@]}"; do
  read -r bb k bs t <<<"$row"
  name="multiprompt-${bb#random:}-k$k"
  echo "== $name"
  "$PY" benchmarks/bench_multiprompt.py --backbone "$bb" --prompts "$k" --batch-size "$bs" --seq-len "$t" \
    --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" --peak-tflops "$PEAK_TFLOPS" --json "$PARTS/$name.json" \
    || echo "!! $name failed" >&2
done

# the CUDA context a trial process pays before its first tensor (ptx.memory.CUDA_CONTEXT_BYTES counts 600 MiB),
# and the paper plans on this GPU's memory: `ptx run --dry-run` with cluster.gpu_memory_mib set to it
if [ "$DEVICE" != cpu ]; then
  "$PY" - "$PARTS/cuda_context.json" <<'EOF'
import json, sys
import torch
torch.zeros(1, device="cuda")
free, total = torch.cuda.mem_get_info()
used = total - free - torch.cuda.memory_reserved()
rec = {"total_mib": total / 2**20, "context_mib": used / 2**20, "device": torch.cuda.get_device_name()}
print(f"CUDA context: {rec['context_mib']:.0f} MiB used outside torch's allocator (of {rec['total_mib']:.0f} MiB)")
json.dump({"results": [rec]}, open(sys.argv[1], "w"))
EOF
  MIB_TOTAL=$("$PY" -c "import torch; print(int(torch.cuda.mem_get_info()[1] / 2**20))")
  for spec in experiments/paper_*.yaml; do
    "$PY" -m ptx run "$spec" --dry-run --set cluster.gpu_memory_mib="$MIB_TOTAL" --set cluster.gpus=1 \
      | grep -A2 "GPU plan" || echo "!! dry run of $spec failed" >&2
  done
fi

mkdir -p "$DEST"
"$PY" - "$PARTS" "$DEST/gpu_results.json" "$start" <<'EOF'
import json, sys, time
from pathlib import Path
parts, dest, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}
summary = []
for name, run in runs.items():
    args = run.get("args", {})
    for r in run.get("results", []):
        if "error" in r:
            summary.append({"run": name, "variant": r.get("variant"), "error": r["error"]})
            continue
        shared = ("backbone", "dtype", "batch_size", "prompt_length", "seq_len", "prompts")  # a run's own arguments
        row = {"run": name, **{k: r.get(k, args.get(k) if k in shared else None) for k in (
            "variant", "backbone", "dtype", "batch_size", "prompt_length", "seq_len", "prompts", "members_per_pass",
            "examples_per_s", "step_s", "peak_mib", "predicted_mib", "measured_vs_predicted", "achieved_tflops",
            "mfu", "effective_mfu", "speed_ratio_base_over_this", "base", "speed_vs_ptx", "speed_vs_peft",
            "memory_vs_one_run", "context_mib", "total_mib")}}
        summary.append({k: v for k, v in row.items() if v is not None})
out = {"wall_s": int(time.time()) - start, "summary": summary, "runs": runs}
dest.write_text(json.dumps(out, indent=1, sort_keys=True, default=str))
print(f"wrote {dest} ({len(summary)} rows, {out['wall_s']}s)")
for s in summary:
    print(s)
EOF
rm -rf "$PARTS"
