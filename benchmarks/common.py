"""Shared benchmark machinery: timing with CUDA events, CUDA-graph capture, compile, the floors,
and result output (JSON + markdown table + plot).

Every regime (forward, decode) builds callables for each variant, hands them to ``Bench.measure``
and lets this module time them the same way: warm-up calls first, then many timed samples (each
sample = ``inner`` back-to-back calls between two CUDA events), median reported. The ratio of
every variant is taken against the best *sequential* variant of the same run, so a slow baseline
can never make the compiler look good.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from snlp_compile.cuda_graph import capture

if TYPE_CHECKING:
    from snlp_compile.config import InitKind

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# --shapes keys -> model registry names: the nanochat trunks, and mHC with 4 hyper-connected streams,
# static H ("mhc-*") and per-token H ("mhc-dyn-*"): the same trunks with the residual stream widened
SIZES = ("d20", "0.5b", "small", "tiny")
SHAPES = {s: f"nanochat-{s}" for s in SIZES} | {
    f"mhc{h}-{s}": f"mhc{h}-{s}" for h in ("", "-dyn") for s in SIZES
}
MODES = ("eager", "eager+graph", "compiled", "compiled+graph")
# also accepted (not in the default list: Inductor's GEMM autotuning takes minutes per model):
# "autotuned" / "autotuned+graph", torch.compile(mode="max-autotune-no-cudagraphs")
ALL_MODES = (*MODES, "autotuned", "autotuned+graph")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

RANDOM_WEIGHTS_NOTE = (
    "random weights (seeded): speed does not depend on weight values; SNLP at small K does not "
    "reproduce an untrained model's outputs, the rel_err column only shows what runs"
)


# -- timing ---------------------------------------------------------------------------------------
@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    samples: int
    inner: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 10,
    samples: int | None = 100,
    inner: int = 1,
    target_s: float = 1.0,
) -> Timing:
    """Median time of one call of ``fn``: CUDA events on a GPU, perf_counter (synchronised) on a CPU.

    samples=None picks the count from a probe so that the timed part lasts about ``target_s``
    (between 20 and 300 samples)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if samples is None:
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        _sync(device)
        per_call = (time.perf_counter() - t0) / 3
        samples = int(min(300, max(20, target_s / max(per_call * inner, 1e-6))))
    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
        for s, e in zip(starts, ends):
            s.record()
            for _ in range(inner):
                fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / inner for s, e in zip(starts, ends)]
    else:
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return Timing(statistics.median(times), q(0.1), q(0.9), samples, inner)


def compile_module(
    fn: Callable[..., Any], autotune: bool = False, options: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """torch.compile with static shapes, Inductor defaults or (``autotune``) GEMM autotuning over
    cuBLAS and Triton templates, plus ``options`` for this compile only; CUDA graphs are added
    separately (``capture`` over the compiled callable), which is what mode="reduce-overhead" /
    "max-autotune" do, minus their tree bookkeeping."""
    mode = "max-autotune-no-cudagraphs" if autotune else None
    if not options:
        return torch.compile(fn, dynamic=False, fullgraph=False, mode=mode)
    merged = {**(torch._inductor.list_mode_options(mode) if mode else {}), **options}
    return torch.compile(fn, dynamic=False, fullgraph=False, options=merged)


def with_iterations(
    transformed: torch.fx.GraphModule, k: int, init: str | None = None
) -> torch.fx.GraphModule:
    """A view of a transformed model that runs K iterations, from another init if given (weights
    shared, not copied; its own warm-start state): one transform() serves every K and init."""
    from snlp_compile.ir.plan import SOLVE_NAME
    from snlp_compile.solve.handle import solve_handle

    new = copy.copy(transformed)
    # (its own pending K/V and warm start; the handle refuses an init that is not an InitKind)
    solve = solve_handle(transformed).variant(k, cast("InitKind | None", init))
    setattr(new, SOLVE_NAME, solve)
    return new


def make_variant(
    base: Callable[..., Any],
    mode: str,
    args: tuple[Any, ...],
    device: torch.device,
    compiled: dict[str, Callable[..., Any]],
    key: str,
    post: Callable[[Any], Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[[], Any]:
    """A zero-argument callable running ``base(*args)`` in the given mode (compiles are reused).

    ``post`` runs eagerly on the result inside the callable (and inside its CUDA graph), e.g. a
    decode step's cache write; its return value is the callable's."""
    if mode.split("+")[0] in ("compiled", "autotuned"):
        if key not in compiled:
            compiled[key] = compile_module(base, autotune=mode.startswith("autotuned"), options=options)
        fn = compiled[key]
    else:
        fn = base

    def call() -> Any:
        out = fn(*args)
        return post(out) if post is not None else out

    return capture(call, device) if mode.endswith("+graph") else call


def profile_variant(fn: Callable[[], Any], label: str, path: Path, rows: int = 25) -> None:
    """Append torch.profiler's per-kernel table (CUDA time) of a few calls of ``fn`` to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    with path.open("a") as f:
        f.write(f"\n===== {label} (5 calls) =====\n{table}\n")


# -- floors ---------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=5, samples=30)
    return 2 * (nbytes // 2) / (t.median_ms * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """Measured dense matmul rate in FLOP/s (random operands, never zeros)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=3, samples=10)
    return 2 * n**3 / (t.median_ms * 1e-3)


def layer_bytes(model: torch.nn.Module, container: str = "transformer.h") -> int:
    """Bytes of the layer stack's parameters: what every sequential forward must read once."""
    layers = model.get_submodule(container)
    return sum(p.numel() * p.element_size() for p in layers.parameters())


def layer_parallel_passes(k: int, n_layers: int) -> float:
    """Passes over N layers' weights (and a decode step's caches) that K SNLP iterations make at
    least: iteration s (from 0) must evaluate the N - s layers whose inputs are not yet exact
    (after s iterations the first s are, docs/DESIGN.md invariant), so sum_{s<K} (N - s) / N. Weights
    larger than the L2 cache are re-read by every iteration. 1 at K=1; (N + 1) / 2 at K=N."""
    k = min(int(k), int(n_layers))
    return sum(n_layers - s for s in range(k)) / n_layers


# the staged family ("snlp K=1 S=N": SNLPConfig.stages); result files written before the rename
# of SNLPConfig.chunks call it "snlp-chunked" and record extra["chunks"]
STAGED_FAMILIES = ("snlp-staged", "snlp-chunked")


def stages_of(extra: dict[str, Any] | None) -> int | None:
    """A record's SNLPConfig.stages (``extra["chunks"]`` in files written before the rename)."""
    extra = extra or {}
    return extra.get("stages", extra.get("chunks"))


def computes_sequentially(family: str, k: int | None, stages: int | None, layers: int | None) -> bool:
    """Whether a row is a sequential baseline: the model as written, or the compiler's exact
    sequential mode (K = 1 with as many stages as layers: each layer solved from the exact output
    of the one before, which is the sequential computation with the compiler's lowering): the
    ratios are taken against the faster of the two."""
    if family == "sequential":
        return True
    return family in STAGED_FAMILIES and k == 1 and stages is not None and stages == layers


def floor_ms(nbytes: float, bandwidth: float) -> float:
    return nbytes / bandwidth * 1e3 if bandwidth and not math.isnan(bandwidth) else float("nan")


# -- environment ----------------------------------------------------------------------------------
def device_label(env: dict[str, Any]) -> str:
    """The GPU's name (or the CPU's) from :func:`environment`, for table titles."""
    return str(env.get("gpu") or env.get("cpu") or env.get("device", "?"))


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    env.update(device=str(device), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


# -- collecting and writing results ----------------------------------------------------------------
@dataclass
class Record:
    regime: str
    shape: str
    case: str  # e.g. "b1 T=2048" or "b1 ctx=1024"
    variant: str  # e.g. "seq eager", "snlp K=1 compiled+graph"
    family: str  # "sequential" or "snlp"
    k: int | None
    mode: str  # one of ALL_MODES
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    rel_err: float | None = None  # vs the sequential eager output of the same case
    ratio_vs_best_seq: float | None = None
    floor_ms: float | None = None
    x_floor: float | None = None
    # the least time of any step of this variant's kind: one pass over the layers for the
    # sequential model, layer_parallel_passes(K, N) passes for SNLP at K (finish_case)
    k_floor_ms: float | None = None
    # best sequential / k_floor_ms: the most any step of this kind can reach against that baseline
    ceiling_vs_best_seq: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Times variants, keeps every record, and writes JSON/markdown/plot after each case."""

    def __init__(
        self, regime: str, out_dir: Path, device: torch.device, meta: dict[str, Any], name: str = ""
    ):
        self.regime, self.name, self.out_dir, self.device = regime, name or regime, out_dir, device
        self.meta = meta
        self.records: list[Record] = []
        self.case_notes: dict[tuple[str, str], str] = {}
        out_dir.mkdir(parents=True, exist_ok=True)

    def measure(
        self, rec: Record, make: Callable[[], Callable[[], Any]], reference: Any, *, warmup: int
    ) -> Record:
        """Build the variant (compile/capture happen here), check its output, time it.

        Errors are recorded on the row (and printed), never swallowed silently."""
        t0 = time.perf_counter()
        try:
            fn = make()
            out = fn()
            if reference is not None:
                rec.rel_err = rel_err(first_tensor(out), reference)
            t = time_fn(fn, self.device, warmup=warmup, samples=None, inner=1)
            rec.median_ms, rec.p10_ms, rec.p90_ms = t.median_ms, t.p10_ms, t.p90_ms
        except Exception as exc:  # a variant failing must not lose the rest of the run
            rec.error = f"{type(exc).__name__}: {str(exc)[:500]}"
            print(f"[{rec.variant}] FAILED: {rec.error}", file=sys.stderr)
            traceback.print_exc(limit=4)
        rec.extra["build_and_time_s"] = round(time.perf_counter() - t0, 1)
        self.records.append(rec)
        return rec

    def finish_case(
        self, shape: str, case: str, floor: float | None, layers: int | None = None, pass_floor=None
    ):
        """Ratios against the best sequential variant of this case; floor multiples.

        ``pass_floor`` (default ``floor``): the least time of one pass over all ``layers`` (bytes
        or FLOPs, whichever binds); each row's ``k_floor_ms`` is that many passes as its kind must
        make (:func:`layer_parallel_passes`), and ``ceiling_vs_best_seq`` what a step running at
        that floor would reach against the best sequential variant: the highest ratio any target
        for this row can ask."""
        rows = [r for r in self.records if r.shape == shape and r.case == case]
        seq = [
            r.median_ms
            for r in rows
            if r.median_ms is not None and computes_sequentially(r.family, r.k, stages_of(r.extra), layers)
        ]
        best = min(seq) if seq else None
        one_pass = floor if pass_floor is None else pass_floor
        for r in rows:
            if one_pass is not None and not math.isnan(one_pass) and layers:
                passes = layer_parallel_passes(r.k, layers) if r.family != "sequential" and r.k else 1.0
                r.k_floor_ms = one_pass * passes
                if best is not None:
                    r.ceiling_vs_best_seq = best / r.k_floor_ms
            if r.median_ms is None:
                continue
            if best is not None:
                r.ratio_vs_best_seq = best / r.median_ms
            if floor is not None and not math.isnan(floor):
                r.floor_ms = floor
                r.x_floor = r.median_ms / floor
        self.write()

    def write(self) -> None:
        notes = {f"{k[0]} | {k[1]}": v for k, v in self.case_notes.items()}
        payload: dict[str, Any] = {"regime": self.regime, "meta": self.meta, "case_notes": notes}
        payload["records"] = [asdict(r) for r in self.records]
        (self.out_dir / f"{self.name}.json").write_text(json.dumps(payload, indent=1, default=str))
        (self.out_dir / f"{self.name}.md").write_text(
            markdown(self.regime, self.meta, self.records, self.case_notes)
        )

    def run(
        self,
        run: RegimeRun,
        rec: Record,
        base: Callable[..., Any],
        inputs: tuple[Any, ...],
        reference: Any,
        compiled: dict[str, Callable[..., Any]],
        *,
        warmup: int,
        post: Callable[[Any], Any] | None = None,
    ) -> None:
        """Build (compile, capture: ``make_variant``) and time one variant of a regime, unless the
        run's time budget is spent; SNLP variants get the --snlp-inductor options on top."""
        if time.perf_counter() - run.t_start > run.budget_s:
            rec.error = "skipped: time budget spent"
            self.records.append(rec)
            return
        options = None if rec.family == "sequential" else run.meta.get("snlp_inductor")
        rec.extra["own_inductor_options"] = options or {}  # (on top of --inductor)
        key = rec.variant.replace("+graph", "")
        build = partial(make_variant, base, rec.mode, inputs, run.device, compiled, key, post, options)
        self.measure(rec, build, reference, warmup=warmup)
        ms = rec.median_ms if rec.median_ms else float("nan")
        err = rec.rel_err if rec.rel_err is not None else float("nan")
        print(
            f"  {rec.shape.split()[0]:>5} {rec.case:>13} {rec.variant:<30} {ms:8.4f} ms  rel_err {err:.1e}"
            f"  ({rec.extra['build_and_time_s']} s)"
        )

    def done(self, t_start: float) -> int:
        plot_vs_k(self.regime, self.records, self.out_dir / f"{self.name}.png")
        print((self.out_dir / f"{self.name}.md").read_text())
        print(f"total {time.perf_counter() - t_start:.0f} s")
        return 0


def first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table's lines (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _record_cells(r: Record) -> list[str]:
    if r.error:
        return [r.variant, f"failed: {r.error[:80]}", "", "", "", "", "", ""]
    ratio, ceiling = fmt(r.ratio_vs_best_seq, ".2f"), fmt(r.ceiling_vs_best_seq, ".2f")
    spread = f"{fmt(r.p10_ms)}-{fmt(r.p90_ms)}"
    x_floor, k_floor, err = fmt(r.x_floor, ".2f"), fmt(r.k_floor_ms), fmt(r.rel_err, ".1e")
    return [r.variant, fmt(r.median_ms), spread, f"{ratio}x", x_floor, k_floor, f"{ceiling}x", err]


def markdown(
    regime: str,
    meta: dict[str, Any],
    records: list[Record],
    case_notes: dict[tuple[str, str], str] | None = None,
) -> str:
    lines = [f"## {regime}", ""]
    env = meta.get("env", {})
    lines.append(
        f"Device: {device_label(env)}, torch {env.get('torch')}, "
        f"copy bandwidth {fmt(meta.get('copy_bandwidth_tbs'), '.2f')} TB/s, "
        f"matmul {fmt(meta.get('matmul_tflops'), '.0f')} TFLOP/s, dtype {meta.get('dtype')}. "
        f"{meta.get('note', '')}"
    )
    if meta.get("command"):
        lines += ["", f"Command: `{meta['command']}`"]
    if meta.get("inductor"):
        options = ", ".join(f"{k}={v}" for k, v in meta["inductor"].items())
        lines += ["", f"Inductor options (every compiled variant): {options}"]
    if meta.get("snlp_inductor"):
        options = ", ".join(f"{k}={v}" for k, v in meta["snlp_inductor"].items())
        lines += ["", f"Inductor options of the SNLP variants (on top): {options}"]
    for key in sorted({(r.shape, r.case) for r in records}, key=lambda k: (k[0], k[1])):
        rows = [r for r in records if (r.shape, r.case) == key]
        floor = next((r.floor_ms for r in rows if r.floor_ms is not None), None)
        lines += ["", f"### {key[0]}, {key[1]} (bytes floor {fmt(floor)} ms)", ""]
        if case_notes and key in case_notes:
            lines += [case_notes[key], ""]
        header = "variant,median ms,p10-p90 ms,vs best seq,x floor,floor at K ms,ceiling vs best seq,rel err"
        lines += md_table(header.split(","), [_record_cells(r) for r in rows])
    return "\n".join(lines) + "\n"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a note) where matplotlib is missing:
    a benchmark's tables and JSON never depend on it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return None
    return plt


def _median_ms(r: Record) -> float:
    """The median of a record that has one (a sort key over measured records)."""
    assert r.median_ms is not None
    return r.median_ms


def plot_vs_k(regime: str, records: list[Record], path: Path) -> Path | None:
    """Time against K per (shape, case), one line per mode, best sequential and floor as lines."""
    plt = pyplot()
    if plt is None:
        return None
    keys = sorted({(r.shape, r.case) for r in records})
    if not keys:
        return None
    cols = min(2, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        rows = [r for r in records if (r.shape, r.case) == key and r.median_ms is not None]
        lines = dict.fromkeys(
            (r.family, r.mode) for r in rows if r.k and r.family not in ("sequential", *STAGED_FAMILIES)
        )
        for family, mode in lines:  # one line per SNLP family (plain, deferred, einsum) and mode
            pts = sorted((r.k, r.median_ms) for r in rows if (r.family, r.mode) == (family, mode))
            label = f"SNLP{family[4:].replace('-', ' ')} {mode}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        best = min((r for r in rows if r.ratio_vs_best_seq == 1.0), key=_median_ms, default=None)
        if best is not None:  # (the model as written or the compiler's exact sequential mode)
            ax.axhline(best.median_ms, color="k", ls="--", label=f"best sequential ({best.variant})")
        floor = next((r.floor_ms for r in rows if r.floor_ms), None)
        if floor:
            ax.axhline(floor, color="gray", ls=":", label="bytes floor")
        ax.set_yscale("log")
        ax.set_xlabel("K (iterations)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # K is a count
        ax.set_ylabel("ms")
        ax.set_title(f"{regime}: {key[0]}, {key[1]}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_table(
    out: Path, name: str, meta: dict[str, Any], rows: list[dict[str, Any]], title: str, columns: str
) -> str:
    """NAME.json (meta + rows) and NAME.md (title, then one column per ``KEY:FORMAT`` of the
    space-separated ``columns``, headed by the key with spaces for underscores); returns the markdown."""
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    specs = [spec.partition(":")[::2] for spec in columns.split()]
    cells = [[format(row[k] if row[k] is not None else float("nan"), f) for k, f in specs] for row in rows]
    text = "\n".join([title, "", *md_table([k.replace("_", " ") for k, _ in specs], cells)]) + "\n"
    (out / f"{name}.md").write_text(text)
    return text


# the default output folder, as a help text says it
OUT_HELP = (
    "output folder (default: $OUT, else benchmarks/results, whose tracked files a run of the same "
    "--name overwrites: how BENCHMARKS.md's tables are regenerated)"
)
SMOKE_OUT_HELP = "; --smoke without --out or $OUT: a new temporary folder, named in the output"


def out_dir_from(arg: str | None, smoke: bool = False) -> Path:
    """--out, else $OUT (the device machine's return folder), else benchmarks/results, where the
    results BENCHMARKS.md shows are tracked; a smoke run gets a new temporary folder instead (and
    says so), so that checking a script leaves the checkout as it was."""
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if smoke:
        path = Path(tempfile.mkdtemp(prefix="snlp_bench_smoke_"))
        print(f"smoke run without --out or $OUT: results go to {path}", flush=True)
        return path
    return RESULTS_DIR


def inference_model(registry_name: str, **kwargs: Any) -> tuple[torch.nn.Module, str]:
    """The benchmarked model and a note: static-H mHC models get their H computed once
    (``freeze_static_mixing``), as an inference deployment would, so the sequential baselines do
    not recompute a constant Sinkhorn projection at every step (the transform folds it anyway)."""
    from snlp_compile.models import build_model
    from snlp_compile.models.mhc import StaticMix, freeze_static_mixing

    model = build_model(registry_name, **kwargs)
    if any(isinstance(m, StaticMix) for m in model.modules()):
        return freeze_static_mixing(model), "static H frozen (computed once) in every variant"
    return model, ""


def transform_note(transformed: Any, seconds: float) -> str:
    """The case note's "transform() took" part, with the time its verify pass took where it ran
    (on a GPU that pass is the first to run the project's Triton kernels)."""
    from snlp_compile.report import ExplainReport

    report = ExplainReport.of(transformed)
    verify = report.pass_seconds.get("verify") if report is not None else None
    return f"transform() took {seconds:.1f} s" + (f" (verify {verify:.1f} s)" if verify is not None else "")


# -- the command line and setup shared by forward and decode ---------------------------------------
# Inductor options every compiled variant gets by default, sequential and SNLP alike: programmatic
# dependent launch speeds up both (the sequential step more). Combo kernels are SNLP's alone: they
# slow the sequential step down together with PDL (docs/benchmark-history.md). "": Inductor's defaults.
BEST_INDUCTOR = "triton.enable_pdl=True"
SNLP_INDUCTOR = "combo_kernels=True"


def add_regime_arguments(p: Any, *, name: str, ks_help: str, profile_help: str) -> None:
    """The options every regime script takes (shapes, K, modes, stages, dtype, output, budget)."""
    p.add_argument("--shapes", default="d20,0.5b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--ks", default="1,2,4", type=int_list, help=ks_help)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seq-modes", default=None, help="modes of the sequential variants (default: --modes)")
    # --chunks and --chunk-modes: the former names (SNLPConfig.chunks), for commands in earlier notes
    stages, modes = p.add_mutually_exclusive_group(), p.add_mutually_exclusive_group()
    stages.add_argument(
        "--stages", default="2,4", type=int_list, help="SNLPConfig.stages values, each at K=1"
    )
    stages.add_argument("--chunks", dest="stages", type=int_list, help=argparse.SUPPRESS)
    modes.add_argument("--stage-modes", default="compiled+graph", help="modes of the staged variants")
    modes.add_argument("--chunk-modes", dest="stage_modes", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--vocab", type=int, default=256, help="vocabulary of the trunk models (head cost)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--name", default=name, help="stem of the output files (NAME.json, .md, .png)")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip variants once this much time is spent")
    p.add_argument("--profile", action="store_true", help=profile_help)
    every = "Inductor options KEY=VALUE,... of every compiled variant, sequential and SNLP ('': defaults)"
    p.add_argument("--inductor", default=BEST_INDUCTOR, help=every)
    p.add_argument("--snlp-inductor", default=SNLP_INDUCTOR, help="further options, SNLP variants only")


@dataclass
class RegimeRun:
    """What a regime script's main() needs after parsing: device, dtype, output folder, run
    metadata (environment, command, measured bandwidth and matmul rate) and the bytes-floor rate."""

    t_start: float
    device: torch.device
    dtype: torch.dtype
    out: Path
    meta: dict[str, Any]
    bandwidth: float  # bytes/s; nan off CUDA
    budget_s: float


def start_regime(args: Any, script: str, note: str, argv: list[str] | None, smoke: bool = False) -> RegimeRun:
    """Seed, Dynamo cache size, output folder and the measured device rates, the same for every regime."""
    t_start = time.perf_counter()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    meta: dict[str, Any] = {
        "env": environment(device),
        "dtype": args.dtype,
        "note": note,
        "command": command(script, argv),
    }
    options = inductor_options(args.inductor)
    if options:
        meta["inductor"] = options
    snlp_options = parse_inductor_options(args.snlp_inductor, "--snlp-inductor")
    if snlp_options:
        meta["snlp_inductor"] = snlp_options
    bw = float("nan")
    if device.type == "cuda":
        bw = copy_bandwidth(device)
        meta["copy_bandwidth_tbs"] = bw / 1e12
        meta["matmul_tflops"] = matmul_rate(device, dtype) / 1e12
    return RegimeRun(t_start, device, dtype, out_dir_from(args.out, smoke), meta, bw, args.budget_s)


def command(subcommand: str, argv: list[str] | None) -> str:
    """The command line that reproduces a result, for its metadata."""
    return f"python -m benchmarks {subcommand} " + shlex.join(sys.argv[1:] if argv is None else argv)


def parse_inductor_options(text: str, flag: str = "--inductor") -> dict[str, Any]:
    """``key=value,...`` of torch._inductor.config options as a dict (values as Python literals)."""
    import ast

    import torch._inductor.config as inductor_config

    options: dict[str, Any] = {}
    for item in (x for x in text.split(",") if x):
        key, sep, raw = item.partition("=")
        if not sep or not hasattr(inductor_config, key.strip()):
            raise SystemExit(f"{flag}: '{item}' is not KEY=VALUE with KEY a torch._inductor.config option")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        options[key.strip()] = value
    return options


def inductor_options(text: str) -> dict[str, Any]:
    """Parse and apply ``key=value,...`` to torch._inductor.config (the whole process: every
    compiled variant gets the same options, so the sequential baseline is as tuned as SNLP)."""
    import torch._inductor.config as inductor_config

    options = parse_inductor_options(text)
    for key, value in options.items():
        setattr(inductor_config, key, value)
    return options


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def mode_list(text: str, device: torch.device) -> list[str]:
    """Comma-separated modes; the CUDA-graph ones are dropped off CUDA."""
    modes = [m for m in text.split(",") if m]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODES)}")
    return modes if device.type == "cuda" else [m for m in modes if not m.endswith("+graph")]
