"""Transform a built-in model, explain it, and show error and CPU time against iterations K."""

from __future__ import annotations

import argparse

import torch

from ..api import transform
from ..solve.handle import solve_handle
from .common import DTYPES, add_model_arguments, example_tokens, load_model, markdown_table, median_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--parallel-layers", type=int, default=None, help="solve only the last N layers in parallel"
    )
    parser.add_argument(
        "--max-k", type=int, default=None, help="largest K in the table (default: parallel layers)"
    )
    parser.add_argument("--runs", type=int, default=7, help="timed runs per variant (median reported)")


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    model = load_model(args.model, dtype, args.seed)
    idx = example_tokens(model, args.batch, args.seq, args.seed)
    print(
        f"snlp-compile demo: {args.model}, batch {args.batch}, sequence {args.seq}, {args.dtype}, CPU eager\n"
    )
    fast = transform(model, (idx,), iterations=1, parallel_layers=args.parallel_layers)
    print(fast.snlp_report, "\n")
    solve = solve_handle(fast)
    n = solve.num_layers
    with torch.no_grad():
        reference = model(idx)
    t_seq = median_time(lambda: model(idx), runs=args.runs)
    rows = []
    for k in range(1, (args.max_k or n) + 1):
        solve.iterations = k
        with torch.no_grad():
            out = fast(idx)
        err = (out - reference).abs().max().item()
        rel = ((out - reference).norm() / reference.norm()).item()
        t = median_time(lambda: fast(idx), runs=args.runs)
        agree = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
        rows.append(
            [k, f"{err:.3e}", f"{rel:.3e}", f"{100 * agree:.1f}%", f"{1e3 * t:.2f}", f"{t_seq / t:.2f}x"]
        )
    print(f"error of the logits against the sequential model ({n} parallel layers; K = {n} is exact):")
    print(markdown_table(["K", "max abs err", "rel err", "argmax agrees", "time ms", "vs sequential"], rows))
    print(f"\nsequential model: {1e3 * t_seq:.2f} ms (median of {args.runs}).")
    print(
        "On a CPU the batched layers do the same arithmetic as the sequential ones, so expect no speed-up here;\n"
        "layer parallelism pays on GPUs at small batch (see BENCHMARKS.md). Weights are random: models trained\n"
        "with the SNLP regulariser (snlp-compile train) converge in 1-2 iterations."
    )
    return 0
