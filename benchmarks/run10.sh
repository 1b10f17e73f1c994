#!/usr/bin/env bash
# Run 10's figures on a lent GPU (BENCHMARKS.md "Run 10"): `bash benchmarks/run10.sh PART`, output in $OUT.
#   decode-05b | decode-d20   decode step, batch 1, context 1024: the sequential step compiled and
#                             max-autotuned (both CUDA-graphed), SNLP K=1,2 plain and deferred
#   forward                   full-sequence forward, 0.5b, T=2048
#   pdl-ab                    SNLP_PDL=1 vs 0 on the same machine (0.5b decode, SNLP variants only)
#   gpu-tests                 the GPU tests of the kernel, the deferred K/V and the decode step
# Every compiled variant gets benchmarks/common.BEST_INDUCTOR (PDL); SNLP's also SNLP_INDUCTOR.
set -u
export PYTHONPATH=.
out=${OUT:-benchmarks/results}
decode="--batch 1 --seq-modes compiled+graph,autotuned+graph --modes compiled+graph --ks 1,2 --warm-ks '' --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph --einsum-ks '' --profile --budget-s 560 --out $out"
case "${1:-}" in
  decode-05b) eval python benchmarks/decode.py --shapes 0.5b $decode --name decode_05b_r10 ;;
  decode-d20) eval python benchmarks/decode.py --shapes d20 $decode --name decode_d20_r10 ;;
  forward) python benchmarks/forward.py --shapes 0.5b --seq 2048 --seq-modes compiled+graph \
             --modes compiled+graph,autotuned+graph --ks 1 --chunks '' --no-smoke --profile --out "$out" --name forward_r10 ;;
  pdl-ab)
    for pdl in 1 0; do
      eval SNLP_PDL=$pdl python benchmarks/decode.py --shapes 0.5b --batch 1 --seq-modes "''" --modes compiled+graph \
        --ks 1,2 --warm-ks "''" --chunks "''" --deferred-ks 1 --deferred-modes compiled+graph --einsum-ks "''" \
        --out "$out" --name pdl_ab_$pdl | grep "ms  rel_err"
    done ;;
  gpu-tests) python -m pytest -q tests/test_layer_gemv.py tests/test_defer_kv.py tests/test_decode.py -k gpu ;;
  *) echo "usage: bash benchmarks/run10.sh {decode-05b|decode-d20|forward|pdl-ab|gpu-tests}"; exit 2 ;;
esac
