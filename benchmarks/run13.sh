#!/usr/bin/env bash
# Run 13's figures on a lent GPU (BENCHMARKS.md "Run 13"): `bash benchmarks/run13.sh PART`, output in $OUT.
#   attn-micro   the decode attention alone (benchmarks/attention_lowering.py): all layers at once
#                and one call per layer, ops (cuBLAS, GEMV kernel) against the fused kernel
#   attn-sweep   the fused kernel's key splits, 1-16 programs per SM
#   attn-tests   the GPU tests of the fused decode-attention kernel
#   gpu-tests    every GPU test of the kernels, the deferred K/V and the decode step
#   decode-ab 0|1  decode, batch 1, context 1024, both shapes, with the fused attention off (0) or
#                on (1): SNLP_DECODE_ATTENTION, for the sequential and the SNLP steps alike
#   step-ab      SNLP deferred steps alone under SNLP_DECODE_ATTENTION=0 / 1 / all
#   decode-05b | decode-d20   the full decode tables (as run 12's)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
decode="--batch 1 --seq-modes compiled+graph,autotuned+graph --modes compiled+graph --ks 1,2 --warm-ks '' --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph,autotuned+graph --einsum-ks '' --budget-s 560 --out $out"
ab="--batch 1 --seq-modes compiled+graph,autotuned+graph --modes compiled+graph --ks '' --warm-ks '' --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph --einsum-ks '' --budget-s 280 --out $out"
case "${1:-}" in
  attn-micro)
    python benchmarks/attention_lowering.py --modes compiled --lowerings matmul,kernel,fused,fused-pdl --out "$out" --name attention_fused_r13
    python benchmarks/attention_lowering.py --modes compiled --lowerings matmul,kernel,fused,fused-pdl --per-layer --out "$out" --name attention_fused_per_layer_r13 ;;
  attn-sweep)  # the fused kernel's key splits (programs per SM) against the GEMV-kernel lowering
    for pl in "" --per-layer; do
      python benchmarks/attention_lowering.py --modes compiled --lowerings kernel,fused-pdl --programs-per-sm 1,2,4,8,16 \
        $pl --out "$out" --name attention_split_sweep${pl:+_per_layer}_r13
    done ;;
  attn-tests) python -m pytest -q tests/test_decode_attention.py ;;
  gpu-tests) python -m pytest -q tests/test_decode_attention.py tests/test_layer_gemv.py tests/test_defer_kv.py tests/test_decode.py -k "gpu or decode_attention" ;;
  decode-ab)  # decode-ab 0|1: SNLP_DECODE_ATTENTION
    a=${2:?decode-ab 0 or 1}
    for s in 0.5b d20; do
      eval SNLP_DECODE_ATTENTION=$a python benchmarks/decode.py --shapes $s $ab --name decode_ab_${s}_fused$a | grep -E " ms |Error|error"
    done ;;
  step-ab)  # SNLP deferred steps only: SNLP_DECODE_ATTENTION off, default (ops in the step), all (fused in the step)
    snlp="--batch 1 --seq-modes '' --modes compiled+graph --ks '' --warm-ks '' --chunks '' --deferred-ks 1,2 --deferred-modes compiled+graph --einsum-ks '' --out $out"
    for v in 0:off 1:default all:all; do
      eval SNLP_DECODE_ATTENTION=${v%%:*} python benchmarks/decode.py --shapes 0.5b,d20 $snlp --name step_ab_${v##*:}_r13 2>&1 | grep -E " ms |Error" | sed "s|^|[$v] |"
    done ;;
  decode-05b) eval python benchmarks/decode.py --shapes 0.5b $decode --name decode_05b_r13 ;;
  decode-d20) eval python benchmarks/decode.py --shapes d20 $decode --name decode_d20_r13 ;;
  *) echo "usage: bash benchmarks/run13.sh {attn-micro|attn-tests|gpu-tests|decode-ab|decode-05b|decode-d20}"; exit 2 ;;
esac
