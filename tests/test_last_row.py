"""A forward reads only the last layer's output, so the solve corrects only that row
(``LayerParallelSolve.correct_last``): a sum over the layers instead of a prefix sum for identity
and folded scalar skips, the full trace's last row otherwise. Each case against the full-trace
solve (the same K, to rounding) and, in exact mode, the sequential model; float64 on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.fx as fx
from helpers import reference_model, step_inputs
from torch.overrides import TorchFunctionMode

import snlp_compile
from snlp_compile.ir.plan import SOLVE_NAME
from snlp_compile.models.kv import CachedStep

F64 = torch.float64
TIGHT = 1e-10


class _Calls(TorchFunctionMode):
    """Records the torch functions called inside the block (names only)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# mHC with fewer Sinkhorn iterations, nanochat with scales other than 1 (the folded products matter)
_model = partial(reference_model, sinkhorn_iters=4, scaled=True)


def _solve_output_rows(fast: fx.GraphModule, idx: torch.Tensor) -> int:
    rows: list[int] = []
    hook = fast.get_submodule(SOLVE_NAME).register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    try:
        with torch.no_grad():
            fast(idx)
    finally:
        hook.remove()
    return rows[0]


@pytest.mark.parametrize(
    "name,summed",
    [("gpt-tiny", True), ("nanochat-tiny", True), ("mhc-tiny", False)],
)
@pytest.mark.parametrize("stages", [1, 2])
def test_forward_solves_only_the_last_row(name: str, summed: bool, stages: int) -> None:
    model = _model(name)
    idx = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    n = model.config.n_layer
    approx = snlp_compile.transform(model, (idx,), iterations=1, stages=stages, dynamic_shapes=False)
    solve = approx.get_submodule(SOLVE_NAME)
    assert solve.last_row_only and solve.returns_last_row_only()
    assert "snlp_solve[-1]" in approx.code
    assert any("corrects that row alone" in note for note in approx.snlp_report.notes)
    assert _solve_output_rows(approx, idx) == 1
    with torch.no_grad():  # solve_trace() still shows the whole trace, and leaves the solve as it was
        assert snlp_compile.solve_trace(approx, idx).shape[0] == n
    assert solve.last_row_only
    with _Calls() as calls, torch.no_grad():
        last = approx(idx)
    solve.last_row_only = False  # the full trace, as before
    assert _solve_output_rows(approx, idx) == n
    with _Calls() as full_calls, torch.no_grad():
        full = approx(idx)
    if summed:  # identity and folded scalar skips: a sum instead of the prefix sum
        assert "cumsum" in full_calls.names and "cumsum" not in calls.names, calls.names
    assert float((last - full).abs().max()) < TIGHT
    exact = snlp_compile.transform(model, (idx,), iterations=n, stages=stages, dynamic_shapes=False)
    with torch.no_grad():
        assert float((exact(idx) - model(idx)).abs().max()) < TIGHT


def test_warm_init_and_side_outputs_keep_the_whole_trace() -> None:
    """A warm start remembers the whole trace, and a decode step's K/V are evaluated at every
    corrected input: neither returns the last row alone."""
    model = _model("nanochat-tiny")
    idx = torch.randint(0, model.config.vocab_size, (1, 5))
    warm = snlp_compile.transform(model, (idx,), iterations=1, init="warm", dynamic_shapes=False)
    solve = warm.get_submodule(SOLVE_NAME)
    assert solve.last_row_only and not solve.returns_last_row_only()
    assert _solve_output_rows(warm, idx) == model.config.n_layer
    assert solve.warm_trace.shape[0] == model.config.n_layer
    step = snlp_compile.transform(CachedStep(model), step_inputs(model), iterations=1)
    step_solve = step.get_submodule(SOLVE_NAME)
    assert not step_solve.last_row_only and not step_solve.returns_last_row_only()


def test_environment_switch_keeps_the_whole_trace() -> None:
    """``SNLP_LAST_ROW=0`` (A/B timing, read at import) leaves a forward's solve as it was before
    last-row solves: the whole trace, indexed by layer."""
    script = (
        "import torch, snlp_compile\n"
        "from snlp_compile.models import build_model\n"
        "m = build_model('gpt-tiny', dtype=torch.float64)\n"
        "idx = torch.randint(0, m.config.vocab_size, (1, 5))\n"
        "fast = snlp_compile.transform(m, (idx,), iterations=1, dynamic_shapes=False)\n"
        "print(fast.snlp_solve.last_row_only, 'snlp_solve[-1]' in fast.code)\n"
    )
    for value, expected in (("0", "False False"), ("1", "True True")):
        env = dict(os.environ, SNLP_LAST_ROW=value)
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == expected
