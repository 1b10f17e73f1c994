"""The safety net (issue 22): a rewritten model is checked against the original before it is
handed out, and refused when they disagree (``SNLPConfig.verify``, on by default).

    original (a private copy)  --example inputs, 2 calls [+ a 2nd batch size]-->  outputs, layer outputs
    rewritten, from that trace --the same inputs, one batched evaluation-->        its outputs

The cheap check, per call: the solve warm-started from the original's own trace (the outputs of
its parallel layer modules) with K = 1. The exact trace is the iteration's fixed point, so one
evaluation of the batched body there, corrected, must give the exact trace and outputs back; it
runs the same batched body, stacked weights, correction and hidden-state readers as the
configured solve, at inputs that differ from layer to layer. When it disagrees (or the layer
modules' outputs are not the chain's hidden states) the whole exact solve decides: K = the largest
stage from h0, whatever the configured K, init and deferral. Two calls, because layers that carry
state between calls show only on the second; and, when the batch size is symbolic, one more call
at batch + 1 (rows repeated), because size rules that coincide at the example's sizes (batch ==
the number of layers) fail at the others. Inputs whose sizes the capture left unrelated to the
batch (a decode step's caches, read by attention kept whole) grow along a dimension of the batch's
size too: the first such growth the original takes is the one compared. A disagreement beyond the dtype's tolerance
(``TOLERANCE``) is an ``SNLPRefusal`` naming the parallel layer with the largest error.

Nothing is left behind: the buffers the calls may write are restored, the solve's K, init,
deferral and run-time state (warm trace, pending deferred K/V) are reset through its
``SolveHandle``. With deferred K/V the check runs the undeferred solve.

Cost, when the rewrite is right: per call one forward of the original and one of the rewritten
model at K = 1 (2-3 calls), plus a copy of the model's buffers (parameters are shared); on
nanochat-small (8 layers, d=128, 2 shared CPU cores) +0.74 s on a 3.44 s transform at an example
of 2 x 64 tokens (three calls), +0.42 s on 2.28 s at 1 x 256 (static batch: two calls)
(``benchmarks/verify_cost.py``). The whole exact solve (K = N) runs only when the cheap check
disagrees: before a refusal, or when the layer modules' outputs are not the hidden states.
Switch it off with ``transform(..., verify=False)`` (``SNLPConfig.verify``).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, suppress
from functools import partial
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import SNLPRefusal
from .ir.plan import SOLVE_NAME
from .report import PassResult
from .solve.handle import SolveHandle

# relative error (Frobenius norm of the difference over that of the reference) allowed per dtype
TOLERANCE = {
    torch.float64: 1e-7,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}


# float32 when matmuls may run in TF32 or bf16 (torch.set_float32_matmul_precision("high"/"medium"))
TOLERANCE_REDUCED_FLOAT32 = 5e-3


def tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return TOLERANCE_REDUCED_FLOAT32
    return TOLERANCE.get(dtype, 1e-4)


def verify_pass(c: Any) -> PassResult:
    """The pipeline's last pass (``SNLPConfig.verify``): refuses a rewrite that computes a
    different function from the model's on the example inputs (``c``: ``pipeline.Compilation``)."""
    calls = verify_rewrite(
        c.model,
        c.graph_module(),
        c.example_args,
        c.example_kwargs or {},
        container=c.container,
        parallel=[layer.index for layer in c.layers[c.first_parallel :]],
    )
    return PassResult(False, {"calls checked": calls})


def verify_rewrite(
    model: torch.nn.Module,
    rewritten: fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    container: str = "",
    parallel: list[int] | None = None,
) -> int:
    """Compare ``rewritten`` (exact mode) with ``model`` on the example inputs (see the module
    docstring); returns how many calls were compared, raises SNLPRefusal on a disagreement."""
    handle = SolveHandle.of(rewritten)
    if handle is None:
        return 0
    reference = _private_copy(model)
    paths = [f"{container}.{i}" if container else str(i) for i in (parallel or [])]
    bigger = _other_batches(rewritten, args, kwargs)
    calls = 3 if bigger else 2
    with _exact_mode(handle), _restored_buffers(rewritten), torch.no_grad():
        checked = 0
        for call in range(1, calls + 1):
            what = f"call {call}" if call <= 2 else f"a second batch size (call {call})"
            ref_layers: list[torch.Tensor | None] = []
            if call <= 2:
                a, k = args, kwargs
                with _layer_outputs(reference, paths, ref_layers):
                    expected = reference(*_clone(a), **_clone(k))
            else:  # the first grown inputs the original takes (quietly: a fixed batch fails there)
                taken = _first_taken(reference, paths, bigger, ref_layers)
                if taken is None:
                    break  # the original takes none of them: nothing to compare
                (a, k), expected = taken
            # the cheap check: one evaluation from the original's own trace (exact iff the rewrite is)
            if _agrees_from_trace(rewritten, handle, a, k, expected, ref_layers):
                checked = call
                continue
            # else the whole exact solve (K = the largest stage) decides
            try:
                got = _quiet(rewritten, a, k)
            except Exception as exc:  # the original ran: the rewrite must too
                raise SNLPRefusal(
                    f"verify: the rewritten model fails on {what} where the original runs "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); set verify=False to skip the "
                    "check at your own risk",
                    module_path=container or None,
                ) from exc
            worst = _worst_output(expected, got)
            if worst is not None:
                err, tol, where = worst
                layer = _worst_layer(rewritten, handle, a, k, ref_layers, paths)
                state = " (the first call agreed: state carried between calls?)" if call == 2 else ""
                raise SNLPRefusal(
                    f"verify: the rewritten model (exact mode) disagrees with the original on {what}{state}: "
                    f"relative error {err:.3g} > {tol:g} at {where}"
                    + (f"; {layer[1]}" if layer else "")
                    + "; nothing was rewritten (set verify=False to skip the check at your own risk)",
                    module_path=layer[0] if layer else (container or None),
                )
            checked = call
    return checked


def _agrees_from_trace(
    rewritten: fx.GraphModule,
    handle: SolveHandle,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    expected: Any,
    ref_layers: list[torch.Tensor | None],
) -> bool:
    """The cheap check, about one forward: the solve warm-started from the original's own trace
    (the parallel layers' outputs) with K = 1. The exact trace is the fixed point of the
    iteration: one evaluation of the batched body there, corrected, gives the exact trace and
    outputs back iff the body, stacking, correction and readers are right. False (the caller then
    runs the whole exact solve) when it disagrees, fails, or the layer modules' outputs are not
    the chain's hidden states (e.g. they return something else)."""
    if not ref_layers or any(r is None for r in ref_layers):
        return False
    rows = [r for r in ref_layers if r is not None]
    if any(tuple(r.shape) != tuple(rows[0].shape) for r in rows):
        return False
    solve = handle.solve
    saved = solve.iterations, solve.init
    try:
        solve.iterations, solve.init = 1, "warm"
        solve.warm_trace = torch.stack(rows)
        got = _quiet(rewritten, args, kwargs)
        return _worst_output(expected, got) is None
    except Exception:
        return False
    finally:
        solve.iterations, solve.init = saved
        handle.reset()


def _quiet(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``module`` on copies of the inputs, without the traceback fx prints when a graph fails
    (the failure becomes the refusal's reason, or ends the comparison)."""
    with redirect_stderr(io.StringIO()):
        return module(*_clone(args), **_clone(kwargs))


def _private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose calls cannot reach the user's model: buffers and Python state copied,
    parameters shared (the capture refuses models that write them), in eval mode as captured."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    private = copy.deepcopy(model, memo)
    return private.eval()


def _clone(x: Any) -> Any:
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, x)


@contextmanager
def _exact_mode(handle: SolveHandle) -> Iterator[None]:
    """The solve in exact mode (K = the largest stage, init h0, undeferred) for the block; its K,
    init and deferral back and its run-time state reset afterwards."""
    solve = handle.solve
    saved = solve.iterations, solve.init, solve.deferred_layers
    try:
        solve.iterations = max(solve.stage_sizes)
        solve.init = "h0"
        solve.deferred_layers = None
        handle.reset()
        yield
    finally:
        solve.iterations, solve.init, solve.deferred_layers = saved
        handle.reset()


@contextmanager
def _restored_buffers(gm: torch.nn.Module) -> Iterator[None]:
    """Buffers written during the block get their values back (the stacked weights of the solve
    are only checked: a layer writing them is refused by the capture)."""
    saved = {
        name: b.clone()
        for name, b in gm.named_buffers()
        if isinstance(b, torch.Tensor) and not name.startswith(f"{SOLVE_NAME}.stacked_")
    }
    try:
        yield
    finally:
        for name, b in gm.named_buffers():
            if name in saved and isinstance(b, torch.Tensor):
                b.copy_(saved[name])


@contextmanager
def _layer_outputs(
    model: torch.nn.Module, paths: list[str], out: list[torch.Tensor | None]
) -> Iterator[None]:
    """Record the output of each module in ``paths`` (None where it is not one tensor)."""
    handles = []
    out.extend([None] * len(paths))

    def hook(i: int) -> Any:
        def record(_m: Any, _inp: Any, o: Any) -> None:
            o = o[0] if isinstance(o, (tuple, list)) and o else o
            out[i] = o.detach().clone() if isinstance(o, torch.Tensor) else None

        return record

    for i, path in enumerate(paths):
        with suppress(AttributeError):
            handles.append(model.get_submodule(path).register_forward_hook(hook(i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref64, got64 = ref.detach().double(), got.detach().double()
    scale = float(ref64.norm())
    diff = float((got64 - ref64).norm())
    return diff / scale if scale > 0 else diff


def _worst_output(expected: Any, got: Any) -> tuple[float, float, str] | None:
    """(error, tolerance, where) of the output leaf that disagrees most, None when all agree."""
    ref_leaves = pytree.tree_leaves(expected)
    got_leaves = pytree.tree_leaves(got)
    if len(ref_leaves) != len(got_leaves):
        return float("inf"), 0.0, f"the outputs ({len(got_leaves)} values instead of {len(ref_leaves)})"
    worst: tuple[float, float, str] | None = None
    for i, (r, g) in enumerate(zip(ref_leaves, got_leaves)):
        where = f"output {i}" if len(ref_leaves) > 1 else "the output"
        if not isinstance(r, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(r.shape):
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            return float("inf"), 0.0, f"{where} (shape {shape} instead of {tuple(r.shape)})"
        if not r.is_floating_point():
            if not torch.equal(r, g.to(r.dtype)):
                return float("inf"), 0.0, f"{where} ({r.dtype} values differ)"
            continue
        if not bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all()):
            return float("inf"), 0.0, f"{where} (non-finite values)"
        err, tol = _rel_err(r, g), tolerance(r.dtype)
        if err > tol and (worst is None or err / tol > worst[0] / max(worst[1], 1e-30)):
            worst = (err, tol, where)
    return worst


def _worst_layer(
    rewritten: fx.GraphModule,
    handle: SolveHandle,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ref_layers: list[torch.Tensor | None],
    paths: list[str],
) -> tuple[str, str] | None:
    """(path, description) of the parallel layer whose solved output (exact mode) differs most
    from the original's, and the first one beyond tolerance (errors carry downstream); best
    effort: None when the trace cannot be compared (the layer modules return something else)."""
    if not paths or all(r is None for r in ref_layers):
        return None
    traces: list[torch.Tensor] = []

    def keep(_m: Any, _inp: Any, out: Any) -> None:
        traces.append(out[0] if isinstance(out, tuple) else out)

    hook = handle.solve.register_forward_hook(keep)
    try:
        handle.reset()
        with handle.whole_trace():  # the whole trace, though the model reads only its last row
            _quiet(rewritten, args, kwargs)
        trace = traces[0]
    except Exception:
        return None
    finally:
        hook.remove()
    errors = [
        (path, _rel_err(ref, trace[j]), tolerance(ref.dtype))
        for j, (ref, path) in enumerate(zip(ref_layers, paths))
        if ref is not None and j < trace.shape[0] and tuple(trace[j].shape) == tuple(ref.shape)
    ]
    if not errors:
        return None
    path, err, _ = max(errors, key=lambda e: e[1])
    first = next((e for e in errors if e[1] > e[2]), None)
    where = f"largest at layer '{path}' ({err:.3g})"
    if first is not None and first[0] != path:  # errors carry downstream: the first is the culprit
        where += f", first beyond tolerance at '{first[0]}' ({first[1]:.3g})"
    return path, where


Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def _other_batches(
    gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[Callable[[], Inputs]]:
    """The example inputs at batch + 1 (rows repeated) when the graph's first tensor input has a
    symbolic leading dimension, as candidates for the original to take (``_first_taken``; each
    made only when tried: a decode step's grown caches are the size of the model's caches); empty
    for a static batch. Every dimension sharing the batch's size symbol grows. Inputs captured
    behind whole-kept marker ops (a decode step's caches) carry symbols of their own, unrelated to
    the batch's: for them the first candidates also grow one dimension of the batch's example size
    (each such dimension in turn, in every input that has it); the last grows the shared symbol
    only. An original that takes none (a size baked into its code) skips the call."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    tensors = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    if not tensors or len(vals) != len(tensors) or vals[0].dim() == 0:
        return []
    batch_sym = vals[0].shape[0]
    if isinstance(batch_sym, int):
        return []  # a static batch: the graph only takes the example's batch size
    batch = flat[tensors[0]].shape[0]
    rows = torch.arange(batch + 1) % batch

    def grown(extra_dim: int | None) -> Inputs:
        out = list(flat)
        for i, v in zip(tensors, vals):
            dims = [
                d
                for d, size in enumerate(v.shape)
                if not isinstance(size, int) and str(size) == str(batch_sym)
            ]
            if not dims and extra_dim is not None and extra_dim in unrelated.get(i, ()):
                dims = [extra_dim]
            for d in dims:
                out[i] = out[i].index_select(d, rows.to(out[i].device))
        a, k = pytree.tree_unflatten(out, spec)
        return a, k

    unrelated = {  # inputs without the batch's symbol: their symbolic dimensions of the batch's size
        i: [d for d, size in enumerate(v.shape) if not isinstance(size, int) and flat[i].shape[d] == batch]
        for i, v in zip(tensors, vals)
        if not any(not isinstance(size, int) and str(size) == str(batch_sym) for size in v.shape)
    }
    extra = sorted({d for dims in unrelated.values() for d in dims})
    candidates: list[Callable[[], Inputs]] = [partial(grown, d) for d in extra]
    return [*candidates, partial(grown, None)]


def _first_taken(
    reference: torch.nn.Module,
    paths: list[str],
    candidates: list[Callable[[], Inputs]],
    ref_layers: list[torch.Tensor | None],
) -> tuple[Inputs, Any] | None:
    """The first candidate inputs ``reference`` runs on, with its outputs (``ref_layers`` filled
    with its layer outputs there), else None. Whatever the original takes is a fair input: the
    rewrite must compute the same function on it."""
    for candidate in candidates:
        a, k = candidate()
        ref_layers.clear()
        with _layer_outputs(reference, paths, ref_layers):
            try:
                return (a, k), _quiet(reference, a, k)
            except Exception:
                continue
    return None
