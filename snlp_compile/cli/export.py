"""Export a model, rewritten into the layer-parallel solve, to ONNX (and check it under ONNX
Runtime with --check). Needs onnx and onnxscript (and onnxruntime for --check): the 'onnx' extra.

snlp-compile export --model nanochat-small -K 2 -o nanochat.onnx --check
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_model_arguments, announce, example_tokens, load_model, require, status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--output", "-o", type=Path, default=Path("model.snlp.onnx"), help="the .onnx file to write"
    )
    parser.add_argument("--iterations", "-K", type=int, default=1, help="K, iterations of the solve")
    parser.add_argument(
        "--parallel-layers",
        type=int,
        default=None,
        help="solve only the last N layers in parallel (default: all)",
    )
    parser.add_argument(
        "--init", choices=["h0", "batch_fwd"], default="h0", help="the solve's initial iterate"
    )
    parser.add_argument("--damping", type=float, default=1.0, help="a in (0, 1] of the correction")
    parser.add_argument(
        "--chunks",
        type=int,
        default=1,
        help="consecutive chunks of the parallel layers, solved one after another (the model's own "
        "function; the paper's chunkwise decomposition is --fused-layers)",
    )
    parser.add_argument(
        "--fused-layers",
        type=int,
        default=1,
        help="M: groups of M layers as one wide layer, N/M wide layers solved in parallel (the paper's "
        "ChunkB_CxFM; changes the function: for models trained fused)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 to 23")
    parser.add_argument("--static", action="store_true", help="fix batch and sequence to the example's sizes")
    parser.add_argument("--report", action="store_true", help="save the exporter's report beside the model")
    parser.add_argument(
        "--no-rewrite", action="store_true", help="export the model as written (sequential baseline)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="run the file under ONNX Runtime (CPU) against PyTorch, at the example shape and a second one",
    )


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "iterations": args.iterations,
        "parallel_layers": args.parallel_layers,
        "init": args.init,
        "damping": args.damping,
        "chunks": args.chunks,
        "fused_layers": args.fused_layers,
    }


def run(args: argparse.Namespace) -> int:
    require("export", "onnx", "onnxscript", *(["onnxruntime"] if args.check else []))
    from ..export.onnx_export import export_onnx

    model = load_model(args.model, args.dtype, args.seed)
    if not args.static and args.batch < 2:
        # torch.export fixes example sizes of 1: trace with two rows so that batch stays dynamic
        status(f"tracing with --batch 2 (not {args.batch}) so that the batch dimension stays dynamic")
        args.batch = 2
    idx = example_tokens(model, args.batch, args.seq, args.seed)
    overrides = {} if args.no_rewrite else _config(args)
    what = "the model as written" if args.no_rewrite else "the rewritten model"
    status(f"export: capturing {what} and exporting it to ONNX (opset {args.opset}) ...")
    result = export_onnx(
        model,
        (idx,),
        args.output,
        dynamic=not args.static,
        opset=args.opset,
        report=args.report,
        rewrite=not args.no_rewrite,
        **overrides,
    )
    if result.snlp_report is not None:
        print(result.snlp_report)
        print()
    print(result)
    announce("ONNX model", result.path)
    report_path = getattr(result, "report_path", None)
    if report_path:
        announce("exporter report", report_path)
    if not args.check:
        return 0
    status("export: checking the file under ONNX Runtime (CPU) against PyTorch ...")
    return _check(args, model, idx, result.path, overrides)


def _check(args: argparse.Namespace, model: Any, idx: Any, path: Path, overrides: dict[str, Any]) -> int:
    """ONNX Runtime (CPU) against the PyTorch module that was exported, rtol 1e-4."""
    import torch

    from ..api import transform
    from ..export.ort import make_session

    reference = model if args.no_rewrite else transform(model, (idx,), **overrides)
    session = make_session(path, "cpu")
    name = session.get_inputs()[0].name
    shapes = [(args.batch, args.seq)]
    if not args.static:
        shapes.append((args.batch + 1, max(1, args.seq // 2 + 1)))
    ok = True
    for batch, seq in shapes:
        x = example_tokens(model, batch, seq, args.seed + 1)
        with torch.no_grad():
            want = reference(x)
        want = want[0] if isinstance(want, (tuple, list)) else want
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0]).to(want.dtype)
        err = (got - want).abs().max().item()
        close = torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        ok &= close
        print(f"check B={batch} T={seq}: max |ORT - PyTorch| = {err:.3g} ({'ok' if close else 'MISMATCH'})")
    return 0 if ok else 1
