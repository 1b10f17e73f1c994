"""One launch each of a 0.5B decode step's values and keys products on the GEMV kernel (autotuned
first, outside the profiled range), for a profiler run:
``ncu --profile-from-start off --set full python benchmarks/scripts/values_product_probe.py``."""

import torch

from snlp_compile.kernels import layer_gemv  # noqa: F401  (registers the op)

torch.manual_seed(0)
cache = torch.randn(320, 1024, 64, device="cuda", dtype=torch.bfloat16)
probs = torch.rand(320, 1, 1024, device="cuda", dtype=torch.bfloat16)
q = torch.randn(320, 1, 64, device="cuda", dtype=torch.bfloat16)
for _ in range(3):  # autotune, then steady launches
    torch.ops.snlp.layer_gemv(probs, cache.transpose(1, 2))  # values: w (320, 64, 1024) transposed
    torch.ops.snlp.layer_gemv(q, cache)  # keys: w (320, 1024, 64)
torch.cuda.synchronize()
torch.cuda.profiler.start()
torch.ops.snlp.layer_gemv(probs, cache.transpose(1, 2))
torch.ops.snlp.layer_gemv(q, cache)
torch.cuda.synchronize()
torch.cuda.profiler.stop()
