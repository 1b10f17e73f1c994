"""A layer-batched GEMV kernel: ``y[n] = x[n] @ w[n].T`` for every layer n at once, few rows each.

Why a kernel of our own: a batch-1 SNLP decode step is one row per layer times stacked weights
(N, O, I), and its time is the time to read those weights. cuBLAS' batched GEMM reads them at
1.15-1.5x the bytes floor on these shapes (worst on the paper's 0.5B shape, 640-wide layers) and
ATen's ``bmm`` wrapper adds a device-to-device copy of the one-row operand per call
(``benchmarks/gemv_lowering.py``). This kernel streams each weight tile once, accumulates in
float32 and reads x and y through their strides, so no operand is copied.

``kernels.ops`` registers it as ``torch.ops.snlp.layer_gemv`` with ``torch.library.triton_op``, so
Inductor traces into it and CUDA graphs capture it; on Hopper and newer GPUs the layer ops call
``torch.ops.snlp.layer_gemv_pdl`` instead, the same kernel launched with programmatic dependent
launch (it starts while the kernel before it finishes; stacked weights stream meanwhile). Triton
is optional: without it (or on the CPU, or where a transform's ``LoweringOptions`` turn it off)
``snlp_compile.kernels.layer_ops.batched_linear`` uses ``torch.einsum``.
"""

from __future__ import annotations

import torch

from .tracing import exporting

MAX_ROWS = 16  # rows per layer the kernel takes; more rows are a real GEMM, cuBLAS' job
# 3-4 rows per layer are cuBLAS' job: its batched GEMM beat this kernel's tl.dot tile there (run 8
# sweep). Two rows (a deferred-K/V step's q/k/v) take the kernel's two-accumulator path since run 11:
# in the CUDA-graphed step it beat cuBLAS on both shapes (0.5B deferred K=1 0.148 -> 0.139 ms, d20
# 0.268 -> 0.261 ms; alone 25.2 vs 27.0 us on 32x1920x640, 55.3 vs 54.2 us on 20x3840x1280)
CUBLAS_ROWS = range(3, 5)

try:  # triton is an optional dependency (the CPU wheel of torch does not bring it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


def available() -> bool:
    """Whether the Triton kernel can be used in this process."""
    return triton is not None


if triton is not None:

    def _configs() -> list[triton.Config]:
        """The fastest launch configs of ``benchmarks/gemv_lowering.py --sweep`` on an H200 (run 7)
        for the decode shapes (d20: 1280/5120-wide, 0.5B: 640/1920/2560-wide), one row per layer
        (the first seven), eight (the next five) and two (run 11); the last four are for the attention products
        (``kernels.layer_matmul``)."""
        return [
            triton.Config({"BLOCK_O": bo, "BLOCK_I": bi}, num_warps=w, num_stages=s)
            for bo, bi, w, s in [
                (32, 128, 8, 3),
                (32, 128, 8, 1),
                (4, 512, 4, 1),
                (4, 256, 2, 2),
                (8, 128, 2, 2),
                (16, 128, 2, 2),
                (64, 64, 8, 3),
                (16, 256, 2, 2),
                (32, 128, 2, 3),
                (64, 128, 2, 2),
                (64, 128, 4, 3),
                (32, 256, 2, 3),
                (64, 128, 8, 1),  # two rows per layer (run 11 sweep, both deferred q/k/v shapes)
                # a decode step's attention products (run 9 sweep): queries times the keys
                # cache (I = head dim 64/128), probabilities times the values cache read
                # transposed (O = head dim, contiguous)
                (32, 64, 4, 1),
                (128, 64, 4, 2),
                (64, 64, 4, 1),
                (32, 64, 8, 2),
            ]
        ]

    @triton.jit
    def _w_tile(w_base, offs_o, i0, O, I, swi, BLOCK_I: tl.constexpr):  # noqa: E741
        """The weight tile (BLOCK_O, BLOCK_I) at column i0, streamed once (evict first); zeros
        outside the matrix."""
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask = (offs_o[:, None] < O) & (offs_i[None, :] < I)
        return tl.load(w_base + offs_i[None, :] * swi, mask=mask, other=0.0, eviction_policy="evict_first")

    @triton.jit
    def _x_tile(x_base, offs_r, i0, R, I, sxi, BLOCK_I: tl.constexpr):  # noqa: E741
        """The rows of x (BLOCK_R, BLOCK_I) at column i0 that a weight tile multiplies."""
        offs_i = i0 + tl.arange(0, BLOCK_I)
        return tl.load(
            x_base + offs_i[None, :] * sxi, mask=(offs_r[:, None] < R) & (offs_i[None, :] < I), other=0.0
        )

    @triton.jit
    def _x_rows2(x_row0, sxr, i0, I, sxi, BLOCK_I: tl.constexpr):  # noqa: E741
        """Rows 0 and 1 of x at column i0 as two (1, BLOCK_I) float32 tiles (x_row0: the layer's
        row 0; ``launch`` takes this path for exactly two rows)."""
        offs_i = i0 + tl.arange(0, BLOCK_I)[None, :]
        x0 = tl.load(x_row0 + offs_i * sxi, mask=offs_i < I, other=0.0)
        x1 = tl.load(x_row0 + sxr + offs_i * sxi, mask=offs_i < I, other=0.0)
        return x0.to(tl.float32), x1.to(tl.float32)

    @triton.jit
    def _dot(x, w, IEEE_DOT: tl.constexpr):
        """x (BLOCK_R, BLOCK_I) times the weight tile transposed, in float32 (exact for float32 x)."""
        return tl.dot(x, tl.trans(w), input_precision="ieee" if IEEE_DOT else None)

    @triton.jit
    def _layer_gemv_tile(
        x_ptr, w_ptr, y_ptr,
        R, O, I,  # noqa: E741
        N,  # the layers (the grid's second axis): unused here, an argument so that the autotuner keys on it
        sxn, sxr, sxi,
        swn, swo, swi,
        syn, syr, syo,
        BLOCK_R: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_I: tl.constexpr,
        IEEE_DOT: tl.constexpr,
        PDL: tl.constexpr,
        EARLY_W: tl.constexpr,
    ):  # fmt: skip
        pid_o = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_r = tl.arange(0, BLOCK_R)
        x_base = x_ptr + n * sxn + offs_r[:, None] * sxr
        w_base = w_ptr + n * swn + offs_o[:, None] * swo
        # Launched with PDL (programmatic dependent launch), the kernel starts while the kernel
        # before it drains; gdc_wait blocks until that kernel has finished and its writes are
        # visible (a no-op when launched without PDL). With EARLY_W (w a transform-time constant,
        # stacked weights: no kernel writes them) the first weight tile streams before the wait,
        # during that overlap; w read from an activation (a decode step's cache, which the step
        # itself may write just before) waits first. x is read and y written after the wait.
        if PDL and not EARLY_W:
            tl.extra.cuda.gdc_wait()
        w = _w_tile(w_base, offs_o, 0, O, I, swi, BLOCK_I)
        if PDL and EARLY_W:
            tl.extra.cuda.gdc_wait()
        if BLOCK_R == 1:
            x = _x_tile(x_base, offs_r, 0, R, I, sxi, BLOCK_I)
            # a true GEMV: elementwise products accumulate in registers across the I loop and
            # are reduced once at the end (a reduction per tile would serialise the loop)
            part = w.to(tl.float32) * x.to(tl.float32)
            for i0 in range(BLOCK_I, I, BLOCK_I):
                w = _w_tile(w_base, offs_o, i0, O, I, swi, BLOCK_I)
                x = _x_tile(x_base, offs_r, i0, R, I, sxi, BLOCK_I)
                part += w.to(tl.float32) * x.to(tl.float32)
            acc = tl.sum(part, axis=1)[None, :]
        elif BLOCK_R == 2:
            # two rows (a deferred-K/V step's q/k/v: the previous token's corrected input and this
            # one's): two 2-D accumulators, one per row, each the one-row loop's (a 3-D
            # accumulator over both rows ran 70% slower than one row, run 8)
            x_row0 = x_ptr + n * sxn
            x0, x1 = _x_rows2(x_row0, sxr, 0, I, sxi, BLOCK_I)
            wf = w.to(tl.float32)
            part0 = wf * x0
            part1 = wf * x1
            for i0 in range(BLOCK_I, I, BLOCK_I):
                wf = _w_tile(w_base, offs_o, i0, O, I, swi, BLOCK_I).to(tl.float32)
                x0, x1 = _x_rows2(x_row0, sxr, i0, I, sxi, BLOCK_I)
                part0 += wf * x0
                part1 += wf * x1
            acc = tl.join(tl.sum(part0, axis=1), tl.sum(part1, axis=1)).trans()
        else:
            x = _x_tile(x_base, offs_r, 0, R, I, sxi, BLOCK_I)
            acc = _dot(x, w, IEEE_DOT)
            for i0 in range(BLOCK_I, I, BLOCK_I):
                w = _w_tile(w_base, offs_o, i0, O, I, swi, BLOCK_I)
                x = _x_tile(x_base, offs_r, i0, R, I, sxi, BLOCK_I)
                acc += _dot(x, w, IEEE_DOT)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch; it waits for y
        y_ptrs = y_ptr + n * syn + offs_r[:, None] * syr + offs_o[None, :] * syo
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_o[None, :] < O))

    # keyed on the layer count too: the best tile for one layer's programs is not the best for
    # 32 layers' (a chunk of one layer tuned first made a 32-layer step 37% slower, run 14)
    _layer_gemv_tuned = triton.autotune(configs=_configs(), key=["N", "R", "O", "I", "BLOCK_R"])(
        _layer_gemv_tile
    )

    def launch(
        kernel,
        x: torch.Tensor,
        w: torch.Tensor,
        pdl: bool = False,
        early_weights: bool = False,
        **config: int,
    ) -> torch.Tensor:
        """Run ``kernel`` (the autotuned one, or the bare tile with an explicit ``config`` of
        BLOCK_O, BLOCK_I, as the tests do under ``TRITON_INTERPRET=1``) on x (N, R, I), w (N, O, I);
        ``pdl``: launched with programmatic dependent launch (``layer_gemv_pdl``), ``early_weights``:
        w is constant, its first tile is read before waiting for the previous kernel."""
        n, r, i = x.shape
        o = w.shape[1]
        y = torch.empty((n, r, o), device=x.device, dtype=x.dtype)

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(o, meta["BLOCK_O"]), n)

        kernel[grid](
            x, w, y,
            r, o, i,
            n,
            x.stride(0), x.stride(1), x.stride(2),
            w.stride(0), w.stride(1), w.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            BLOCK_R=r if r <= 2 else 16,
            IEEE_DOT=x.dtype == torch.float32,
            PDL=pdl,  # (explicit: Inductor passes a triton_op's kernel no defaults)
            EARLY_W=early_weights,
            **({"launch_pdl": True} if pdl else {}),
            **config,
        )  # fmt: skip
        return y


def pdl_supported(x: torch.Tensor) -> bool:
    """Whether x's GPU launches kernels with PDL (compute capability 9.0, Hopper, or newer)."""
    return triton is not None and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def gemv(x: torch.Tensor, w: torch.Tensor, pdl: bool, weights_constant: bool) -> torch.Tensor:
    """x (N, R, I), w (N, O, I) -> (N, R, O) on the kernel, launched with PDL where ``pdl`` is
    asked for and the GPU supports it (callers check :func:`applies` first). ``weights_constant``:
    no kernel writes w (stacked weights), so with PDL its first tiles stream before the wait.
    Never the PDL launch while ``torch.export`` traces: an opaque op that an exported program
    (an AOTInductor package) could not run without this project."""
    if pdl and pdl_supported(x) and not exporting():
        return torch.ops.snlp.layer_gemv_pdl(x, w, weights_constant)
    return torch.ops.snlp.layer_gemv(x, w)


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``layer_gemv`` should compute ``einsum('n...i,noi->n...o', x, w)``: on a GPU, with
    Triton, few rows per layer, matching floating dtypes, and not in the ONNX exporter (which has no
    op for it; ``export_onnx`` also exports the rewritten graph with the kernel turned off in its
    lowering, ``passes.lowering``, since its ``torch.export`` runs outside ``torch.onnx``)."""
    if triton is None or not x.is_cuda or not w.is_cuda or x.dtype != w.dtype:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dim() < 2 or w.dim() != 3:
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    rows = 1
    for s in x.shape[1:-1]:
        rows *= int(s)
    return 1 <= rows <= MAX_ROWS and rows not in CUBLAS_ROWS
