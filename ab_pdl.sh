export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
common="--shapes 0.5b --batch 1 --modes compiled+graph --ks 1,2 --warm-ks '' --chunks '' --deferred-ks 1 --deferred-modes compiled+graph --einsum-ks '' --out $OUT"
run() {  # name inductor snlp_pdl
  echo "=== $1: --inductor '$2' SNLP_PDL=$3"
  eval SNLP_PDL=$3 timeout 130 python benchmarks/decode.py $common --name $1 --inductor "'$2'" 2>$OUT/err_$1.txt | grep "ms  rel_err"
  grep -m1 Error $OUT/err_$1.txt
}
run abA "" 0
run abB "triton.enable_pdl=True" 1
run abC "triton.enable_pdl=True,combo_kernels=True" 1
run abD "combo_kernels=True" 1
run abE "triton.enable_pdl=True,combo_kernels=True" 0
timeout 150 python -m pytest -q -x tests/test_layer_gemv.py -k "gpu and (pdl or matches_einsum or exact or attention)" 2>&1 | tail -3
