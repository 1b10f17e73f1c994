"""AOTInductor packages of the rewritten model or decode step: ``torch.export`` ->
``torch._inductor.aoti_compile_and_package`` -> a ``.pt2`` file that a process without this
project can load (``torch._inductor.aoti_load_package``) and run.

The package is self-contained when its graph calls no opaque custom op: while ``torch.export``
traces, the kernel functions never choose the PDL launch or the fused decode attention (opaque
ops that only this project can run; ``kernels.tracing.exporting()``), so on a GPU the
layer-batched GEMV is its ``triton_op`` (``kernels.ops.TRITON_OPS``), whose Triton kernel
AOTInductor compiles in, where the transform's lowering uses it. ``triton_kernels=False`` exports
the graph with every kernel off (``passes.lowering.restricted``). On the CPU the graph is ATen ops
only. Any ``snlp::`` op left in the graph is listed in the package's metadata
(``snlp_custom_ops``); :func:`load_aoti` imports the project's kernels (registering their
schemas) before it loads, and checks them.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import SNLPConfig
from ..errors import SNLPConfigError, SNLPError, SNLPUsageError
from ..kernels import ops as kernel_ops
from ..passes.capture import example_args
from ..passes.lowering import NO_KERNELS, restricted
from ..quiet import quiet_export
from ..report import ExplainReport
from .onnx_export import capture_program, export_target

CUSTOM_OPS_KEY = "snlp_custom_ops"  # package metadata: comma-separated snlp:: ops the graph calls


class AOTILoadError(SNLPError):
    """A package could not be loaded or run (in this process or a fresh one)."""


@dataclass
class AOTIExport:
    """What export_aoti() wrote."""

    path: Path
    device: str
    custom_ops: list[str]  # opaque snlp:: ops left in the exported graph (empty: self-contained)
    op_counts: Counter[str]  # exported-graph ops before Inductor
    snlp_report: ExplainReport | None
    compile_seconds: float

    def __str__(self) -> str:
        top = ", ".join(f"{k} x{v}" for k, v in self.op_counts.most_common(6))
        needs = (
            f"needs {', '.join(self.custom_ops)}: load with snlp_compile.export.aoti.load_aoti"
            if self.custom_ops
            else "self-contained (no snlp:: ops; torch._inductor.aoti_load_package loads it)"
        )
        return "\n".join(
            [
                f"AOTInductor package: {self.path} ({self.device}, compiled in {self.compile_seconds:.1f} s)",
                f"  exported ops: {sum(self.op_counts.values())} ({top}, ...)",
                f"  {needs}",
            ]
        )


def graph_ops(program: torch.export.ExportedProgram) -> Counter[str]:
    """``namespace::name`` of every operator the exported graph calls."""
    counts: Counter[str] = Counter()
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            counts[node.target._schema.name] += 1
    return counts


def compiled_in(op: str) -> bool:
    """Whether AOTInductor compiles ``op`` into the package: a ``torch.library.triton_op``, whose
    Triton kernels Inductor traces into (``snlp::layer_gemv``, ``kernels.ops.TRITON_OPS``),
    unlike an opaque custom op."""
    return op in kernel_ops.TRITON_OPS


def _device_of(args: tuple[Any, ...]) -> str:
    devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
    if len(devices) > 1:
        raise SNLPUsageError(f"example inputs on several devices {sorted(devices)}: give them on one")
    return devices.pop() if devices else "cpu"


def export_aoti(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | Path,
    config: SNLPConfig | None = None,
    *,
    dynamic: bool = True,
    rewrite: bool = True,
    example_kwargs: dict[str, Any] | None = None,
    triton_kernels: bool = True,
    **overrides: Any,
) -> AOTIExport:
    """Rewrite ``model`` (unless it is already a transform() result, or ``rewrite=False``), export
    it and compile it into an AOTInductor package at ``path`` (``.pt2``) for the example inputs'
    device. ``dynamic`` keeps every free input dimension symbolic (sizes 0 and 1 are fixed by
    torch.export). A decode step: ``transform(CachedStep(model), step_inputs)`` or pass the
    ``CachedStep`` itself with the config. ``triton_kernels=False`` also leaves the GEMV kernel
    out (ATen ops only, cuBLAS on a GPU): for a runtime where Triton kernels cannot load."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise SNLPConfigError(f"an AOTInductor package is a .pt2 file, got {path.name!r}")
    args, kwargs = example_args(example_inputs), dict(example_kwargs or {})
    with quiet_export():  # (the export and the package's compile: both copy pytree specs)
        target, report = export_target(
            model, args, kwargs, config, overrides, rewrite=rewrite, dynamic=dynamic
        )
        program = capture_program(
            target,
            args,
            kwargs,
            dynamic=dynamic,
            kernels=_kernels(target, triton_kernels),
            what="AOTInductor",
        )
        ops = graph_ops(program)
        custom = sorted(op for op in ops if op.startswith("snlp::") and not compiled_in(op))
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        from torch._inductor import aoti_compile_and_package

        written = aoti_compile_and_package(
            program,
            package_path=str(path),
            inductor_configs={"aot_inductor.metadata": {CUSTOM_OPS_KEY: ",".join(custom)}},
        )
    return AOTIExport(
        path=Path(written),
        device=_device_of(args),
        custom_ops=custom,
        op_counts=ops,
        snlp_report=report,
        compile_seconds=time.perf_counter() - started,
    )


def _kernels(target: torch.nn.Module, triton: bool) -> contextlib.AbstractContextManager[None]:
    """The kernels a package may carry: the transform's (the opaque ones are never traced into an
    export), or (``triton=False``) none."""
    return contextlib.nullcontext() if triton else restricted(target, NO_KERNELS)


def load_aoti(path: str | Path, device_index: int = -1) -> Any:
    """Load a package written by :func:`export_aoti` in this process: the project's kernels are
    imported (this module imports them), so any ``snlp::`` op the package lists is registered;
    a listed op this process cannot register (no Triton) fails here, by name, not at the first call."""
    from torch._inductor import aoti_load_package

    path = Path(path)
    if not path.is_file():
        raise AOTILoadError(f"no AOTInductor package at {path}")
    try:
        runner = aoti_load_package(str(path), device_index=device_index)
    except Exception as exc:  # the loader raises RuntimeError with the C++ message
        raise AOTILoadError(f"could not load the package {path}: {exc}") from exc
    listed = runner.get_metadata().get(CUSTOM_OPS_KEY, "")
    for op in filter(None, listed.split(",")):
        namespace, _, name = op.partition("::")
        if not hasattr(getattr(torch.ops, namespace), name):
            raise AOTILoadError(
                f"the package calls {op}, which this process cannot register (it needs Triton and a GPU)"
            )
    return runner


# run in a fresh interpreter: argv = package, inputs file, outputs file, "1" to import the project first
_FRESH = """
import sys, torch
package, inputs, outputs, project = sys.argv[1:5]
if project == "1":
    from snlp_compile.export.aoti import load_aoti
    runner = load_aoti(package)
else:
    runner = torch._inductor.aoti_load_package(package)
with torch.no_grad():
    result = runner(*torch.load(inputs))
torch.save(list(result) if isinstance(result, (tuple, list)) else [result], outputs)
"""


def run_in_fresh_process(
    path: str | Path, inputs: tuple[torch.Tensor, ...], *, import_project: bool = False, timeout: float = 600
) -> list[torch.Tensor]:
    """Load the package in a new Python process (by default without importing this project, as a
    deployment would) and run it on ``inputs``; returns its outputs. The check that a package is
    self-contained: a failure raises AOTILoadError with the process's last error line."""
    with tempfile.TemporaryDirectory() as tmp:
        ins, outs = Path(tmp) / "inputs.pt", Path(tmp) / "outputs.pt"
        torch.save(tuple(t.detach() for t in inputs), ins)
        argv = [sys.executable, "-c", _FRESH, str(Path(path).resolve()), str(ins), str(outs)]
        try:
            done = subprocess.run(
                [*argv, "1" if import_project else "0"], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise AOTILoadError(f"the package did not run within {timeout:.0f} s in a fresh process") from exc
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            last = lines[-1] if lines else "(no output)"
            raise AOTILoadError(f"the package failed in a fresh process (rc {done.returncode}): {last}")
        result: list[torch.Tensor] = torch.load(outs)
        return result
