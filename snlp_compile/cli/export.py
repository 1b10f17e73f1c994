"""Export a model, rewritten into the layer-parallel solve, to ONNX or to an AOTInductor package
(and check it with --check: under ONNX Runtime, or loaded in a fresh process). ``--decode``
exports the KV-cached decode step instead of the full forward (ONNX: per-layer
``past_key_values.N.key/value`` in, ``present.N.key/value`` out). ONNX needs onnx and onnxscript
(and onnxruntime for --check): the 'onnx' extra; AOTInductor a C++ compiler.

snlp-compile export --model nanochat-small -K 2 -o nanochat.onnx --check
snlp-compile export --model nanochat-tiny --decode -K 1 -o step.onnx --check
snlp-compile export --model nanochat-tiny --format aoti --decode -o step.pt2 --check
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    CLIError,
    add_model_arguments,
    add_parallel_layers_argument,
    add_stage_arguments,
    announce,
    example_tokens,
    load_model,
    require,
    status,
)

DECODE_CHECK_STEPS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--format", choices=["onnx", "aoti"], default="onnx", help="ONNX, or an AOTInductor package (.pt2)"
    )
    parser.add_argument(
        "--output", "-o", type=Path, default=None, help="the file to write (default model.snlp.onnx / .pt2)"
    )
    parser.add_argument(
        "--decode", action="store_true", help="export the KV-cached decode step (one new token) instead"
    )
    parser.add_argument(
        "--no-triton-kernels",
        action="store_true",
        help="--format aoti: ATen ops only in the package (no Triton GEMV kernel; cuBLAS on a GPU)",
    )
    parser.add_argument(
        "--max-len", type=int, default=64, help="--decode: positions the caches hold (max_sequence_length)"
    )
    parser.add_argument("--iterations", "-K", type=int, default=1, help="K, iterations of the solve")
    add_parallel_layers_argument(parser)
    parser.add_argument(
        "--init", choices=["h0", "batch_fwd"], default="h0", help="the solve's initial iterate"
    )
    parser.add_argument("--damping", type=float, default=1.0, help="a in (0, 1] of the correction")
    add_stage_arguments(parser)
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 to 23")
    parser.add_argument("--static", action="store_true", help="fix batch and sequence to the example's sizes")
    parser.add_argument("--report", action="store_true", help="save the exporter's report beside the model")
    parser.add_argument(
        "--no-rewrite", action="store_true", help="export the model as written (sequential baseline)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="ONNX: run it under ONNX Runtime (CPU) against PyTorch, at the example shape and a second one "
        f"(--decode: {DECODE_CHECK_STEPS} decode steps); aoti: load it in a fresh process, against PyTorch",
    )


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "iterations": args.iterations,
        "parallel_layers": args.parallel_layers,
        "init": args.init,
        "damping": args.damping,
        "stages": args.stages,
        "fused_layers": args.fused_layers,
    }


def run(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        require("export", "onnx", "onnxscript", *(["onnxruntime"] if args.check else []))
    if args.output is None:
        args.output = Path("model.snlp.onnx" if args.format == "onnx" else "model.snlp.pt2")
    if args.format == "aoti" and args.output.suffix != ".pt2":
        raise CLIError(f"--format aoti writes a .pt2 package, got --output {args.output}")
    model = load_model(args.model, args.dtype, args.seed)
    if not args.static and args.batch < 2:
        # torch.export fixes example sizes of 1: trace with two rows so that batch stays dynamic
        status(f"tracing with --batch 2 (not {args.batch}) so that the batch dimension stays dynamic")
        args.batch = 2
    overrides = {} if args.no_rewrite else _config(args)
    what = "the model as written" if args.no_rewrite else "the rewritten model"
    what = what.replace("model", "decode step") if args.decode else what
    if args.decode and not hasattr(model, "forward_cached"):
        raise CLIError(f"--decode: {type(model).__name__} has no KV-cached step (forward_cached)")
    if args.format == "aoti":
        return _aoti(args, model, overrides, what)
    status(f"export: capturing {what} and exporting it to ONNX (opset {args.opset}) ...")
    if args.decode:
        from ..export.onnx_decode import export_onnx_decode

        result = export_onnx_decode(
            model,
            args.output,
            batch=args.batch,
            max_len=args.max_len,
            rewrite=not args.no_rewrite,
            dynamic=not args.static,
            opset=args.opset,
            **overrides,
        )
    else:
        from ..export.onnx_export import export_onnx

        idx = example_tokens(model, args.batch, args.seq, args.seed)
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
    _show(result, "ONNX model")
    report_path = getattr(result, "report_path", None)
    if report_path:
        announce("exporter report", report_path)
    if not args.check:
        return 0
    status("export: checking the file under ONNX Runtime (CPU) against PyTorch ...")
    if args.decode:
        return _check_decode(args, model, result.path, overrides)
    return _check(args, model, idx, result.path, overrides)


def _decode_step(
    args: argparse.Namespace, model: Any, overrides: dict[str, Any]
) -> tuple[Any, tuple[Any, ...]]:
    """The decode step that is exported (sequential or transformed) and its example inputs."""
    import torch

    from ..api import transform
    from ..models.kv import CachedStep, new_cache

    k_cache, v_cache = new_cache(model, args.batch, args.max_len)
    idx = example_tokens(model, args.batch, 1, args.seed)
    inputs = (idx, torch.tensor(0), k_cache, v_cache)
    step: Any = CachedStep(model)
    if not args.no_rewrite:
        step = transform(step, inputs, dynamic_shapes=not args.static, **overrides)
    return step, inputs


def _check_decode(args: argparse.Namespace, model: Any, path: Path, overrides: dict[str, Any]) -> int:
    """ONNX Runtime (CPU) over DECODE_CHECK_STEPS decode steps, presents fed back as pasts, against
    the same step in PyTorch (``write_cache`` after each step)."""
    from ..export.onnx_decode import ort_decode, torch_decode
    from ..export.ort import make_session

    step, _ = _decode_step(args, model, overrides)
    steps = min(DECODE_CHECK_STEPS, args.max_len)
    tokens = example_tokens(model, args.batch, steps, args.seed + 1)
    got = ort_decode(make_session(path, "cpu"), tokens, args.max_len)
    want = torch_decode(step, model, tokens, args.max_len)
    names = ("logits", "present keys", "present values")
    checks = [
        _close(f"{steps} decode steps B={args.batch}, {n}", "ORT", g, w) for n, g, w in zip(names, got, want)
    ]
    return 0 if all(checks) else 1


def _check_inputs(args: argparse.Namespace, model: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Inputs other than the traced example: new tokens; for a decode step also random caches
    filled before a position half way through them (a step that ignored them would fail)."""
    import torch

    tokens = example_tokens(model, args.batch, inputs[0].shape[1], args.seed + 1)
    if not args.decode:
        return (tokens,)
    g = torch.Generator().manual_seed(args.seed + 1)
    pos = args.max_len // 2
    caches = [torch.zeros_like(c) for c in inputs[2:]]
    for c in caches:
        c[:, :, :, :pos] = torch.randn(c[:, :, :, :pos].shape, generator=g, dtype=c.dtype)
    return (tokens, torch.tensor(pos), *caches)


def _aoti(args: argparse.Namespace, model: Any, overrides: dict[str, Any], what: str) -> int:
    """Export ``what`` as an AOTInductor package; --check loads it in a fresh process (without
    importing this project) and compares its outputs with the module in this process."""
    import torch

    from ..export.aoti import export_aoti, run_in_fresh_process

    if args.decode:
        target, inputs = _decode_step(args, model, overrides)
    else:
        inputs = (example_tokens(model, args.batch, args.seq, args.seed),)
        target = model
        if not args.no_rewrite:
            from ..api import transform

            target = transform(model, inputs, dynamic_shapes=not args.static, **overrides)
    status(f"export: capturing {what} and compiling it with AOTInductor (a C++ build: tens of seconds) ...")
    result = export_aoti(
        target,
        inputs,
        args.output,
        dynamic=not args.static,
        rewrite=False,
        triton_kernels=not args.no_triton_kernels,
    )
    _show(result, "AOTInductor package")
    if not args.check:
        return 0
    status("export: loading the package in a fresh process (without snlp_compile) ...")
    inputs = _check_inputs(args, model, inputs)
    with torch.no_grad():
        want = target(*inputs)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    got = run_in_fresh_process(result.path, inputs)
    checks = [
        _close(f"output {i} {tuple(w.shape)}", "package", g, w) for i, (g, w) in enumerate(zip(got, want))
    ]
    return 0 if len(got) == len(want) and all(checks) else 1


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
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        ok &= _close(f"B={batch} T={seq}", "ORT", got, want)
    return 0 if ok else 1


def _show(result: Any, kind: str) -> None:
    """Print an export's SNLP report (a rewritten model) and summary, and where ``kind`` was written."""
    if result.snlp_report is not None:
        print(result.snlp_report)
        print()
    print(result)
    announce(kind, result.path)


def _close(what: str, runtime: str, got: Any, want: Any) -> bool:
    """One check line: ``got`` (from ``runtime``, cast to ``want``'s dtype) against PyTorch's
    ``want`` at rtol 1e-4 (atol 1e-4 of its largest magnitude); True when close."""
    import torch

    got = got.to(want.dtype)
    err = (got - want).abs().max().item()
    close = torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    print(f"check {what}: max |{runtime} - PyTorch| = {err:.3g} ({'ok' if close else 'MISMATCH'})")
    return close
