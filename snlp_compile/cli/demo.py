"""Rewrite a built-in model (random weights, CPU), explain what was matched, and show the error of
the logits against the sequential model for K = 1..N iterations of the layer-parallel solve.

snlp-compile demo
snlp-compile demo --model gpt-small --parallel-layers 4 --time
"""

from __future__ import annotations

import argparse

from .common import (
    add_model_arguments,
    add_parallel_layers_argument,
    example_tokens,
    load_model,
    markdown_table,
    median_time,
)

# measured results the demo points at (README: "Train for speed: the frontier", "Deployment")
TRAINED = (
    "Trained with the SNLP regulariser, nanochat L=16 d=512 solves 8 of its 16 layers at K=2 at +1.8%\n"
    "held-out perplexity (the unregularised baseline: +17.8%); fine-tuned through the solve, its decode step\n"
    "runs 8 of 16 at K=2 at +0.6% and 1.30x the best sequential step (an H100), 14 of 16 at +11.5% and 1.90x:\n"
    "faster and better than a model of 8 layers (benchmarks/results/frontier.md; README, 'Train for speed')."
)
GPU = (
    "Speed is a GPU matter: one forward of the nanochat 0.5B trunk (fp16, batch 1, T=256) on an H200 took\n"
    "1.43 ms sequentially (compiled + CUDA graphs) and 0.31 ms as the SNLP solve at K=1 (4.7x; speed only,\n"
    "random weights; benchmarks/results/lowering_gpu.md; from a source checkout: python -m benchmarks lowering-gpu)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_parallel_layers_argument(parser)
    parser.add_argument(
        "--max-k", type=int, default=None, help="largest K in the table (default: the parallel layers)"
    )
    parser.add_argument(
        "--time",
        action="store_true",
        help="add CPU eager times (median of --runs after warm-up) to the table",
    )
    parser.add_argument("--runs", type=int, default=7, help="timed runs per variant with --time")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..api import transform
    from ..solve.handle import solve_handle

    model = load_model(args.model, args.dtype, args.seed)
    idx = example_tokens(model, args.batch, args.seq, args.seed)
    print(
        f"snlp-compile demo: {args.model} with random weights, batch {args.batch}, sequence {args.seq}, "
        f"{args.dtype}, CPU eager\n",
        flush=True,
    )
    fast = transform(model, (idx,), iterations=1, parallel_layers=args.parallel_layers)
    print(fast.snlp_report, "\n", flush=True)
    solve = solve_handle(fast)
    n = solve.num_layers
    with torch.no_grad():
        reference = model(idx)
    t_seq = median_time(lambda: model(idx), runs=args.runs) if args.time else None
    rows = []
    for k in range(1, (args.max_k or n) + 1):
        solve.iterations = k
        with torch.no_grad():
            out = fast(idx)
        err = (out - reference).abs().max().item()
        rel = ((out - reference).norm() / reference.norm()).item()
        agree = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
        row = [k, f"{err:.3e}", f"{rel:.3e}", f"{100 * agree:.1f}%"]
        if t_seq is not None:
            t = median_time(lambda: fast(idx), runs=args.runs)
            row += [f"{1e3 * t:.2f}", f"{t_seq / t:.2f}x"]
        rows.append(row)
    header = ["K", "max abs err", "rel err", "argmax agrees"]
    if t_seq is not None:
        header += ["CPU ms", "vs sequential"]
    print(
        f"Logits of the rewritten model against the sequential one, K = 1..{len(rows)} iterations "
        f"({n} parallel layers; K = {n} is exact):"
    )
    print(markdown_table(header, rows))
    print(
        "\nThe weights are random: nothing makes an untrained model's layers converge in few iterations,\n"
        f"so small K is far off here by construction; K = {n} matching to rounding is the check that the\n"
        "rewrite computes the same function as the model.\n" + TRAINED + "\n"
    )
    if t_seq is not None:
        print(
            f"sequential model: {1e3 * t_seq:.2f} ms on this CPU (median of {args.runs}). On a CPU the batched layers\n"
            "do the same arithmetic as the sequential ones, so expect no speed-up here."
        )
    print(GPU)
    return 0
