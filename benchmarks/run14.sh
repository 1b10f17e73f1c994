#!/usr/bin/env bash
# Run 14's figures on a lent GPU (BENCHMARKS.md "Run 14"): `bash benchmarks/run14.sh PART`, output in $OUT.
#   gpu-tests     every GPU test of the kernels, the deferred K/V and the decode step
#   timeline S V  the SNLP deferred step's kernels inside its CUDA graph (benchmarks/step_timeline.py),
#                 shapes S (e.g. 0.5b,d20), attention variants V (e.g. ops,fused,fused-nopdl)
#   decode-05b | decode-d20   the full decode tables (as runs 12-13), the default build
#   forward       the forward table, 0.5b T=2048 (as run 12)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
decode="--batch 1 --seq-modes compiled+graph,autotuned+graph --modes compiled+graph --ks 1,2 --warm-ks '' --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph,autotuned+graph --einsum-ks '' --budget-s 560 --out $out"
case "${1:-}" in
  gpu-tests) python -m pytest -q tests/test_decode_attention.py tests/test_layer_gemv.py tests/test_defer_kv.py tests/test_decode.py -k "gpu or decode_attention" ;;
  timeline) python benchmarks/step_timeline.py --shapes "${2:-0.5b,d20}" --variants "${3:-ops,fused,fused-nopdl}" --out "$out" --name "step_timeline_${4:-r14}" ;;
  decode-05b) eval python benchmarks/decode.py --shapes 0.5b $decode --name decode_05b_r14 ;;
  decode-d20) eval python benchmarks/decode.py --shapes d20 $decode --name decode_d20_r14 ;;
  forward) python benchmarks/forward.py --shapes 0.5b --seq 2048 --seq-modes compiled+graph,autotuned+graph \
             --modes compiled+graph,autotuned+graph --ks 1 --chunks "" --no-smoke --out "$out" --name forward_r14 ;;
  *) echo "usage: bash benchmarks/run14.sh {gpu-tests|timeline [SHAPES] [VARIANTS] [TAG]|decode-05b|decode-d20|forward}"; exit 2 ;;
esac
