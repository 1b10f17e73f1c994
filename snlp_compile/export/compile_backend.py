"""The ``torch.compile`` backend "snlp": Dynamo's graph -> SNLP rewrite -> Inductor.

Dynamo hands a backend a torch-level graph with the modules inlined and the parameters and
buffers lifted to placeholders. The compiler's passes want what ``transform()`` produces from a
module: an aten graph whose weights are attributes (so they can be stacked once, at compile time)
and whose nodes carry ``nn_module_stack`` (so layers can be found). So the backend *lifts* the
Dynamo graph back into a module: weight placeholders become attributes at their original dotted
paths, size placeholders are read off the tensor inputs again, module paths are cleaned of
Dynamo's ``L['self']`` spelling. ``transform()`` then captures that module like any other
(torch.export runs a GraphModule through an interpreter that keeps node metadata) and the
result goes to Inductor. A graph that cannot be rewritten (refused, or not capturable) is handed
to Inductor unchanged, with a warning that names the reason.

The weights are folded into stacked copies at compile time (as Inductor's ``freezing`` does).
With the default ``check_weights="content"`` every call checks that the weights it was given are
the ones it folded: same objects, same version counters, same bytes (``p.data.mul_(2)`` bumps no
version counter; one read of the weights and a host sync per call). ``check_weights="alias"``
makes that cheap: the model's weights that the stacked buffers copy row by row become views of
those rows, and its other parameters share the rewritten graph's copies (``export.weight_alias``),
so an in-place edit (through ``.data`` too, or ``load_state_dict``) writes what the compiled graph
reads and a call only checks that they were not replaced; the rest (buffers, weights something
was folded from) keep the byte check. The price: the model's weights then share storage, which
``safetensors.torch.save_model`` refuses (opt-in for that reason). A changed weight recompiles
the graph with the live weights: an edit after compiling is used, never a stale copy.
"""

from __future__ import annotations

import logging
import operator
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..api import transform
from ..config import SNLPConfig, resolve_config
from ..errors import SNLPCaptureError, SNLPConfigError, SNLPError, SNLPRefusal
from ..report import ExplainReport
from .weight_alias import Alias, alias_weights

BACKEND_NAME = "snlp"
log = logging.getLogger("snlp_compile")

# components of a Dynamo source or module path: ._modules['h'], .h, [0], ['0']
_COMPONENT = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\.(\w+)|\[(\d+)\]|\['([^']*)'\]")
_ROOT = re.compile(r"^[LG]\['[^']*'\]")
_WEIGHT_SOURCE = re.compile(r"\._(?:parameters|buffers)\['[^']*'\]$")


class SNLPBackendWarning(UserWarning):
    """The snlp backend compiled a graph sequentially (unchanged) instead of rewriting it."""


@dataclass
class BackendRecord:
    """What the backend did with one Dynamo graph: rewritten (report set) or not (reason set)."""

    graph_inputs: int
    report: ExplainReport | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    aliased: int = 0  # model weights made views of the stacked weights (no per-call check)
    checked: int = 0  # model weights the compiled graph checks on every call (check_weights)

    @property
    def rewritten(self) -> bool:
        return self.report is not None and self.report.rewritten


_RECORDS: list[BackendRecord] = []


def backend_records() -> list[BackendRecord]:
    """Every graph the snlp backend compiled in this process, oldest first."""
    return list(_RECORDS)


def clear_backend_records() -> None:
    _RECORDS.clear()


def module_path(dynamo_path: str) -> str:
    """``L['self'].transformer._modules['h'][0]`` -> ``transformer.h.0`` (the model's own spelling)."""
    rest = _ROOT.sub("", dynamo_path, count=1)
    return ".".join(next(g for g in m.groups() if g is not None) for m in _COMPONENT.finditer(rest))


def _source_name(node: fx.Node) -> str | None:
    source = getattr(node, "_dynamo_source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else str(name)


def _placeholder_weight_path(node: fx.Node) -> str | None:
    """Dotted path of the parameter/buffer a Dynamo placeholder stands for, None for real inputs."""
    name = _source_name(node)
    if name is not None:
        return module_path(name) if _WEIGHT_SOURCE.search(name) else None
    # Older Dynamo without sources on placeholders: its names spell the path,
    # e.g. l_self_modules_h_modules_0_parameters_weight_.
    m = re.match(r"^l_self_((?:modules_.+?_)*)(parameters|buffers)_(.+)_$", node.name)
    if m is None:
        return None
    mods = [p for p in re.split(r"(?:^|_)modules_", m.group(1).rstrip("_")) if p]
    return ".".join([*mods, m.group(3)])


def _set_attribute(root: torch.nn.Module, path: str, value: torch.Tensor) -> None:
    owner = root
    *parents, attr = path.split(".")
    for p in parents:
        if not hasattr(owner, p):
            owner.add_module(p, torch.nn.Module())
        owner = getattr(owner, p)
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(attr, value)
    else:
        owner.register_buffer(attr, value)


def _copy_attribute(src: torch.nn.Module, dst: torch.nn.Module, path: str) -> None:
    """Give ``dst`` the tensor or submodule ``src`` holds at ``path`` (same object, same path)."""
    *parents, attr = path.split(".")
    owner = src
    for p in parents:
        owner = getattr(owner, p)
    value = getattr(owner, attr)
    if isinstance(value, torch.Tensor):
        _set_attribute(dst, path, value)
        return
    holder = dst
    for p in parents:
        if not hasattr(holder, p):
            holder.add_module(p, torch.nn.Module())
        holder = getattr(holder, p)
    holder.add_module(attr, value)


@dataclass
class LiftedGraph:
    """A Dynamo graph as a module over its real inputs (weights as attributes)."""

    module: fx.GraphModule
    user_positions: list[int]  # positions of Dynamo's inputs the module takes, in order
    weights: list[tuple[int, str]]  # (position, dotted path) of the inputs made attributes


def lift_dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> LiftedGraph:
    """Turn Dynamo's graph (weights as placeholders) into a module the compiler can capture.

    Raises SNLPCaptureError when a size placeholder cannot be traced back to a tensor input.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise SNLPCaptureError(
            f"Dynamo graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs"
        )
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    user: list[int] = []
    weights: list[tuple[int, str]] = []
    sizes: list[fx.Node] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        path = _placeholder_weight_path(node) if isinstance(value, torch.Tensor) else None
        if path:
            _set_attribute(root, path, value)
            env[node] = graph.get_attr(path)
            weights.append((i, path))
        elif isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool):
            sizes.append(node)
        else:
            env[node] = graph.placeholder(node.name)
            user.append(i)
    for node in sizes:  # a size input: re-read it from the tensor input it was taken from
        env[node] = _size_node(graph, node, [(placeholders[j], env[placeholders[j]]) for j in user])
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op in ("get_attr", "call_module"):  # weights/modules Dynamo kept as attributes
            _copy_attribute(gm, root, str(node.target))
        new = graph.node_copy(node, lambda a: env[a])
        new.meta = {}
        stack = node.meta.get("nn_module_stack")
        if stack:
            new.meta["nn_module_stack"] = {k: (module_path(str(v[0])), v[1]) for k, v in stack.items()}
        env[node] = new
    graph.lint()
    module = fx.GraphModule(root, graph, class_name="DynamoGraph")
    module.training = False  # (fx's default flag, not the user's: Dynamo traced the modes into the ops)
    return LiftedGraph(module, user, weights)


def _size_node(graph: fx.Graph, node: fx.Node, tensors: list[tuple[fx.Node, fx.Node]]) -> fx.Node:
    want = str(node.meta.get("example_value", node.name))
    for original, lifted in tensors:
        val = original.meta.get("example_value")
        if not isinstance(val, torch.Tensor):
            continue
        for d, size in enumerate(val.shape):
            if str(size) == want:
                return graph.call_function(torch.ops.aten.sym_size.int, (lifted, d))
    raise SNLPCaptureError(
        f"size input {node.name} ({want}) is not the size of any tensor input of the graph"
    )


def split_options(options: dict[str, Any] | None) -> tuple[SNLPConfig, dict[str, Any]]:
    """Backend options -> (SNLPConfig, Inductor config patches).

    ``config`` (an SNLPConfig) and SNLPConfig field names configure the rewrite; every other key
    is passed to Inductor as a config patch (Inductor rejects names it does not know).
    """
    options = dict(options or {})
    config = options.pop("config", None)
    fields = set(SNLPConfig.__dataclass_fields__)
    overrides = {k: options.pop(k) for k in list(options) if k in fields}
    try:
        return resolve_config(config, overrides), options
    except SNLPConfigError as exc:
        raise SNLPConfigError(f"snlp backend options: {exc}") from exc


def inductor(
    gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None, patches: dict[str, Any]
) -> Callable[..., Any]:
    """Compile with Inductor, ``mode`` meaning what it means to torch.compile."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config = dict(list_mode_options(mode)) if mode not in (None, "default") else {}
    config.update(patches)
    compiled = compile_fx(gm, list(example_inputs), config_patches=config)
    assert callable(compiled)
    return compiled


def plain_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The transformed module as a flat graph (inputs in, output tuple out) for Inductor: without
    torch.export's pytree calling convention and input guards (Dynamo guards the inputs itself)."""
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.lint()
    return fx.GraphModule(gm, graph, class_name="SNLPGraph")


@dataclass
class _Build:
    """One compilation: the compiled function and, when rewritten, what it was built from."""

    compiled: Callable[..., Any]
    record: BackendRecord
    lifted: LiftedGraph | None = None
    module: torch.nn.Module | None = None  # the transformed module (the stacked weights' owner)


class _LiveWeights:
    """Calls the compiled graph with the weights it was compiled with, recompiling when they
    changed since: replaced (another tensor object or storage) or edited in place, including
    through ``.data`` (``p.data.mul_(2)``, what checkpoint loaders do), which bumps no version
    counter. ``check="content"`` (the default) compares every weight's bytes with a snapshot taken
    at compile time on every call (one pass over them on the device, one host sync; the snapshot
    costs their memory once more). ``"alias"`` first makes the weights the stacked buffers copy
    row by row views of their rows, and the other parameters share the rewritten graph's copies
    (``weight_alias``): an in-place edit of one is what the graph reads, so a call checks only
    their identity and data pointers, and only the rest (buffers, folded weights) by content; the
    model's weights then share storage (``safetensors.torch.save_model`` refuses such a model;
    ``save_file``, ``torch.save`` and ``save_pretrained`` write it). ``"version"`` keeps only the
    cheap check (object identity and version counters: in-place ops and ``load_state_dict``, not
    ``.data`` edits), no aliasing; ``"off"`` none."""

    def __init__(self, build: Callable[[list[Any]], _Build], example_inputs: list[Any], check: str):
        self.build = build
        self.check = check
        self._aliases: list[Alias] = []
        self._install(example_inputs)

    def _install(self, inputs: list[Any]) -> None:
        built = self.build(inputs)
        self.compiled = built.compiled
        lifted = built.lifted
        self.rewritten = lifted is not None
        if lifted is None or built.module is None:  # compiled unchanged: Inductor reads the live weights
            return
        ours = frozenset(a.data_ptr for a in self._aliases)
        aliases = alias_weights(built.module, lifted.weights, inputs, ours) if self.check == "alias" else []
        self._aliases = aliases
        aliased = {a.position for a in aliases}
        self.positions = [i for i, _ in lifted.weights]
        self.tensors = tuple(inputs[i] for i in self.positions)
        self.alias_positions = [a.position for a in aliases]
        self.alias_ptrs = [a.data_ptr for a in aliases]
        self.checked_positions = [i for i in self.positions if i not in aliased]
        checked = [inputs[i] for i in self.checked_positions]
        self.versions = tuple(t._version for t in checked)
        self.snapshot = [_as_bytes(t.detach()).clone() for t in checked] if self.check in _BYTES else []
        built.record.aliased = len(aliases)
        built.record.checked = len(checked) if self.check != "off" else 0
        self._user = operator.itemgetter(
            *lifted.user_positions, *([0, 0] if len(lifted.user_positions) < 2 else [])
        )
        self._n_user = len(lifted.user_positions)

    def __call__(self, *args: Any) -> Any:
        if not self.rewritten:
            return self.compiled(*args)
        if self.check != "off" and self.positions and self._changed(args):
            log.info("snlp backend: weights changed since compilation; recompiling the graph")
            self._install(list(args))
            if not self.rewritten:
                return self.compiled(*args)
        return self.compiled(*self._user(args)[: self._n_user])

    def _changed(self, args: Sequence[Any]) -> bool:
        if not all(map(operator.is_, [args[i] for i in self.positions], self.tensors)):
            return True  # another tensor object
        if [args[i].data_ptr() for i in self.alias_positions] != self.alias_ptrs:
            return True  # an aliased weight given another storage (``p.data = ...``, ``.to()``)
        given = [args[i] for i in self.checked_positions]
        if tuple(map(_VERSION, given)) != self.versions:
            return True
        if self.check not in _BYTES or not given:
            return False
        with torch.no_grad():
            now = [_as_bytes(t.detach()) for t in given]
            if any(b.shape != s.shape or b.device != s.device for b, s in zip(now, self.snapshot)):
                return True  # another size, dtype or device (``p.data = ...``)
            differs = [torch.ne(b, s).any() for b, s in zip(now, self.snapshot)]
            return bool(torch.stack(differs).any().item())


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, flat (compares NaNs and signed zeros bit for bit)."""
    return t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)


_VERSION = operator.attrgetter("_version")
_CHECKS = ("content", "alias", "version", "off")
_BYTES = ("content", "alias")  # the checks that compare the checked weights' bytes


def snlp_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """``torch.compile(model, backend="snlp", options={"iterations": 2, ...})``.

    Rewrites the layer chain found in Dynamo's graph into the layer-parallel solve and compiles
    the result with Inductor. Options: ``config`` (SNLPConfig) and/or SNLPConfig fields;
    ``check_weights`` ("content" by default, "alias", "version" or "off": see _LiveWeights); other keys
    are Inductor config patches. A graph that cannot be rewritten is compiled unchanged with an
    SNLPBackendWarning naming the reason; what happened to each graph is in backend_records().
    Weights edited after compiling are picked up (the graph is recompiled with them).
    """
    options = dict(options or {})
    check = options.pop("check_weights", "content")
    if check not in _CHECKS:
        raise SNLPConfigError(f"snlp backend options: check_weights must be one of {_CHECKS}, not {check!r}")
    config, patches = split_options(options)

    # Dynamo's fake mode while it compiles this graph: its fakes of the inputs carry the sizes it
    # made symbolic; a graph rebuilt at call time (edited weights) is compiled for those, not for
    # the sizes of the call that found the edit
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    first_inputs: list[Any] | None = None  # Dynamo's fakes of the first build's user inputs

    def build(inputs: list[Any]) -> _Build:
        nonlocal first_inputs
        if first_inputs is None:
            built = _compile_graph(gm, inputs, mode, config, patches)
            if fake_mode is not None and built.lifted is not None:
                first_inputs = [_fake(fake_mode, inputs[i]) for i in built.lifted.user_positions]
            return built
        with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
            return _compile_graph(gm, inputs, mode, config, patches, compile_as=first_inputs)

    return _LiveWeights(build, list(example_inputs), check)


def _fake(fake_mode: Any, value: Any) -> Any:
    """Dynamo's fake of a graph input (its memo returns the one it traced with), else the value."""
    return fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value


def _compile_graph(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    mode: str | None,
    config: SNLPConfig,
    patches: dict[str, Any],
    compile_as: Sequence[Any] | None = None,
) -> _Build:
    """The compiled graph over the user inputs, the lifted graph and the transformed module
    (weights folded in), or Inductor's compilation of the unchanged graph (over all its inputs).
    ``compile_as``: the user inputs Inductor compiles for (fakes with the first compilation's
    symbolic sizes), where they differ from the example inputs the rewrite is made and checked on."""
    record = BackendRecord(graph_inputs=len(example_inputs))
    try:
        lifted = lift_dynamo_graph(gm, example_inputs)
        user_inputs = tuple(example_inputs[i] for i in lifted.user_positions)
        with torch._guards.tracing(None):  # capture afresh, not inside Dynamo's tracing context
            transformed = transform(lifted.module, user_inputs, config)
    except (SNLPRefusal, SNLPCaptureError) as why:
        record.reason = f"{type(why).__name__}: {why}"
        warnings.warn(
            f"snlp backend: graph compiled sequentially, not rewritten: {why}",
            SNLPBackendWarning,
            stacklevel=3,
        )
        compiled = inductor(gm, example_inputs, mode, patches)
        _RECORDS.append(record)  # only once compiled: Inductor may restart Dynamo's analysis
        return _Build(compiled, record)
    record.report = ExplainReport.of(transformed)
    compiled = inductor(plain_graph(transformed), compile_as or user_inputs, mode, patches)
    _RECORDS.append(record)
    log.info("snlp backend rewrote a graph:\n%s", record.report)
    return _Build(compiled, record, lifted, transformed)


def register() -> None:
    """Register the "snlp" backend with torch._dynamo (idempotent)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if _COMPILER_FNS.get(BACKEND_NAME) is not snlp_backend:
        if BACKEND_NAME in _COMPILER_FNS:
            raise SNLPError(f"another torch.compile backend is already registered as {BACKEND_NAME!r}")
        register_backend(snlp_backend, name=BACKEND_NAME)
