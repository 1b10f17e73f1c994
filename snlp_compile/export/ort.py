"""ONNX Runtime helpers: sessions on the device that was asked for, and a runner that keeps
inputs and outputs on that device.

A GPU session that silently runs part of the model on the CPU is a benchmark that measures the
wrong thing, so ``make_session(device="cuda")`` reads ONNX Runtime's own node placement (its
verbose log) and raises, naming the nodes, when a node that does real work landed on the CPU.
ONNX Runtime deliberately keeps small shape computations (Shape, Gather on a shape, Concat of
sizes...) on the CPU; nodes whose outputs are integer tensors of rank <= 1 are therefore allowed
there, and ``allow_cpu`` names further op types or node names to accept.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SNLPError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_PLACED = re.compile(r"(Node\(s\)|All nodes) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"(\w+) \(([^()]*)\)")
_INT_TYPES = {2, 3, 4, 5, 6, 7, 9, 12, 13}  # onnx TensorProto: (u)int8/16/32/64, bool


class ProviderError(SNLPError):
    """The session cannot run where it was asked to (provider missing, or nodes fell back to the CPU)."""

    def __init__(self, message: str, nodes: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.nodes = nodes or []  # (op_type, node name) of the nodes that fell back


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def providers_for(
    device: str, *, tensorrt: bool = False, device_id: int = 0, options: Mapping[str, Any] | None = None
) -> list[Any]:
    """The provider list for ``device`` ("cpu" or "cuda"); raises ProviderError when this
    onnxruntime build lacks them (e.g. the CPU-only wheel instead of onnxruntime-gpu)."""
    if device not in ("cpu", "cuda"):
        raise ProviderError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        if tensorrt:
            raise ProviderError("tensorrt=True needs device='cuda'")
        return ["CPUExecutionProvider"]
    have = available_providers()
    wanted = (["tensorrt"] if tensorrt else []) + ["cuda"]
    missing = [PROVIDERS[w] for w in wanted if PROVIDERS[w] not in have]
    if missing:
        raise ProviderError(
            f"device='cuda' needs {', '.join(missing)}, but this onnxruntime offers {have}: "
            "install onnxruntime-gpu (and TensorRT for tensorrt=True)"
        )
    gpu_options = {"device_id": device_id, **dict(options or {})}
    providers: list[Any] = []
    if tensorrt:
        providers.append((PROVIDERS["tensorrt"], {"device_id": device_id}))
    providers.append((PROVIDERS["cuda"], gpu_options))
    providers.append("CPUExecutionProvider")
    return providers


@contextmanager
def _stderr_to(path: str) -> Iterator[None]:
    """Send file descriptor 2 (where onnxruntime's C++ logger writes) to ``path``."""
    saved = os.dup(2)
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def parse_placements(log: str) -> dict[str, list[tuple[str, str]] | int]:
    """Node placement from onnxruntime's verbose log: provider -> [(op_type, name)], or the node
    count alone when one provider took the whole graph ("All nodes placed on [...]")."""
    placements: dict[str, list[tuple[str, str]] | int] = {}
    current: str | None = None
    for line in log.splitlines():
        header = _PLACED.search(line)
        if header:
            kind, provider, count = header.groups()
            if kind == "All nodes":
                placements[provider] = int(count)
                current = None
            else:
                placements[provider] = []
                current = provider
            continue
        if current is not None and "VerifyEachNodeIsAssignedToAnEp" in line:
            body = line.split("VerifyEachNodeIsAssignedToAnEp]", 1)[1]
            found = _NODE.findall(body)
            if found:
                nodes = placements[current]
                assert isinstance(nodes, list)
                nodes.extend(found)
            else:
                current = None
        elif current is not None:
            current = None
    return placements


def _integer_shape_outputs(model: Any) -> dict[str, bool]:
    """Node name -> True when all its outputs are integer tensors of rank <= 1 (shape arithmetic)."""
    info: dict[str, tuple[int, int]] = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = v.type.tensor_type
        info[v.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else 99)
    for init in model.graph.initializer:
        info[init.name] = (init.data_type, len(init.dims))
    result = {}
    for node in model.graph.node:
        outs = [info.get(o) for o in node.output if o]
        result[node.name] = bool(outs) and all(
            o is not None and o[0] in _INT_TYPES and o[1] <= 1 for o in outs
        )
    return result


def cpu_fallbacks(
    placements: Mapping[str, list[tuple[str, str]] | int], model: Any, allow_cpu: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """The nodes placed on the CPU that do real work (not shape arithmetic, not allowed by name)."""
    cpu = placements.get("CPUExecutionProvider")
    if not cpu:
        return []
    if isinstance(cpu, int):  # the whole graph on the CPU
        return [("*", f"all {cpu} nodes")]
    allowed = set(allow_cpu)
    shape_math = _integer_shape_outputs(model)
    return [
        (op, name)
        for op, name in cpu
        if not (op in allowed or name in allowed or shape_math.get(name, False))
    ]


def _load_structure(model: str | Path | bytes) -> Any:
    import onnx

    if isinstance(model, (bytes, bytearray)):
        return onnx.load_model_from_string(bytes(model))
    return onnx.load(str(model), load_external_data=False)


def make_session(
    model: str | Path | bytes,
    device: str = "cpu",
    *,
    tensorrt: bool = False,
    device_id: int = 0,
    provider_options: Mapping[str, Any] | None = None,
    session_options: Any = None,
    check_placement: bool = True,
    allow_cpu: Iterable[str] = (),
) -> Any:
    """An onnxruntime.InferenceSession on ``device`` ("cpu" or "cuda"; TensorRT first when asked).

    For device="cuda" (and check_placement), raises ProviderError naming every node that fell
    back to the CPU, other than shape arithmetic and the op types / node names in ``allow_cpu``.
    """
    import onnxruntime as ort

    providers = providers_for(device, tensorrt=tensorrt, device_id=device_id, options=provider_options)
    source = str(model) if isinstance(model, Path) else model
    if device == "cpu" or not check_placement:
        return ort.InferenceSession(source, sess_options=session_options, providers=providers)
    so = session_options or ort.SessionOptions()
    saved = (so.log_severity_level, so.log_verbosity_level)
    so.log_severity_level, so.log_verbosity_level = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "ort.log")
        with _stderr_to(log_path):
            session = ort.InferenceSession(source, sess_options=so, providers=providers)
        log = Path(log_path).read_text(errors="replace")
    so.log_severity_level, so.log_verbosity_level = saved
    placements = parse_placements(log)
    if not placements:
        raise ProviderError("could not read onnxruntime's node placement from its verbose log")
    fallen = cpu_fallbacks(placements, _load_structure(model), allow_cpu)
    if fallen:
        listed = ", ".join(f"{name} ({op})" for op, name in fallen[:20])
        more = f" and {len(fallen) - 20} more" if len(fallen) > 20 else ""
        raise ProviderError(
            f"{len(fallen)} node(s) fell back to the CPU although device='cuda' was asked for: {listed}{more}. "
            "Pass allow_cpu=[op types or node names] to accept them.",
            nodes=fallen,
        )
    return session


# --- IOBinding ------------------------------------------------------------------------------

_ONNX_TYPES = {
    torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6, torch.int64: 7,
    torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16,
}  # fmt: skip
_TORCH_TYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
    "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool,
    "tensor(int16)": torch.int16,
}  # fmt: skip


@dataclass
class _Bound:
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class IOBindingRunner:
    """Runs a session on torch tensors that stay where they are (no host round trip).

    ``runner(inputs)`` binds, runs and returns the outputs as torch tensors on the runner's
    device. For timing, ``runner.bind(inputs)`` once and then ``runner.run()`` in the loop:
    it re-uses the bound input and output buffers.
    """

    def __init__(self, session: Any, device: str = "cpu", device_id: int = 0):
        self.session = session
        self.device = torch.device(device if device == "cpu" else f"cuda:{device_id}")
        self.device_type = "cpu" if device == "cpu" else "cuda"
        self.device_id = 0 if device == "cpu" else device_id
        self.binding = session.io_binding()
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.bound: _Bound | None = None

    def _bind_tensor(self, kind: str, name: str, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise ProviderError(f"{kind} '{name}' is on {t.device}, the runner binds {self.device}")
        if t.dtype not in _ONNX_TYPES:
            raise ProviderError(f"{kind} '{name}' has dtype {t.dtype}, which cannot be bound")
        if not t.is_contiguous():
            raise ProviderError(f"{kind} '{name}' must be contiguous to be bound")
        bind = self.binding.bind_input if kind == "input" else self.binding.bind_output
        bind(name, self.device_type, self.device_id, _ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())

    def _output_buffers(self) -> dict[str, torch.Tensor]:
        """Run once with onnxruntime-allocated outputs to learn their shapes, then allocate them."""
        for name in self.output_names:
            self.binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(self.binding)
        types = {o.name: o.type for o in self.session.get_outputs()}
        values = self.binding.get_outputs()
        return {
            name: torch.empty(v.shape(), dtype=_TORCH_TYPES[types[name]], device=self.device)
            for name, v in zip(self.output_names, values)
        }

    def bind(
        self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Bind input tensors (and output buffers; allocated here when not given)."""
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self.input_names]
        if missing or unknown:
            raise ProviderError(
                f"inputs: missing {missing}, unknown {unknown}; the model takes {self.input_names}"
            )
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        held = {n: inputs[n] for n in self.input_names}
        for name, t in held.items():
            self._bind_tensor("input", name, t)
        outs = dict(outputs) if outputs is not None else self._output_buffers()
        for name in self.output_names:
            self._bind_tensor("output", name, outs[name])
        self.bound = _Bound(held, outs)  # keeps the buffers alive while bound

    def run(self) -> None:
        """One run over the bound buffers."""
        if self.bound is None:
            raise ProviderError("call bind() before run()")
        self.session.run_with_iobinding(self.binding)

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        self.bind(inputs)
        self.run()
        assert self.bound is not None
        return [self.bound.outputs[n] for n in self.output_names]
