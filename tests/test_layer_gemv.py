"""The layer-batched GEMV kernel (``snlp_compile.kernels.layer_gemv``) against ``torch.einsum``.

On the CPU the kernel's tile runs under Triton's interpreter (in a subprocess: the interpreter is
chosen when the kernel is defined) where Triton is installed; on a GPU the registered op, the
dispatch in ``batched_linear`` and a compiled rewritten decode step are checked against the
einsum lowering.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from triton_helpers import run_under_interpreter

from snlp_compile.kernels import layer_gemv
from snlp_compile.kernels.layer_ops import batched_linear, layer_matmul, views_as_batch

needs_triton = pytest.mark.skipif(not layer_gemv.available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and layer_gemv.available()), reason="needs CUDA + triton"
)


def _gemv_kernel_ran(fn) -> bool:
    """Whether calling ``fn`` launched the layer-batched GEMV tile (a fallback to cuBLAS would
    give the same numbers, so the dispatch is checked on the kernels that ran)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any("_layer_gemv_tile" in e.key for e in prof.key_averages())


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests below run the compiled kernel")
def test_kernel_tile_matches_einsum_under_the_interpreter() -> None:
    script = textwrap.dedent(
        """
        import torch
        from snlp_compile.kernels import layer_gemv as lg
        torch.manual_seed(0)
        worst = 0.0
        # odd sizes exercise the masks; R = 2 takes the two-accumulator path, R > 2 the tl.dot
        # one (dispatch sends 3-4 rows to cuBLAS, the op itself takes them); strided x and w views
        for n, r, o, i in [
            (3, 1, 40, 70), (2, 2, 24, 70), (3, 2, 40, 130), (2, 3, 40, 130), (2, 5, 33, 130), (2, 1, 64, 256)
        ]:
            x = torch.randn(n, r, 2 * i)[..., ::2]
            w = torch.randn(n, i, o).transpose(1, 2)
            for bo, bi in [(16, 64), (32, 128)]:
                y = lg.launch(lg._layer_gemv_tile, x, w, BLOCK_O=bo, BLOCK_I=bi)
                ref = torch.einsum("nri,noi->nro", x.double(), w.double())
                assert y.shape == (n, r, o) and y.dtype == torch.float32
                worst = max(worst, ((y.double() - ref).abs().max() / ref.abs().max()).item())
        print("worst", worst)
        assert worst < 1e-6, worst
        """
    )
    proc = run_under_interpreter(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worst" in proc.stdout


@needs_triton
def test_autotuners_key_on_the_grid_axes() -> None:
    """The layer-batched GEMV is tuned per layer count and the decode attention per group count:
    a config tuned for one layer's programs ran a 32-layer step 37% slower (run 14). Triton drops
    key names that are not kernel arguments without a word, so they must be arguments."""
    from snlp_compile.kernels import decode_attention as da
    from snlp_compile.kernels import layer_gemv as lg

    for tuner, axis in ((lg._layer_gemv_tuned, "N"), (da._decode_attention_tuned, "G")):
        assert axis in tuner.keys
        assert set(tuner.keys) <= set(tuner.arg_names), set(tuner.keys) - set(tuner.arg_names)


@needs_triton
def test_pdl_kernel_reads_only_constant_weights_before_the_wait() -> None:
    """The kernel compiled for sm90 (no GPU needed): without PDL no grid-dependency wait; with PDL
    nothing is stored before ``griddepcontrol.wait``, nothing at all is loaded before it unless
    EARLY_W, and with EARLY_W only the first weight tile (the same loads for 1, 2 and 16 rows of x)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from snlp_compile.kernels import layer_gemv as lg

    ints = ["R", "O", "I", "N", "sxn", "sxr", "sxi", "swn", "swo", "swi", "syn", "syr", "syo"]
    signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", **dict.fromkeys(ints, "i32")}
    signature.update(
        dict.fromkeys(["BLOCK_R", "BLOCK_O", "BLOCK_I", "IEEE_DOT", "PDL", "EARLY_W"], "constexpr")
    )

    def before_wait(rows: int, pdl: bool, early: bool) -> tuple[int, int, int] | None:
        consts = {
            "BLOCK_R": rows,
            "BLOCK_O": 32,
            "BLOCK_I": 128,
            "IEEE_DOT": False,
            "PDL": pdl,
            "EARLY_W": early,
        }
        src = ASTSource(lg._layer_gemv_tile, signature, constexprs=consts)
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": pdl})
        except Exception as why:  # no CUDA backend tools in this triton install
            pytest.skip(f"cannot compile for sm90 here: {why}")
        lines = kernel.asm["ptx"].splitlines()
        waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
        if not waits:
            return None
        loads = [i for i, line in enumerate(lines) if re.search(r"\b(ld\.global|cp\.async)", line)]
        stores = [i for i, line in enumerate(lines) if "st.global" in line]
        return (
            sum(i < waits[0] for i in loads),
            sum(i > waits[0] for i in loads),
            sum(i < waits[0] for i in stores),
        )

    assert before_wait(1, pdl=False, early=False) is None
    for rows in (1, 2, 16):
        early_loads, late_loads, early_stores = before_wait(rows, pdl=True, early=False)
        assert early_loads == 0 and late_loads > 0 and early_stores == 0
    one, two, sixteen = (before_wait(r, pdl=True, early=True) for r in (1, 2, 16))
    assert one[0] > 0 and one[0] == two[0] == sixteen[0] and one[2] == two[2] == sixteen[2] == 0


def test_kernel_does_not_apply_on_cpu_or_to_many_rows() -> None:
    w = torch.randn(3, 8, 16)
    assert not layer_gemv.applies(torch.randn(3, 1, 16), w)
    assert batched_linear(torch.randn(3, 2, 1, 16), w).shape == (3, 2, 1, 8)
    # on a GPU: 1-2 (a deferred step's q/k/v) and 5-16 rows per layer take the kernel, 3-4 cuBLAS
    assert 3 in layer_gemv.CUBLAS_ROWS and not {1, 2, 8} & set(layer_gemv.CUBLAS_ROWS)


class _ScaledBlock(torch.nn.Module):
    """A residual layer whose linear weight is computed when it runs (weight times an input)."""

    def __init__(self, d: int, scaled: bool) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, d, dtype=torch.float64) / d**0.5)
        self.scaled = scaled

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(torch.nn.functional.linear(x, self.w * s if self.scaled else self.w))


class _ScaledStack(torch.nn.Module):
    def __init__(self, scaled: bool, d: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_ScaledBlock(d, scaled) for _ in range(depth))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, s)
        return x


def test_linears_of_weights_computed_at_run_time_are_marked_dynamic() -> None:
    """Stacked weights (fixed at transform time) give ``batched_linear``, whose PDL launch reads
    its first weight tiles before waiting for the previous kernel; a weight computed in the layer
    gives ``batched_linear_dynamic``, which waits first (the kernel before it may write it)."""
    import snlp_compile
    from snlp_compile.ir.plan import SOLVE_NAME
    from snlp_compile.kernels.layer_ops import batched_linear_dynamic

    torch.manual_seed(0)
    x, s = torch.randn(2, 4, 8, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    for scaled, linear, other in [
        (True, batched_linear_dynamic, batched_linear),
        (False, batched_linear, batched_linear_dynamic),
    ]:
        model = _ScaledStack(scaled)
        fast = snlp_compile.transform(model, (x, s), iterations=3)
        targets = [n.target for n in fast.get_submodule(SOLVE_NAME).layers.graph.nodes]
        assert linear in targets and other not in targets, scaled
        torch.testing.assert_close(fast(x, s), model(x, s), rtol=1e-10, atol=1e-10)


def test_layer_matmul_on_cpu_is_matmul_and_checks_views() -> None:
    """Attention products between batched activations: torch.matmul on the CPU; the kernel is
    only offered b operands whose batch dims flatten without copying a cache."""
    torch.manual_seed(0)
    q = torch.randn(4, 2, 3, 1, 16, dtype=torch.float64)
    cache = torch.randn(4, 2, 3, 40, 16, dtype=torch.float64)
    torch.testing.assert_close(layer_matmul(q, cache.transpose(-1, -2)), q @ cache.transpose(-1, -2))
    p = torch.randn(4, 2, 3, 1, 40, dtype=torch.float64)
    torch.testing.assert_close(layer_matmul(p, cache), p @ cache)
    assert views_as_batch(cache, 3) and views_as_batch(cache.transpose(-1, -2), 3)
    assert views_as_batch(cache[:1], 3)  # unit dims do not matter
    assert not views_as_batch(cache.transpose(0, 1), 3)
    assert not views_as_batch(cache[:, :, :2], 3)


@pytest.mark.parametrize(
    "variable,expected",
    [
        ("SNLP_GEMV_KERNEL", "False False True"),
        ("SNLP_ATTENTION_KERNEL", "True False True"),
        ("SNLP_PDL", "True True False"),
    ],
)
def test_environment_variable_sets_the_process_defaults(variable: str, expected: str) -> None:
    """The variables set the defaults of the layer ops called without a transform's choices."""
    code = (
        "import inspect; from snlp_compile.kernels.layer_ops import batched_linear, layer_matmul; "
        "d = lambda f, k: inspect.signature(f).parameters[k].default; "
        "print(d(batched_linear, 'gemv'), d(layer_matmul, 'gemv'), d(batched_linear, 'pdl'))"
    )
    env = dict(os.environ, SNLP_GEMV_KERNEL="1", SNLP_ATTENTION_KERNEL="1", SNLP_PDL="1")
    env[variable] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("shape", [(20, 3840, 1280), (32, 640, 2560), (5, 77, 100)])
def test_gpu_op_matches_einsum(dtype: torch.dtype, rows: int, shape: tuple[int, int, int]) -> None:
    n, o, i = shape
    torch.manual_seed(0)
    x = torch.randn(n, rows, i, device="cuda", dtype=dtype)
    w = torch.randn(n, o, i, device="cuda", dtype=dtype) / i**0.5
    # the dispatch sends 3-4 rows per layer to cuBLAS; the op itself takes them all
    assert layer_gemv.applies(x, w) == (rows not in layer_gemv.CUBLAS_ROWS)
    ref = torch.einsum("nri,noi->nro", x.double(), w.double())
    ops = [torch.ops.snlp.layer_gemv(x, w)]
    if layer_gemv.pdl_supported(x):  # the PDL op, with and without the early weight tile
        ops += [torch.ops.snlp.layer_gemv_pdl(x, w, early) for early in (False, True)]
    for y in ops:
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        assert rel < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], rel


@needs_cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm90+"
)
def test_gpu_pdl_chain_in_a_cuda_graph_reads_each_producer_after_it_finished() -> None:
    """A chain of PDL-launched GEMVs, each reading what the kernel before it wrote (an Inductor
    kernel, itself launched with PDL), compiled and replayed in a CUDA graph with new inputs: every
    replay equals float64. A kernel reading x before gdc_wait would read the previous replay's
    values (stale) and fail this."""
    import torch._inductor.config as inductor_config

    from snlp_compile.kernels.layer_ops import batched_linear

    torch.manual_seed(0)
    ws = [torch.randn(32, 640, 640, device="cuda", dtype=torch.bfloat16) / 640**0.5 for _ in range(6)]

    def chain(x: torch.Tensor) -> torch.Tensor:
        for w in ws:
            x = torch.relu(batched_linear(x, w, gemv=True, pdl=True)) * 1.5 + x  # a kernel between GEMVs
        return x

    def reference(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        for w in ws:
            x = torch.relu(torch.einsum("nri,noi->nro", x, w.double())) * 1.5 + x
        return x

    x = torch.randn(32, 1, 640, device="cuda", dtype=torch.bfloat16)
    with inductor_config.patch({"triton.enable_pdl": True}):
        compiled = torch.compile(chain, fullgraph=True)
        for _ in range(2):
            compiled(x)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        compiled(x)
        torch.cuda.synchronize()
    assert any("layer_gemv_pdl" in e.key for e in prof.key_averages())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(x)
    for seed in range(5):
        torch.manual_seed(seed)
        x.copy_(torch.randn_like(x))
        graph.replay()
        ref = reference(x)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2, seed


class _Linear(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batched_linear(x, self.w, gemv=True, pdl=True)


@needs_cuda
def test_gpu_export_traces_the_triton_op_never_the_pdl_launch() -> None:
    """Asked for PDL, an exported linear calls the GEMV ``triton_op`` (AOTInductor compiles it
    into a package), not the opaque ``snlp::layer_gemv_pdl`` launch."""
    torch.manual_seed(0)
    x = torch.randn(20, 1, 1280, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(20, 2560, 1280, device="cuda", dtype=torch.bfloat16) / 1280**0.5
    program = torch.export.export(_Linear(w), (x,), strict=False)
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    # (the triton_op itself, or its kernel as torch's triton wrapper, if export traced into it)
    assert any("snlp.layer_gemv.default" in name or "triton_kernel_wrapper" in name for name in names), names
    assert not any("layer_gemv_pdl" in name for name in names), names


@needs_cuda
def test_gpu_dispatch_compiled_and_graph_captured() -> None:
    torch.manual_seed(0)
    x = torch.randn(20, 1, 1, 1280, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(20, 2560, 1280, device="cuda", dtype=torch.bfloat16) / 1280**0.5
    compiled = torch.compile(batched_linear, fullgraph=True)
    y = compiled(x, w)
    assert _gemv_kernel_ran(lambda: compiled(x, w))
    ref = torch.einsum("n...i,noi->n...o", x.float(), w.float())
    assert y.shape == (20, 1, 1, 2560)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    graph = torch.cuda.CUDAGraph()
    static_y = compiled(x, w)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_y = compiled(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    ref = torch.einsum("n...i,noi->n...o", x.float(), w.float())
    assert ((static_y.float() - ref).norm() / ref.norm()).item() < 1e-2


@needs_cuda
@pytest.mark.parametrize("heads,dim", [(10, 64), (10, 128)])
def test_gpu_attention_products_take_the_kernel(heads: int, dim: int) -> None:
    """A decode step's two cache products over all layers (0.5B / d20 head shapes), compiled and
    graph-captured: the kernel runs for both, reading the caches through their strides, and the
    result agrees with float64; batch dims that do not flatten without a copy stay with
    torch.matmul."""
    torch.manual_seed(0)
    k_cache = torch.randn(8, 1, heads, 1024, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(8, 1, heads, 1, dim, device="cuda", dtype=torch.bfloat16)

    def attend(q: torch.Tensor) -> torch.Tensor:
        s = layer_matmul(q, k_cache.transpose(-1, -2)) * dim**-0.5
        return layer_matmul(torch.softmax(s.float(), -1).to(q.dtype), v_cache)

    def reference(q: torch.Tensor) -> torch.Tensor:
        s = (q.double() @ k_cache.double().transpose(-1, -2)) * dim**-0.5
        return torch.softmax(s, -1) @ v_cache.double()

    compiled = torch.compile(attend, fullgraph=True)
    assert _gemv_kernel_ran(lambda: compiled(q))
    graph = torch.cuda.CUDAGraph()
    static_out = compiled(q)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = compiled(q)
    q.copy_(torch.randn_like(q))
    graph.replay()
    ref = reference(q)
    assert static_out.shape == ref.shape
    assert ((static_out.double() - ref).norm() / ref.norm()).item() < 2e-2
    probs = torch.rand(8, 1, heads, 1, 1024, device="cuda", dtype=torch.bfloat16)
    assert _gemv_kernel_ran(lambda: layer_matmul(probs, v_cache))
    assert _gemv_kernel_ran(lambda: layer_matmul(q, k_cache.transpose(-1, -2)))
    swapped = k_cache.transpose(0, 2)  # (heads, 1, 8, T, D): batch dims no longer nest
    q2 = q.transpose(0, 2)
    assert not _gemv_kernel_ran(lambda: layer_matmul(q2, swapped.transpose(-1, -2)))


@needs_cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_exact_decode_step_with_the_kernel_equals_sequential(batch: int) -> None:
    """A transformed decode step in exact mode, float32 on the GPU (TF32 off), run eagerly and
    compiled with the kernel on, against the sequential step and the kernel-off (einsum) step."""
    from helpers import step_inputs

    import snlp_compile
    from snlp_compile.models import build_model
    from snlp_compile.models.kv import CachedStep

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = build_model("nanochat-tiny", dtype=torch.float32)
    inputs = step_inputs(model, batch=batch)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=model.config.n_layer)
    no_kernel = snlp_compile.LoweringOptions(gemv_kernel=False)
    einsum = snlp_compile.transform(
        CachedStep(model), inputs, iterations=model.config.n_layer, lowering=no_kernel
    )
    model, fast, einsum = model.cuda(), fast.cuda(), einsum.cuda()
    inputs = tuple(t.cuda() for t in inputs)
    with torch.no_grad():
        ref = model.forward_cached(*inputs)
        compiled_step = torch.compile(fast)
        eager, compiled = fast(*inputs), compiled_step(*inputs)
        assert _gemv_kernel_ran(lambda: fast(*inputs))
        assert _gemv_kernel_ran(lambda: compiled_step(*inputs))
        plain = einsum(*inputs)  # a transform with the kernel off, in the same process
        assert not _gemv_kernel_ran(lambda: einsum(*inputs))
    for got_eager, got_compiled, got_plain, want in zip(eager, compiled, plain, ref):
        scale = want.abs().max().item()
        assert (got_eager - want).abs().max().item() < 1e-4 * scale
        assert (got_compiled - want).abs().max().item() < 1e-4 * scale
        assert (got_plain - want).abs().max().item() < 1e-4 * scale


@needs_cuda
def test_gpu_onnx_capture_takes_the_einsum() -> None:
    """export_onnx captures with the kernel off: ONNX has no op for a Triton kernel."""
    import snlp_compile
    from snlp_compile.export.onnx_export import export_program
    from snlp_compile.models import build_model

    model = build_model("nanochat-tiny", dtype=torch.float32).cuda()
    idx = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
    fast = snlp_compile.transform(model, (idx,), iterations=1)
    assert "layer_gemv" in str(torch.export.export(fast, (idx,), strict=False).graph)
    assert "layer_gemv" not in str(export_program(fast, (idx,), {}, dynamic=False).graph)
