"""Inductor's generated code for one compiled decode step (SNLP deferred K/V, K=1 by default):
which small kernels a step launches and what each fuses. Writes $OUT/step_code_<shape>_k<K>.py.

    PYTHONPATH=. python benchmarks/scripts/step_code.py --shape 0.5b --k 1
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    BEST_INDUCTOR,
    SHAPES,
    SNLP_INDUCTOR,
    inference_model,
    parse_inductor_options,
    with_iterations,
)

import snlp_compile
from snlp_compile.models.kv import CachedStep, new_cache


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    args = p.parse_args()
    device = torch.device("cuda")
    model, _ = inference_model(SHAPES[args.shape], vocab_size=256, device=device, dtype=torch.bfloat16)
    step = CachedStep(model)
    k_cache, v_cache = new_cache(model, 1, args.context)
    pos = torch.tensor(args.context - 1, device=device)
    idx = torch.randint(0, 256, (1, 1), device=device)
    inputs = (idx, pos, k_cache, v_cache)
    with torch.no_grad():
        snlp = snlp_compile.transform(step, inputs, iterations=1, deferred_kv=True)
        fn = with_iterations(snlp, args.k, "h0")
        options = {**parse_inductor_options(BEST_INDUCTOR), **parse_inductor_options(SNLP_INDUCTOR)}
        compiled = torch.compile(fn, dynamic=False, options=options)
        compiled(*inputs)  # the first call of a sequence (writes nothing); the second is the step
        _, codes = run_and_get_code(compiled, *inputs)
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    path = out / f"step_code_{args.shape}_k{args.k}.py"
    path.write_text("\n\n# ======== next graph ========\n\n".join(codes))
    calls = [
        line.strip()
        for code in codes
        for line in code.splitlines()
        if re.search(r"\.run\(|extern_kernels|torch\.ops\.", line)
    ]
    print(f"{path}: {len(codes)} graph(s), {len(calls)} launches")
    print("\n".join(calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
