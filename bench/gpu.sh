#!/usr/bin/env bash
# The whole ours-vs-PyTorch comparison (bench/gpu.py): on one GPU in at most 8 minutes (one H200), or with
# --small every kind of case at tiny sizes on the CPU (1.5-2.5 minutes on the 2-core machine; tests/test_bench.py).
#
#   bash bench/gpu.sh [--small] [OUT.jsonl] [-- ARGS]
#
# ARGS go to python -m bench.gpu, e.g. `-- --only "vit_h"` to run only the cases whose label names vit_h (a
# second session's way to finish what a spent time budget left out: their lines say "skipped").
# OUT.jsonl (default: $OUT/bench_gpu.jsonl where $OUT is set, else ./bench_gpu.jsonl) gets one JSON line per
# case; the Markdown table (the README's) goes to stdout at the end and to OUT.jsonl's .md sibling. Neither
# file may exist beforehand: nothing is overwritten. Needs jax (any version with a CUDA build on a GPU machine),
# flax, optax, torch, torchvision, segment-anything and segment-anything-hq.
#
# Flags, set here before JAX starts:
#   XLA_FLAGS+=--xla_backend_extra_options=-nvptx-allow-ftz-atomics (GPU only). It lets XLA lower a float32
#     atomic add (the deformable convolution's input gradient, a scatter-add) to the hardware's atom.add.f32,
#     which flushes subnormals to zero; without it LLVM emits a compare-and-swap loop (jax 0.10.2: several
#     times slower). It is not a torch-only disadvantage: torch has no such switch because it needs none,
#     CUDA's atomicAdd(float*) in torchvision's kernel already is that flushing instruction. So the flag makes
#     both sides do the same atomic arithmetic (details: bench/flags.py). Ordinary arithmetic is unaffected.
#   XLA_PYTHON_CLIENT_PREALLOCATE=false: JAX and torch share one GPU in one process; JAX would otherwise take
#     75% of its memory up front and leave torch too little for vit_h at batch 8.
#   Precision: fp32 cases run true fp32 on both sides (JAX "highest", torch with TF32 off); bf16 cases bf16 on
#     both sides. Threads (CPU): torch gets as many as XLA's CPU client uses.
set -euo pipefail

usage="usage: bash bench/gpu.sh [--small] [OUT.jsonl] [-- ARGS for python -m bench.gpu]"
small=()
out=""
while [[ $# -gt 0 ]]; do
  arg="$1"; shift
  case "$arg" in
    --) break ;;
    --small) small=(--small) ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "gpu.sh: unknown option '$arg'; $usage" >&2; exit 2 ;;
    *) [[ -z "$out" ]] || { echo "gpu.sh: more than one output file given; $usage" >&2; exit 2; }; out="$arg" ;;
  esac
done
extra=("$@")
if [[ -z "$out" ]]; then out="${OUT:+$OUT/}bench_gpu.jsonl"; fi
table="${out%.jsonl}.md"
for f in "$out" "$table"; do
  if [[ -e "$f" ]]; then echo "gpu.sh: $f exists; move it away or name another output file" >&2; exit 2; fi
done
if [[ ! -d "$(dirname "$out")" ]]; then echo "gpu.sh: no folder $(dirname "$out") for $out; create it first" >&2; exit 2; fi
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
table="$(cd "$(dirname "$table")" && pwd)/$(basename "$table")"

cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [[ ${#small[@]} -gt 0 ]]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""   # both sides on the CPU, even on a GPU machine
  limit=600
  budget=540
else
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_extra_options=-nvptx-allow-ftz-atomics"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  limit=450    # hard stop (+20 s to end): what ran is kept and tabulated; under 8 minutes with the checks
  budget=390   # no case starts after this
fi
missing=$(python - <<'PY'
import importlib.util
names = ["jax", "flax", "optax", "torch", "torchvision", "segment_anything", "segment_anything_hq"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
PY
)
if [[ -n "$missing" ]]; then echo "gpu.sh: missing Python packages: $missing; install them (requirements-dev.txt)" >&2; exit 2; fi

python -c 'import jax, torch; print(f"jax {jax.__version__} on {jax.devices()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")' >&2
status=0
timeout --signal=TERM --kill-after=20 "$limit" \
  python -m bench.gpu "${small[@]}" --out "$out" --table "$table" --budget-s "$budget" "${extra[@]}" || status=$?
echo "gpu.sh: $(wc -l < "$out") JSON lines in $out, table in $table (exit $status)" >&2
exit "$status"
