#!/usr/bin/env bash
# Run 12's figures on a lent GPU (BENCHMARKS.md "Run 12"): `bash benchmarks/run12.sh PART`, output in $OUT.
#   probe-forward  the 0.5b T=2048 K=1 forward (SNLP only, autotuned+graph) under further Inductor options
#   probe-decode   the deferred decode steps (SNLP only, K=1,2, both shapes) under further Inductor options
#   probe-combo    the same under further combo-kernel options
#   gpu-tests      the GPU tests of the kernel, the deferred K/V and the decode step
#   split-sweep    the values product split over its keys (N x 2 layers of I / 2 keys, ...): the kernel alone
#   step-code      Inductor's code of the 0.5b deferred K=1 step (benchmarks/scripts/step_code.py)
#   decode-05b | decode-d20   decode step, batch 1, context 1024: the sequential step compiled and
#                max-autotuned (both CUDA-graphed), SNLP K=1,2 plain, deferred compiled and autotuned
#   forward      full-sequence forward, 0.5b, T=2048, sequential compiled and autotuned vs SNLP K=1
# Every compiled variant gets benchmarks/common.BEST_INDUCTOR (PDL); SNLP's also SNLP_INDUCTOR.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
decode="--batch 1 --seq-modes compiled+graph,autotuned+graph --modes compiled+graph --ks 1,2 --warm-ks '' --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph,autotuned+graph --einsum-ks '' --budget-s 560 --out $out"
case "${1:-}" in
  probe-forward)
    i=0
    for opts in "" "aggressive_fusion=True" "coordinate_descent_tuning=True" "triton.enable_persistent_tma_matmul=True"; do
      python benchmarks/forward.py --shapes 0.5b --seq 2048 --seq-modes '' --modes autotuned+graph --ks 1 --chunks '' \
        --no-smoke --snlp-inductor "combo_kernels=True${opts:+,$opts}" --budget-s 150 --out "$out" --name probe_forward_r12_$i \
        | grep -E " ms |Error|error" | sed "s|^|[$opts] |"
      i=$((i+1))
    done ;;
  probe-decode)
    i=0
    for opts in "" "aggressive_fusion=True"; do
      python benchmarks/decode.py --shapes 0.5b,d20 --batch 1 --seq-modes '' --modes compiled+graph --ks '' --warm-ks '' \
        --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph,autotuned+graph --einsum-ks '' \
        --snlp-inductor "combo_kernels=True${opts:+,$opts}" --out "$out" --name probe_decode_r12_$i \
        | grep -E " ms |Error|error" | sed "s|^|[$opts] |"
      i=$((i+1))
    done ;;
  probe-combo)  # combo-kernel options on top of SNLP_INDUCTOR (SNLP only, deferred K=1,2, compiled+graph)
    i=0
    for opts in "combo_kernel_allow_mixed_sizes=2" "combo_kernel_per_subkernel_blocks=True"; do
      python benchmarks/decode.py --shapes 0.5b,d20 --batch 1 --seq-modes '' --modes compiled+graph --ks '' --warm-ks '' \
        --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph --einsum-ks '' \
        --snlp-inductor "combo_kernels=True,$opts" --out "$out" --name probe_combo_r12_$i | grep " ms " | sed "s|^|[$opts] |"
      i=$((i+1))
    done ;;
  gpu-tests) python -m pytest -q tests/test_layer_gemv.py tests/test_defer_kv.py tests/test_decode.py -k gpu ;;
  split-sweep)
    python benchmarks/gemv_lowering.py --sweep --sweep-rows 1 --sweep-stages 1,2 --out "$out" --name gemv_sweep_split_r12 \
      --shapes 200x128x1024t,400x128x512t,800x128x256t,320x64x1024t,640x64x512t,1280x64x256t ;;
  step-code) python benchmarks/scripts/step_code.py --shape 0.5b --k 1 ;;
  decode-05b) eval python benchmarks/decode.py --shapes 0.5b $decode --name decode_05b_r12 ;;
  decode-d20) eval python benchmarks/decode.py --shapes d20 $decode --name decode_d20_r12 ;;
  forward) python benchmarks/forward.py --shapes 0.5b --seq 2048 --seq-modes compiled+graph,autotuned+graph \
             --modes compiled+graph,autotuned+graph --ks 1 --chunks '' --no-smoke --out "$out" --name forward_r12 ;;
  *) echo "usage: bash benchmarks/run12.sh {probe-forward|probe-decode|probe-combo|gpu-tests|split-sweep|step-code|decode-05b|decode-d20|forward}"; exit 2 ;;
esac
