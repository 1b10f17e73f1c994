"""ONNX export of the rewritten model through ``torch.onnx.export(..., dynamo=True)``.

The transformed module is a GraphModule of plain batched tensor ops (einsum over stacked
weights, 4-D attention, cumsum or an unrolled log-depth scan for the correction), so the
exporter maps it op by op: no Loop/Scan, and the matmul count is that of one layer times K.
Batch and sequence sizes stay symbolic (torch.export ``Dim.AUTO``); the input dimensions get
readable names ("batch", "sequence") in the ONNX graph.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..api import transform
from ..config import SNLPConfig, resolve_config
from ..errors import SNLPCaptureError, SNLPConfigError, SNLPUsageError
from ..passes.capture import auto_dims, example_args
from ..passes.lowering import NO_KERNELS, restricted
from ..quiet import quiet_onnx_exporter
from ..report import ExplainReport

DEFAULT_OPSET = 18
_DIM_NAMES = ("batch", "sequence")


@dataclass
class ONNXExport:
    """What export_onnx() wrote."""

    path: Path
    opset: int
    inputs: list[tuple[str, list[int | str]]]  # name, shape (str = symbolic dimension)
    outputs: list[tuple[str, list[int | str]]]
    op_counts: Counter[str]
    snlp_report: ExplainReport | None  # None when exported without the rewrite
    report_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def fmt(vals: list[tuple[str, list[int | str]]]) -> str:
            return ", ".join(f"{n}[{', '.join(map(str, s))}]" for n, s in vals)

        top = ", ".join(f"{k} x{v}" for k, v in self.op_counts.most_common(8))
        lines = [
            f"ONNX model: {self.path} (opset {self.opset})",
            f"  inputs:  {fmt(self.inputs)}",
            f"  outputs: {fmt(self.outputs)}",
            f"  nodes:   {sum(self.op_counts.values())} ({top}, ...)",
        ]
        if self.report_path is not None:
            lines.append(f"  exporter report: {self.report_path}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def is_transformed(model: torch.nn.Module) -> bool:
    """True for a module transform() returned (it carries its explain report)."""
    return isinstance(model, fx.GraphModule) and getattr(model, "snlp_report", None) is not None


def export_program(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    dynamic: bool,
) -> torch.export.ExportedProgram:
    """torch.export (non-strict) with AUTO dimensions; the error names the model when it fails.
    A rewritten model is exported with every kernel off (``passes.lowering.restricted``): ONNX
    has no op for a Triton kernel (this ``torch.export`` runs outside ``torch.onnx``, so the
    kernels' own ONNX check cannot see it). The model as written takes no opaque kernel while
    exporting (``kernels.attention``)."""
    program = capture_program(
        model, args, kwargs, dynamic=dynamic, kernels=restricted(model, NO_KERNELS), what="ONNX"
    )
    return decompose_device_rms_norm(program)


def capture_program(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    dynamic: bool,
    kernels: contextlib.AbstractContextManager[Any],
    what: str,
) -> torch.export.ExportedProgram:
    """The one torch.export call of every exporter (ONNX, AOTInductor): non-strict, every free
    dimension AUTO when ``dynamic`` (the spec the compiler captures with), under ``kernels`` (the
    kernels the target may carry); a deferred-K/V step is refused and a failed capture is one
    SNLPCaptureError naming the model and ``what`` ("ONNX", "AOTInductor") it was exported for."""
    refuse_deferred(model, what)
    try:
        with torch.no_grad(), kernels:
            return torch.export.export(
                model,
                args,
                kwargs,
                dynamic_shapes=auto_dims(model, args, kwargs) if dynamic else None,
                strict=False,
            )
    except Exception as exc:  # torch.export raises many types; one clear error with its message
        raise SNLPCaptureError(
            f"torch.export could not capture {type(model).__name__} for {what} export: {exc}"
        ) from exc


def refuse_deferred(model: torch.nn.Module, what: str) -> None:
    """A step transformed with deferred_kv writes the caches itself (in place, outside its
    outputs): an exported step could not, so it is refused by name."""
    for name, sub in model.named_modules():
        if getattr(sub, "deferred_layers", None) is not None:
            raise SNLPUsageError(
                f"'{name}' defers its K/V (SNLPConfig.deferred_kv): the step writes the caches itself, "
                f"which an exported {what} step cannot; export a step transformed with deferred_kv=False"
            )


def decompose_device_rms_norm(
    program: torch.export.ExportedProgram, *, force: bool = False
) -> torch.export.ExportedProgram:
    """Replace aten.rms_norm by primitive ops when it runs on an accelerator (or ``force``): the
    exporter would otherwise decompose it into that device's fused kernel op (see _rms_norm)."""
    on_device = [
        n
        for n in program.graph.nodes
        if n.target is torch.ops.aten.rms_norm.default
        and isinstance(n.args[0].meta.get("val"), torch.Tensor)
        and n.args[0].meta["val"].device.type != "cpu"
    ]
    if not (on_device or force):
        return program
    return program.run_decompositions({torch.ops.aten.rms_norm.default: _rms_norm})


def _rms_norm(
    x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    """aten.rms_norm in primitive ops, computed as PyTorch computes it (half inputs and the weight
    in float32, eps defaulting to float32's machine epsilon). On CUDA, torch 2.11 decomposes
    rms_norm into ``_fused_rms_norm``, which its ONNX exporter cannot translate."""
    opmath = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    eps = torch.finfo(opmath).eps if eps is None else eps
    dims = list(range(-len(normalized_shape), 0))
    up = x.to(opmath)
    y = up * torch.rsqrt(up.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(opmath)
    return y.to(x.dtype)


def _readable_dims(model_proto: Any, dim_names: dict[str, tuple[str, ...]] | None = None) -> dict[str, str]:
    """Rename the exporter's symbols (s35, s77...) after the input dimensions they stand for:
    ``dim_names[input]`` where given, else "batch", "sequence", then ``<input>_dim<d>``."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for inp in model_proto.graph.input:
        for d, dim in enumerate(inp.type.tensor_type.shape.dim):
            sym = dim.dim_param
            if not sym or sym in names or not re.fullmatch(r"\w+", sym) or sym.isdigit():
                continue
            given = (dim_names or {}).get(inp.name, _DIM_NAMES)
            want = given[d] if d < len(given) else f"{inp.name}_dim{d}"
            if want in taken:
                want = f"{inp.name}_dim{d}"
            names[sym] = want
            taken.add(want)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None

    def rename(values: Any) -> None:
        for v in values:
            for dim in v.type.tensor_type.shape.dim:
                if dim.dim_param.isdigit():  # a size the exporter wrote as a symbol ("16"): a size
                    dim.dim_value = int(dim.dim_param)
                elif dim.dim_param and pattern is not None:
                    dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)

    rename(model_proto.graph.input)
    rename(model_proto.graph.output)
    rename(model_proto.graph.value_info)
    return names


def _static_input_dims(proto: Any) -> list[str]:
    """Input dimensions that stayed fixed although dynamic shapes were asked for: torch.export
    specialises sizes 0 and 1 (and sizes the model's code pins), so say which and why."""
    notes = []
    for inp in proto.graph.input:
        for d, dim in enumerate(inp.type.tensor_type.shape.dim):
            if not dim.dim_param and dim.dim_value in (0, 1):
                note = (
                    f"input '{inp.name}' dimension {d} is fixed to {dim.dim_value}: torch.export "
                    "specialises example sizes 0 and 1; export with a larger example size to keep it dynamic"
                )
                warnings.warn(note, stacklevel=3)
                notes.append(note)
    return notes


def _shapes(values: Any) -> list[tuple[str, list[int | str]]]:
    return [
        (v.name, [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in values
    ]


def all_op_types(model_proto: Any) -> Counter[str]:
    """Op types of every node, including those inside functions and subgraphs (If/Loop bodies)."""
    import onnx

    counts: Counter[str] = Counter()

    def walk(nodes: Any) -> None:
        for node in nodes:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g.node)
                for g in attr.graphs:
                    walk(g.node)

    walk(model_proto.graph.node)
    for fn in model_proto.functions:
        walk(fn.node)
    return counts


def export_target(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    config: SNLPConfig | None,
    overrides: dict[str, Any],
    *,
    rewrite: bool,
    dynamic: bool,
) -> tuple[torch.nn.Module, ExplainReport | None]:
    """What an export exports, and its explain report: ``model`` itself when it is already a
    transform() result, else its rewrite (``rewrite``), else ``model`` unchanged; config and
    overrides only where a rewrite happens here (an error otherwise, not silently ignored)."""
    if is_transformed(model):
        if config is not None or overrides:
            raise SNLPConfigError(
                "model is already transformed: pass config/overrides to transform(), not here"
            )
        return model, ExplainReport.of(model)
    if rewrite:
        cfg = resolve_config(config, overrides)
        target = transform(model, args, cfg.replace(dynamic_shapes=dynamic), example_kwargs=kwargs)
        return target, ExplainReport.of(target)
    if config is not None or overrides:
        raise SNLPConfigError("rewrite=False exports the model unchanged: config/overrides do not apply")
    return model, None


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | Path,
    config: SNLPConfig | None = None,
    *,
    dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    report: bool = False,
    example_kwargs: dict[str, Any] | None = None,
    rewrite: bool = True,
    output_names: list[str] | None = None,
    input_names: list[str] | None = None,
    dim_names: dict[str, tuple[str, ...]] | None = None,
    **overrides: Any,
) -> ONNXExport:
    """Rewrite ``model`` (unless it is already a transform() result, or ``rewrite=False``) and
    write it to ``path`` as ONNX.

    dynamic: keep batch and sequence (every dimension the model leaves free) symbolic.
    opset: ONNX opset of the default domain (18 to 23).
    report: save the exporter's markdown report beside the model (``<stem>.export_report.md``).
    rewrite=False exports the model as written: the sequential baseline.
    output_names: names of the flattened outputs; default "output" (one) or "output_0", ...
    input_names: names of the flattened inputs; default the forward's parameter names.
    dim_names: input name -> names of its symbolic dimensions; default "batch", "sequence".
    The file is checked with ``onnx.checker`` before returning.
    """
    import onnx

    if not isinstance(opset, int) or not 18 <= opset <= 23:
        raise SNLPConfigError(f"opset must be an int from 18 to 23, got {opset!r}")
    path = Path(path)
    args, kwargs = example_args(example_inputs), dict(example_kwargs or {})
    with quiet_onnx_exporter():
        target, snlp_report = export_target(
            model, args, kwargs, config, overrides, rewrite=rewrite, dynamic=dynamic
        )
        program = export_program(target, args, kwargs, dynamic=dynamic)
        if output_names is None:
            n_out = len(program.graph_signature.user_outputs)
            output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        onnx_program = torch.onnx.export(
            program,
            opset_version=opset,
            dynamo=True,
            report=report,
            artifacts_dir=path.parent,
            output_names=output_names,
            input_names=input_names,
            verbose=False,
        )
    if onnx_program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    onnx_program.save(path)  # large weights go to external data here
    proto = onnx.load(str(path), load_external_data=False)
    notes = []
    renamed = _readable_dims(proto, dim_names) if dynamic else {}
    if renamed:
        notes.append("symbolic dims: " + ", ".join(f"{k} -> {v}" for k, v in renamed.items()))
    if dynamic:
        onnx.save_model(proto, str(path))  # external data references are kept as they are
    onnx.checker.check_model(str(path))
    if dynamic:
        notes.extend(_static_input_dims(proto))
    result = ONNXExport(
        path=path,
        opset=opset,
        inputs=_shapes(proto.graph.input),
        outputs=_shapes(proto.graph.output),
        op_counts=all_op_types(proto),
        snlp_report=snlp_report,
        notes=notes,
    )
    if report:
        result.report_path = _claim_report(path, started)
    return result


def _claim_report(path: Path, since: float) -> Path | None:
    """Move the exporter's timestamped report next to the model under a predictable name."""
    found = sorted(
        (p for p in path.parent.glob("onnx_export_*.md") if p.stat().st_mtime >= since - 1),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        return None
    target = path.with_suffix(".export_report.md")
    found[-1].replace(target)
    return target
