"""The fused decode-attention kernel (kernels/decode_attention.py) and the marker op that carries
``models.kv.cached_attention`` through capture into one layer-batched call (markers.py).

CPU: capture records one op per layer, the batched graph calls it once for all layers and no
marker op is left in a rewritten graph; a decode step exports to ONNX; the kernel's dispatch
refuses what it cannot compute; the kernel itself under Triton's interpreter. GPU: the kernel
against float64, with and without key splits and PDL, in the original and the rewritten step.
"""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest
import torch
from helpers import max_err, step_inputs
from triton_helpers import run_under_interpreter

import snlp_compile
from snlp_compile import markers
from snlp_compile.kernels import decode_attention
from snlp_compile.models import build_model
from snlp_compile.models.kv import CachedStep, attention_bias, attention_ops, cached_attention
from snlp_compile.passes.capture import capture

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and decode_attention.available()), reason="needs CUDA + triton"
)
MARKER = torch.ops.snlp.cached_attention.default


def _targets(gm: torch.fx.GraphModule) -> Counter:
    return Counter(
        n.target for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
    )


def _tiny_step(dtype: torch.dtype = torch.float64) -> tuple[CachedStep, tuple]:
    torch.manual_seed(0)
    model = build_model("nanochat-tiny").to(dtype).eval()
    idx, pos, k_cache, v_cache = step_inputs(model, seed=1)
    return CachedStep(model), (idx, pos, k_cache, v_cache)


def test_capture_keeps_cached_attention_whole_and_transform_batches_it_once() -> None:
    step, inputs = _tiny_step()
    layers = step.model.config.n_layer
    captured = capture(step, inputs).graph_module
    assert _targets(captured)[MARKER] == layers
    assert not markers.keeping_whole()  # only while capturing

    fast = snlp_compile.transform(step, inputs, iterations=layers)
    counts = _targets(fast)
    assert counts[MARKER] == 0, "a marker op was left in the rewritten graph"
    from snlp_compile.kernels.layer_ops import layer_marked

    assert counts[layer_marked] == 1  # all layers' attention in one call
    assert "layer_marked" in fast.get_submodule("snlp_solve.layers").code
    with torch.no_grad():
        want, got = step(*inputs), fast(*inputs)
    for a, b in zip(want, got):
        assert max_err(a, b) < 1e-12


def test_marker_op_runs_as_the_function_it_stands_for() -> None:
    q, k, v = (torch.randn(2, 4, 1, 16, dtype=torch.float64) for _ in range(3))
    kc, vc = torch.randn(2, 4, 24, 16, dtype=torch.float64), torch.randn(2, 4, 24, 16, dtype=torch.float64)
    bias = attention_bias(torch.tensor(9), 1, 24)
    want = attention_ops(q, k, v, kc, vc, bias.double())
    got = torch.ops.snlp.cached_attention(q, k, v, kc, vc, bias.double())
    assert max_err(got, want) == 0.0


def test_a_rewritten_decode_step_exports_to_onnx_and_matches(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    step, inputs = _tiny_step(torch.float32)
    fast = snlp_compile.transform(step, inputs, iterations=step.model.config.n_layer)
    result = snlp_compile.export_onnx(fast, inputs, tmp_path / "step.onnx")
    assert not any("cached_attention" in op for op in result.op_counts)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, (t.numpy() for t in inputs)))
    got = session.run(None, feeds)
    with torch.no_grad():
        want = step(*inputs)
    for a, b in zip(want, got):
        assert max_err(a, torch.from_numpy(b)) < 1e-4


def test_dispatch_refuses_what_the_kernel_does_not_compute() -> None:
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16)
    kc = torch.randn(1, 2, 32, 16)
    bias = attention_bias(torch.tensor(5), 1, 32)
    assert not decode_attention.applies(q, k, kc, kc, bias)  # a CPU tensor
    if torch.cuda.is_available():
        qc, kk, cc, bc = q.cuda(), k.cuda(), kc.cuda(), bias.cuda()
        assert decode_attention.applies(qc, kk, cc, cc, bc)
        assert not decode_attention.applies(qc.expand(1, 4, 2, 16), kk, cc, cc, bc)  # two new tokens
        assert not decode_attention.applies(qc, kk, cc, cc, bc.double())  # bias not float32
        assert not decode_attention.applies(qc, kk, cc, cc, bc[:, :-1])  # bias of the wrong length
        assert not decode_attention.applies(qc.half(), kk, cc, cc, bc)  # mixed dtypes
        strided = torch.randn(2, 32, 2, 16, device="cuda").transpose(1, 2)[:1]
        assert decode_attention.applies(qc, kk, strided, strided, bc)


@pytest.mark.skipif(not decode_attention.available(), reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests below run the compiled kernel")
def test_kernel_matches_the_ops_under_the_interpreter() -> None:
    script = textwrap.dedent(
        """
        import torch
        from snlp_compile.kernels import decode_attention as da
        from snlp_compile.models.kv import attention_bias, attention_ops
        torch.manual_seed(0)
        worst = 0.0
        # (batch, heads, kv heads, head dim, cache slots, position, key splits): grouped-query
        # rows, odd sizes (masks), unwritten blocks skipped (small positions), pos 0 (only the
        # new token), several key splits combined
        for b, h, hkv, d, t, pos, splits in [
            (2, 4, 2, 16, 40, 17, 1), (2, 4, 2, 16, 40, 17, 3), (1, 3, 3, 24, 70, 70, 1),
            (1, 8, 2, 32, 130, 5, 4), (3, 2, 1, 16, 33, 0, 1), (3, 2, 1, 16, 33, 1, 2), (2, 4, 4, 16, 70, 40, 3),
        ]:
            q = torch.randn(b, 1, h, d).transpose(1, 2)
            k, v = (torch.randn(b, 1, hkv, d).transpose(1, 2) for _ in range(2))
            kc, vc = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
            bias = attention_bias(torch.tensor(pos), 1, t)
            ref = attention_ops(*(x.double() for x in (q, k, v, kc, vc, bias)))
            g = b * hkv
            out = da.launch(
                q.reshape(g, h // hkv, d), k.reshape(g, d), v.reshape(g, d),
                kc.flatten(0, 1), vc.flatten(0, 1), bias.view(t + 1), d**-0.5, splits=splits, config={"BLOCK_T": 16},
            ).view(b, h, 1, d)
            worst = max(worst, (out.double() - ref).abs().max().item())
        print("worst", worst)
        assert worst < 1e-5, worst
        """
    )
    proc = run_under_interpreter(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worst" in proc.stdout


def _kernel_ran(fn) -> bool:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any("_decode_attention_split" in e.key for e in prof.key_averages())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [10, 320])  # a sequential step (keys split) and a layer-batched one
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_kernel_matches_float64(dtype: torch.dtype, groups: int, pdl: bool) -> None:
    torch.manual_seed(0)
    d, t, pos = 64, 1024, 700
    q, k, v = (torch.randn(groups, 1, 1, d, device="cuda", dtype=dtype) for _ in range(3))
    kc, vc = (torch.randn(groups, 1, t, d, device="cuda", dtype=dtype) for _ in range(2))
    bias = attention_bias(torch.tensor(pos, device="cuda"), 1, t)
    ref = attention_ops(*(x.double() for x in (q, k, v, kc, vc, bias)))
    got = decode_attention.attention(q, k, v, kc, vc, bias, pdl)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and max_err(got.double(), ref) < tol
    # the same through the ops in the input dtype is no closer to float64 than the kernel
    ops = attention_ops(q, k, v, kc, vc, bias)
    assert max_err(got.double(), ref) <= max_err(ops.double(), ref) + 1e-6


class _Attention(torch.nn.Module):
    def forward(self, *operands: torch.Tensor) -> torch.Tensor:
        return cached_attention(*operands, fused=True, pdl=True)


@needs_cuda
def test_gpu_export_never_traces_the_fused_kernel() -> None:
    """Asked for the fused kernel, attention still exports as its ops: ``snlp::decode_attention``
    is an opaque op an exported program (ONNX, an AOTInductor package) could not run."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    operands = (q, k, v, kc, vc, attention_bias(torch.tensor(100, device="cuda"), 1, 128))
    assert _kernel_ran(lambda: _Attention()(*operands))  # eagerly the kernel runs
    program = torch.export.export(_Attention(), operands, strict=False)
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("snlp" in name for name in names), names


@needs_cuda
def test_gpu_kernel_runs_compiled_in_a_cuda_graph() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(32, 10, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (torch.randn(32, 10, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bias = attention_bias(torch.tensor(1023, device="cuda"), 1, 1024)
    fn = torch.compile(cached_attention, mode="reduce-overhead", fullgraph=True)
    want = attention_ops(*(x.double() for x in (q, k, v, kc, vc, bias)))
    for _ in range(3):
        got = fn(q, k, v, kc, vc, bias)
    assert max_err(got.double(), want) < 2e-2
    assert _kernel_ran(lambda: fn(q, k, v, kc, vc, bias))


@needs_cuda
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("in_layers", [False, True])
def test_gpu_original_step_runs_the_kernel_rewritten_one_where_asked_and_both_are_exact(
    deferred: bool, in_layers: bool
) -> None:
    """The model as written fuses its attention; the rewritten step keeps the ops (faster there,
    run 13) unless its lowering asks for the kernel in the layers too (SNLP_DECODE_ATTENTION=all);
    the logits agree either way in exact mode."""
    torch.manual_seed(0)
    model = build_model("nanochat-tiny").cuda().eval()
    step = CachedStep(model)
    idx, pos, k_cache, v_cache = (t.cuda() for t in step_inputs(model, seed=1))
    inputs = (idx, pos, k_cache, v_cache)
    layers = model.config.n_layer
    lowering = snlp_compile.LoweringOptions(decode_attention_in_layers=in_layers)
    fast = snlp_compile.transform(step, inputs, iterations=layers, deferred_kv=deferred, lowering=lowering)
    with torch.no_grad():
        want = step(*inputs)
        got = fast(*inputs)
        assert _kernel_ran(lambda: step(*inputs))
        assert _kernel_ran(lambda: fast(*inputs)) == in_layers
    assert max_err(got[0], want[0]) < 1e-4


def test_the_kernel_takes_only_operands_of_one_attention() -> None:
    """A cache of another batch size (or head size) must not reach the kernel, which would index it
    with q's batch unchecked: found on the GPU, where verify's grown batch made the original step
    compute garbage instead of failing (the ops raise)."""
    from snlp_compile.kernels.decode_attention import consistent_shapes

    q, k = torch.zeros(3, 4, 1, 8), torch.zeros(3, 2, 1, 8)
    cache = torch.zeros(3, 2, 16, 8)
    assert consistent_shapes(q, k, cache, cache)
    assert not consistent_shapes(q, k, torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16, 8))  # batch 2 vs 3
    assert not consistent_shapes(q, k, cache, torch.zeros(3, 2, 15, 8))  # caches differ
    assert not consistent_shapes(q, torch.zeros(2, 2, 1, 8), cache, cache)  # new k of another batch
    assert not consistent_shapes(q, k, torch.zeros(3, 2, 16, 4), torch.zeros(3, 2, 16, 4))  # head size
