#!/usr/bin/env bash
# Run 15's figures on a lent GPU (BENCHMARKS.md "Run 15"): `bash benchmarks/run15.sh PART`, output in $OUT.
#   gpu-tests     the GPU tests of the GEMV kernel's users (attention products,
#                 PDL chain, compiled dispatch, exact decode step), the decode attention, deferred K/V, decode
#   gpu-matrix    test_layer_gemv's op-vs-einsum matrix (45 cases, autotuning each)
#   (split_sweep_r15: `bash benchmarks/run15.sh sweep` at commit 445ef42, before the split was removed;
#    gemv_sweep_values_t_r15: the transposed tile, at commit f97c13b with --sweep-kernel tile_t, removed too)
#   sweep-values  the GEMV tile's launch configs on the values and keys products, cold L2 (gemv_sweep_values_r15)
#   ncu           Nsight Compute on one values and one keys product (ncu_values_keys_r15.txt)
#   pdl-gap       the deferred 0.5b step's timeline with and without Inductor's PDL (step_timeline_r15_{pdl,nopdl})
#   timeline S V  the SNLP deferred step's kernels inside its CUDA graph (e.g. 0.5b,d20 ops,plain)
#   decode-05b | decode-d20   the decode tables (as run 14) plus the compiler's exact sequential mode
#                 (chunks = layers, K=1) beside the sequential variants
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
decode="--batch 1 --seq-modes compiled+graph,autotuned+graph --modes compiled+graph --ks '' --warm-ks '' --chunk-modes compiled+graph,autotuned+graph --deferred-ks 1,2 --deferred-modes compiled+graph,autotuned+graph --einsum-ks '' --budget-s 570 --out $out"
case "${1:-}" in
  gpu-tests) python -m pytest -q tests/test_layer_gemv.py tests/test_decode_attention.py tests/test_defer_kv.py tests/test_decode.py \
               -k "(gpu or decode_attention) and not gpu_op_matches_einsum" ;;
  gpu-matrix) python -m pytest -q tests/test_layer_gemv.py -k gpu_op_matches_einsum ;;
  sweep-values) python benchmarks/gemv_lowering.py --sweep --sweep-cold --shapes 320x64x1024t,200x128x1024t,320x1024x64 \
                  --sweep-rows 1 --sweep-stages 1,2,3,4 --out "$out" --name gemv_sweep_values_r15 ;;
  ncu) ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
         --section LaunchStats --section WarpStateStats python benchmarks/scripts/values_product_probe.py > "$out/ncu_values_keys_r15.txt" 2>&1 ;;
  pdl-gap) python benchmarks/step_timeline.py --shapes 0.5b --variants ops --out "$out" --name step_timeline_r15_pdl
           python benchmarks/step_timeline.py --shapes 0.5b --variants ops --inductor triton.enable_pdl=False --out "$out" --name step_timeline_r15_nopdl ;;
  timeline) python benchmarks/step_timeline.py --shapes "${2:-0.5b,d20}" --variants "${3:-ops}" --out "$out" --name "step_timeline_${4:-r15}" ;;
  decode-05b) eval python benchmarks/decode.py --shapes 0.5b $decode --chunks 32 --name decode_05b_r15 ;;
  decode-d20) eval python benchmarks/decode.py --shapes d20 $decode --chunks 20 --name decode_d20_r15 ;;
  *) echo "usage: bash benchmarks/run15.sh {gpu-tests|gpu-matrix|sweep-values|ncu|pdl-gap|timeline [SHAPES] [VARIANTS] [TAG]|decode-05b|decode-d20}"; exit 2 ;;
esac
