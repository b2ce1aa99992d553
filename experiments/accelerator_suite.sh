#!/usr/bin/env bash
# The accelerator checks of issue 17, as one short script (under 8 minutes on one GPU):
#   1. train-step throughput and MFU, f32 and bf16 (experiments/throughput.py);
#   2. DSA and our dense kernel (dense_chunked) against
#      jax.nn.dot_product_attention(implementation="cudnn"), cuDNN's fused
#      FlashAttention-class kernel, and XLA's dense attention, bf16, n = 2k..16k
#      (experiments/dsa_benchmark.py);
#   3. the GMoE layer with jax.lax.ragged_dot against our tiled dispatch and the dense
#      FFN of equal active parameters, E = 8 and 128 (experiments/moe_benchmark.py).
# Every JSON records the device name (and the CPU model); summary.json lists the files.
#
#   OUT=runs/accelerator bash experiments/accelerator_suite.sh
#   DRY=1 OUT=/tmp/acc bash experiments/accelerator_suite.sh   # tiny sizes, any backend (CI)
#
# On a CPU the GPU-only case (dense_cudnn) is recorded as skipped, so the script runs
# end to end everywhere; its figures mean something only on an accelerator.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/accelerator}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"

if [ "${DRY:-0}" = "1" ]; then
  THROUGHPUT=(--quick --no_torch --config configs/tiny.py:width=64,layers=2,seq_len=64 --steps 1 --repeats 1)
  DSA=(--lengths 256 --repeats 1 --no_torch)
  MOE=(--experts 8 --tokens 256 --d_model 64 --expert_hidden 32 --gate_hidden 32 --repeats 1)
else
  THROUGHPUT=(--no_torch --repeats 3)
  DSA=(--lengths 2048,4096,8192,16384 --repeats 3 --no_torch)
  MOE=(--experts 8,128 --repeats 3)
fi

"$PY" -m experiments.throughput "${THROUGHPUT[@]}" --dtypes float32,bfloat16 \
    --out "$OUT/throughput.json"
"$PY" -m experiments.dsa_benchmark "${DSA[@]}" --dtype bfloat16 \
    --impls dense,dense_chunked,dense_cudnn,dsa_fraction --out "$OUT/dsa.json"
"$PY" -m experiments.moe_benchmark "${MOE[@]}" \
    --impls moe_tiled,moe_ragged_dot,dense_ffn --out "$OUT/moe.json"
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
import jax
from experiments import common
out = pathlib.Path(sys.argv[1])
files = sorted(p.name for p in out.glob("*.json") if p.name != "summary.json")
summary = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
           "machine": common.machine(), "files": files}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary["device"]), "->", out / "summary.json")
PYEOF
