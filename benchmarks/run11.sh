#!/usr/bin/env bash
# Run 11's figures on a lent GPU (BENCHMARKS.md "Run 11"): `bash benchmarks/run11.sh PART`, output in $OUT.
#   probe        the kernel's two-row path swept on the deferred q/k/v shapes, and an SNLP-only A/B on
#                one machine: deferred steps with 2 rows per layer on cuBLAS vs on the kernel
#   last-row-ab  the forward's last-row solve on one machine, off (full trace) and on (SNLP_LAST_ROW=0|1)
#   gpu-tests    the GPU tests of the kernel, the deferred K/V and the decode step
#   decode-05b | decode-d20   decode step, batch 1, context 1024: the sequential step compiled and
#                max-autotuned (both CUDA-graphed), SNLP K=1,2 plain and deferred
#   forward      full-sequence forward, 0.5b, T=2048, sequential compiled and autotuned vs SNLP K=1
# Every compiled variant gets benchmarks/common.BEST_INDUCTOR (PDL); SNLP's also SNLP_INDUCTOR.
set -u
export PYTHONPATH=.
out=${OUT:-benchmarks/results}
decode="--batch 1 --seq-modes compiled+graph,autotuned+graph --modes compiled+graph --ks 1,2 --warm-ks '' --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph --einsum-ks '' --profile --budget-s 560 --out $out"
snlp_decode="--shapes 0.5b,d20 --batch 1 --seq-modes '' --modes compiled+graph --ks '' --warm-ks '' --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph --einsum-ks '' --out $out"
# decode.py with 2 rows per layer on the kernel (layer_gemv.CUBLAS_ROWS without 2) or on cuBLAS
rows2() {
  python - "$@" <<'EOF'
import runpy, sys
from snlp_compile.kernels import layer_gemv
rows = sys.argv.pop(1)
layer_gemv.CUBLAS_ROWS = range(3, 5) if rows == "kernel" else range(2, 5)
sys.argv[0] = "benchmarks/decode.py"
runpy.run_path("benchmarks/decode.py", run_name="__main__")
EOF
}
case "${1:-}" in
  probe)
    python benchmarks/gemv_lowering.py --sweep --sweep-rows 2 --sweep-stages 1,2 \
      --shapes 32x1920x640,20x3840x1280 --out "$out" --name gemv_sweep_rows2_r11
    for r in cublas kernel; do eval rows2 $r $snlp_decode --name rows2_ab_$r | grep "ms  rel_err"; done ;;
  last-row-ab)
    for v in 0 1; do  # (run 11 timed 0, sum and matmul, a product form of the sum removed after: no gain)
      SNLP_LAST_ROW=$v python benchmarks/forward.py --shapes 0.5b --seq 2048 --seq-modes '' \
        --modes compiled+graph,autotuned+graph --ks 1 --chunks '' --no-smoke --out "$out" --name last_row_ab_$v | grep " ms "
    done ;;
  gpu-tests) python -m pytest -q tests/test_layer_gemv.py tests/test_defer_kv.py tests/test_decode.py -k gpu ;;
  decode-05b) eval python benchmarks/decode.py --shapes 0.5b $decode --name decode_05b_r11 ;;
  decode-d20) eval python benchmarks/decode.py --shapes d20 $decode --name decode_d20_r11 ;;
  forward) python benchmarks/forward.py --shapes 0.5b --seq 2048 --seq-modes compiled+graph,autotuned+graph \
             --modes compiled+graph,autotuned+graph --ks 1 --chunks '' --no-smoke --profile --out "$out" --name forward_r11 ;;
  *) echo "usage: bash benchmarks/run11.sh {probe|last-row-ab|gpu-tests|decode-05b|decode-d20|forward}"; exit 2 ;;
esac
