"""Show what the compiler matched: the explain report, the rewritten code, and a picture of the
chain before and after the rewrite (needs matplotlib: the 'plot' extra; --no-picture skips it).

snlp-compile inspect --model nanochat-small --parallel-layers 6 --code --picture chain.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    add_model_arguments,
    add_parallel_layers_argument,
    add_stage_arguments,
    announce,
    example_tokens,
    load_model,
    require,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--iterations", "-K", type=int, default=2, help="K, iterations of the solve")
    add_parallel_layers_argument(parser)
    add_stage_arguments(parser)
    parser.add_argument(
        "--picture", type=Path, default=Path("snlp_chain.png"), help="PNG of the chain before/after"
    )
    parser.add_argument("--no-picture", action="store_true", help="draw no picture (no matplotlib needed)")
    parser.add_argument(
        "--code", action="store_true", help="print the rewritten graph's code and the batched body"
    )


def run(args: argparse.Namespace) -> int:
    picture = None if args.no_picture else args.picture
    if picture is not None:
        require("inspect --picture (the default; --no-picture skips it)", "matplotlib")
    from ..api import try_transform
    from ..solve.handle import solve_handle
    from ..visualize import draw_chain

    model = load_model(args.model, args.dtype, args.seed)
    idx = example_tokens(model, args.batch, args.seq, args.seed)
    config = {
        "iterations": args.iterations,
        "parallel_layers": args.parallel_layers,
        "stages": args.stages,
        "fused_layers": args.fused_layers,
    }
    fast, report = try_transform(model, (idx,), **config)  # (one capture for the report and the rewrite)
    print(report)
    if fast is None or not report.rewritten:
        if picture is not None:
            print()
            announce("picture", draw_chain(report, picture))
        return 1
    if args.code:
        print("\n# rewritten model (.code)\n" + fast.code)
        solve = solve_handle(fast).solve
        print("# one layer, as matched (.snlp_solve.body.code)\n" + solve.body.code)
        what = f"one stage's {solve.stage_sizes[0]} layers" if solve.num_stages > 1 else "all parallel layers"
        if solve.layers is not None:
            print(f"# {what} at once (.snlp_solve.layers.code)\n" + solve.layers.code)
        if solve.wide_first is not None and solve.wide_second is not None:
            print(
                "# every layer's first half at once (.snlp_solve.wide_first.code)\n" + solve.wide_first.code
            )
            print(
                "# every layer's second half at once (.snlp_solve.wide_second.code)\n"
                + solve.wide_second.code
            )
        if solve.layers_short is not None:
            print(
                f"# the {solve.stage_sizes[-1]}-layer stages: .snlp_solve.layers_short, the same batched for fewer"
            )
    if picture is not None:
        print()
        announce("picture", draw_chain(report, picture, iterations=args.iterations))
    return 0
