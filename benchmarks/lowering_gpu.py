"""Lowering on a GPU: parity and speed of the deployment paths (torch.compile, ONNX Runtime).

    python -m benchmarks lowering-gpu                  # on a GPU: parity + table
    python -m benchmarks lowering-gpu --device cpu --shape tiny --seq 16 --parity-model nanochat-tiny

1. Providers: ``onnxruntime.get_available_providers()`` (and its version) on this machine.
2. Parity (float32): the "snlp" backend and ``snlp_compile.compile(mode="reduce-overhead")`` in
   exact mode (K = L) against the original model; the exported ONNX file under ONNX Runtime (CPU
   provider, and CUDA where present) against the transformed module, two shapes from one export.
3. Speed (fp16 trunk, batch 1, T = 256 and 2048): sequential and SNLP K = 1 (K = 2 compiled with
   CUDA graphs beside) eager, compiled, compiled with CUDA graphs (mode="reduce-overhead"), under
   the "snlp" backend, and under ONNX Runtime's CUDA provider (IOBinding) where present; ratios
   against the best sequential variant of the same run, the bytes floor beside.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

import snlp_compile
from snlp_compile.export.onnx_export import export_onnx
from snlp_compile.models import build_model, config_of

from . import common

REGIME = "lowering_gpu"


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return [f"onnxruntime not importable: {exc}"]
    return [*ort.get_available_providers(), f"(onnxruntime {ort.__version__})"]


def has_ort_cuda() -> bool:
    return "CUDAExecutionProvider" in ort_providers()


def _guard(results: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """Run one check; its failure is recorded under ``key`` (and printed), never swallowed."""
    t0 = time.perf_counter()
    try:
        results[key] = fn()
    except Exception as exc:  # one failing check must not lose the others
        results[key] = {"error": f"{type(exc).__name__}: {str(exc)[:800]}"}
    results[key] = {**results[key], "seconds": round(time.perf_counter() - t0, 1)}
    print(f"parity {key}: {json.dumps(results[key], default=str)}")


def parity(device: torch.device, model_name: str, tmp: Path) -> dict[str, Any]:
    """Exact-mode parity of the compile paths on ``device``; ORT against PyTorch on ``device``."""
    results: dict[str, Any] = {"model": model_name, "dtype": "float32"}
    model = build_model(model_name, device=device, dtype=torch.float32)
    n_layer = config_of(model).n_layer
    vocab = config_of(model).vocab_size
    idx = torch.randint(0, vocab, (2, 48), device=device)
    with torch.no_grad():
        want = model(idx)

    def backend() -> dict[str, Any]:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="snlp", options={"iterations": n_layer}, dynamic=False)
        with torch.no_grad():
            got = compiled(idx)
        record = snlp_compile.export.backend_records()[-1]
        return {"K": n_layer, "rel_err_vs_original": common.rel_err(got, want), "rewritten": record.rewritten}

    def one_call() -> dict[str, Any]:
        torch._dynamo.reset()
        fast = snlp_compile.compile(model, (idx,), iterations=n_layer, mode="reduce-overhead")
        with torch.no_grad():
            got = fast(idx).clone()
            got = fast(idx).clone()  # second call: replayed from the CUDA graph
        return {"K": n_layer, "rel_err_vs_original": common.rel_err(got, want)}

    def onnx_runtime() -> dict[str, Any]:
        from snlp_compile.export.ort import IOBindingRunner, ProviderError, make_session

        k = 2
        transformed = snlp_compile.transform(model, (idx,), iterations=k)
        result = export_onnx(transformed, (idx,), tmp / f"{model_name}.onnx")
        shapes = [(1, 17), (3, 40)]
        out: dict[str, Any] = {
            "K": k,
            "onnx_inputs": result.inputs,
            "ops": dict(result.op_counts.most_common(6)),
        }
        sessions: dict[str, Any] = {"cpu": make_session(result.path, "cpu")}
        if has_ort_cuda():
            try:
                sessions["cuda"] = make_session(result.path, "cuda")
            except ProviderError as exc:
                out["cuda_placement"] = f"{exc}"
                sessions["cuda (placement unchecked)"] = make_session(
                    result.path, "cuda", check_placement=False
                )
        else:
            out["cuda"] = "no CUDAExecutionProvider in this onnxruntime: ORT runs on the CPU only"
        for label, session in sessions.items():
            errs = []
            for batch, seq in shapes:
                x = torch.randint(0, vocab, (batch, seq), device=device)
                with torch.no_grad():
                    ref = transformed(x)
                if label == "cpu":
                    (got,) = session.run(None, {"idx": x.cpu().numpy()})
                    got = torch.from_numpy(got)
                else:
                    (got,) = IOBindingRunner(session, "cuda", device.index or 0)({"idx": x.contiguous()})
                errs.append(
                    {"B": batch, "T": seq, "rel_err_vs_torch": common.rel_err(got.to(ref.device), ref)}
                )
            out[f"ort_{label}"] = errs
        return out

    _guard(results, "torch.compile(backend='snlp')", backend)
    _guard(results, "snlp_compile.compile(mode='reduce-overhead')", one_call)
    _guard(results, "export_onnx + onnxruntime", onnx_runtime)
    return results


class OrtVariant:
    """ONNX Runtime CUDA session over GPU buffers (IOBinding), on torch's current stream so that
    CUDA events time it like every other variant."""

    placements: ClassVar[dict[str, str]] = {}  # variant -> where its nodes ran

    def __init__(self, path: Path, idx: torch.Tensor, *, cuda_graph: bool, label: str):
        from snlp_compile.export.ort import IOBindingRunner, ProviderError, make_session

        options = {
            "has_user_compute_stream": "1",
            "user_compute_stream": str(torch.cuda.current_stream().cuda_stream),
        }
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        self.placements[label] = "all nodes on the GPU (shape arithmetic aside)"
        try:
            session = make_session(path, "cuda", provider_options=options)
        except ProviderError as exc:
            self.placements[label] = str(exc)[:400]
            session = make_session(path, "cuda", provider_options=options, check_placement=False)
        self.runner = IOBindingRunner(session, "cuda", idx.device.index or 0)
        self.runner.bind({"idx": idx.contiguous()})

    def __call__(self) -> torch.Tensor:
        self.runner.run()
        assert self.runner.bound is not None
        return self.runner.bound.outputs[self.runner.output_names[0]]


Plan = list[tuple[str, str, "int | None", str, Callable[[], Callable[[], Any]]]]


def plan_case(
    args: argparse.Namespace, model: torch.nn.Module, idx: torch.Tensor, tmp: Path, ort_cuda: bool
) -> tuple[Plan, dict[str, Path]]:
    """Every variant of one case as (name, family, K, mode, builder); builders compile lazily."""
    graph_mode = "reduce-overhead" if idx.device.type == "cuda" else None
    ks = [int(k) for k in args.ks.split(",")]
    onnx_paths: dict[str, Path] = {}
    plan: Plan = []

    def onnx_file(key: str, **kw: Any) -> Path:
        if key not in onnx_paths:
            t0 = time.perf_counter()
            onnx_paths[key] = export_onnx(model, (idx,), tmp / f"{key}.onnx", dynamic=False, **kw).path
            print(f"  exported {key} in {time.perf_counter() - t0:.0f} s")
        return onnx_paths[key]

    def call(fn: Callable[..., Any]) -> Callable[[], Any]:
        return lambda: fn(idx)

    def compiled(mode: str | None) -> Callable[[], Any]:
        torch._dynamo.reset()
        return call(torch.compile(model, mode=mode, dynamic=False))

    def snlp_eager(k: int) -> Callable[[], Any]:
        return call(snlp_compile.transform(model, (idx,), iterations=k, dynamic_shapes=False))

    def snlp_compiled(k: int, mode: str | None) -> Callable[[], Any]:
        torch._dynamo.reset()
        return call(snlp_compile.compile(model, (idx,), iterations=k, mode=mode, dynamic=False))

    def snlp_backend(k: int) -> Callable[[], Any]:
        torch._dynamo.reset()
        options: dict[str, Any] = {"iterations": k}
        if graph_mode:
            options["triton.cudagraphs"] = True
        return call(torch.compile(model, backend="snlp", options=options, dynamic=False))

    def ort_variant(label: str, key: str, **kw: Any) -> Callable[[], Any]:
        return OrtVariant(onnx_file(key, **kw), idx, cuda_graph=False, label=label)

    plan.append(("seq eager", "sequential", None, "eager", lambda: call(model)))
    plan.append(("seq compiled", "sequential", None, "compiled", lambda: compiled(None)))
    if graph_mode:
        plan.append(
            ("seq compiled+graph", "sequential", None, "compiled+graph", lambda: compiled(graph_mode))
        )
    if ort_cuda:
        seq_ort = lambda: ort_variant("seq ORT-CUDA", "seq", rewrite=False)  # noqa: E731
        plan.append(("seq ORT-CUDA", "sequential", None, "ort-cuda", seq_ort))
    for i, k in enumerate(ks):
        label, first = f"snlp K={k}", i == 0
        if first:
            plan.append((f"{label} eager", "snlp", k, "eager", functools.partial(snlp_eager, k)))
            build = functools.partial(snlp_compiled, k, None)
            plan.append((f"{label} compiled", "snlp", k, "compiled", build))
        if graph_mode:
            build = functools.partial(snlp_compiled, k, graph_mode)
            plan.append((f"{label} compiled+graph", "snlp", k, "compiled+graph", build))
        if first:
            suffix = "+graph" if graph_mode else ""
            build = functools.partial(snlp_backend, k)
            plan.append((f"{label} backend 'snlp'{suffix}", "snlp", k, f"backend{suffix}", build))
        if ort_cuda and first:
            build = functools.partial(ort_variant, f"{label} ORT-CUDA", f"snlp{k}", iterations=k)
            plan.append((f"{label} ORT-CUDA", "snlp", k, "ort-cuda", build))
    return plan, onnx_paths


def bench(
    args: argparse.Namespace, device: torch.device, bench_: common.Bench, tmp: Path, t_start: float
) -> None:
    model = build_model(
        common.SHAPES[args.shape], vocab_size=args.vocab, device=device, dtype=common.DTYPES[args.dtype]
    )
    cfg = config_of(model)
    wbytes = common.layer_bytes(model)
    bw = bench_.meta.get("copy_bandwidth_tbs", float("nan")) * 1e12
    shape_label = f"{args.shape} (L={cfg.n_layer}, d={cfg.n_embd})"
    ort_cuda = has_ort_cuda() and device.type == "cuda" and not args.no_ort
    for T in (int(t) for t in args.seq.split(",") if t):
        idx = torch.randint(0, args.vocab, (args.batch, T), device=device)
        ref = model(idx)
        case = f"b{args.batch} T={T}"
        bench_.case_notes[(shape_label, case)] = f"layer weights {wbytes / 1e6:.0f} MB, {args.dtype}"
        plan, onnx_paths = plan_case(args, model, idx, tmp, ort_cuda)
        only = [o for o in args.only.split(",") if o]
        for variant, family, k, mode, make in plan:
            if only and not any(o in variant for o in only):
                continue
            rec = common.Record(args.name, shape_label, case, variant, family, k, mode)
            if time.perf_counter() - t_start > args.budget_s:
                rec.error = "skipped: time budget spent"
                bench_.records.append(rec)
                print(f"  {case:>12} {variant:<34} skipped (budget)")
                continue
            bench_.measure(rec, make, ref, warmup=args.warmup)
            if variant in OrtVariant.placements:
                rec.extra["placement"] = OrtVariant.placements[variant]
            ms = rec.median_ms if rec.median_ms is not None else float("nan")
            err = rec.rel_err if rec.rel_err is not None else float("nan")
            print(
                f"  {case:>12} {variant:<34} {ms:8.3f} ms  rel_err {err:.1e}  ({rec.extra['build_and_time_s']} s)"
            )
        bench_.finish_case(shape_label, case, common.floor_ms(wbytes, bw))
        for path in onnx_paths.values():
            path.unlink(missing_ok=True)
            Path(str(path) + ".data").unlink(missing_ok=True)


def parity_markdown(meta: dict[str, Any], records: list[common.Record]) -> str:
    """Providers (verbatim), parity checks and ORT placements, appended to the markdown table."""
    lines = ["", "### onnxruntime on this machine", ""]
    lines.append(f"`onnxruntime.get_available_providers()` printed `{meta.get('ort_providers')}`.")
    lines += ["", "### parity", ""]
    for key, value in meta.get("parity", {}).items():
        lines.append(f"- {key}: `{json.dumps(value, default=str)}`")
    placed = [(r.case, r.variant, r.extra["placement"]) for r in records if "placement" in r.extra]
    if placed:
        lines += ["", "### ORT-CUDA node placement", ""]
        lines += [f"- {case}, {variant}: {where}" for case, variant, where in placed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="0.5b", choices=sorted(common.SHAPES))
    p.add_argument("--seq", default="256,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ks", default="1,2", help="SNLP iteration counts (the first gets every variant)")
    p.add_argument("--dtype", default="fp16", choices=sorted(common.DTYPES))
    p.add_argument("--vocab", type=int, default=256, help="vocabulary of the trunk model (head cost)")
    p.add_argument("--parity-model", default="nanochat-small")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime timing variants")
    p.add_argument("--out", default=None, help=common.OUT_HELP)
    p.add_argument("--budget-s", type=float, default=420.0, help="skip variants once this much time is spent")
    p.add_argument("--only", default="", help="comma list: only variants whose name contains one of these")
    p.add_argument("--name", default=REGIME, help="base name of the result files")
    p.add_argument("--skip-parity", action="store_true")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    out = common.out_dir_from(args.out)
    providers = ort_providers()
    meta: dict[str, Any] = {
        "env": common.environment(device),  # (first: without CUDA, the one-line failure before any output)
        "dtype": args.dtype,
        "ort_providers": providers,
        "note": common.RANDOM_WEIGHTS_NOTE + f"; trunk shape (vocab {args.vocab})",
        "command": common.command("lowering-gpu", argv),
    }
    print(f"onnxruntime.get_available_providers() -> {providers}")
    if device.type == "cuda":
        meta["copy_bandwidth_tbs"] = common.copy_bandwidth(device) / 1e12
        meta["matmul_tflops"] = common.matmul_rate(device, common.DTYPES[args.dtype]) / 1e12
    bench_ = common.Bench(args.name, out, device, meta)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_parity:
            meta["parity"] = parity(device, args.parity_model, tmp)
        bench_.write()
        with torch.no_grad():
            bench(args, device, bench_, tmp, t_start)
    bench_.write()
    with (out / f"{args.name}.md").open("a") as f:
        f.write(parity_markdown(meta, bench_.records))
    common.plot_vs_k("lowering_gpu", bench_.records, out / f"{args.name}.png")
    print((out / f"{args.name}.md").read_text())
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0
