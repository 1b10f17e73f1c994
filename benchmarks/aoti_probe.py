"""Which route loads an AOTInductor package in a fresh process on this machine?

A probe on the lent H200 (torch 2.11) saw ``torch._inductor.aoti_load_package`` segfault (rc -11)
in a fresh process even for a plain MLP, and a decode-step package fail with ``Could not find
schema for snlp::layer_gemv_pdl``. This builds packages for

- ``mlp``: a plain two-layer MLP, the control (snlp_compile never imported);
- ``step``: the transformed decode step (K=1) through ``snlp_compile.export.export_aoti``, which
  keeps only kernels a package carries (the GEMV ``triton_op``, no PDL or fused-attention op);
- ``step-aten``: the same with ``triton_kernels=False``: ATen ops only (cuBLAS), no Triton kernel;
- ``step-raw``: the same step through plain ``torch.export`` + ``aoti_compile_and_package`` (the
  package that failed before; now that the kernels never choose an opaque op while
  ``torch.export`` traces, its graph should be ``step``'s),

each built in its own process, then tries every loading route in its own fresh process, with a
timeout: ``aoti_load_package`` (after the inputs are on the device, "cold", before any CUDA
work in the process, and with ``run_single_threaded=True``), the C++ loader ``torch._C._aoti.AOTIModelPackageLoader``, each with
and without ``import snlp_compile`` first, and loading in the process that compiled the package.
Every route's return code, error line, time and max |package - eager| go to aoti_probe.json and
aoti_probe.md in --out (else $OUT, else benchmarks/results), rewritten after every child; the
packages (build artefacts, large for a real model) go to --work (default: a temporary folder,
removed at the end). ``--jobs`` children run at once (builds, then each case's routes as soon as
its package exists), so a crash or hang costs one timeout, not the rest of the probe.

    python -m benchmarks aoti-probe --out DIR                  # cuda, bf16, nanochat-small
    python -m benchmarks aoti-probe --device cpu --dtype fp32 --model nanochat-tiny   # every route in ~50 s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

CASES = ("mlp", "step", "step-aten", "step-raw")
ROUTES = ("aoti_load_package", "aoti_load_package-cold", "aoti_load_package-single-threaded", "cpp_loader")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROOT = Path(__file__).resolve().parent.parent


def _mlp_inputs(device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    return mlp.to(device, dtype).eval(), (torch.randn(4, 256, device=device, dtype=dtype),)


def transformed_step(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The transformed (K=1) decode step of a reference model, random weights, caches filled
    before the position half way through them."""
    import snlp_compile
    from snlp_compile.models import build_model, config_of
    from snlp_compile.models.kv import CachedStep, max_positions, new_cache

    device, dtype = args.device, DTYPES[args.dtype]
    model = build_model(args.model, seed=0, dtype=dtype).to(device).eval()
    max_len = args.max_len or max_positions(model)
    k_cache, v_cache = new_cache(model, args.batch, max_len)
    pos = max_len // 2
    g = torch.Generator(device=device).manual_seed(1)
    for c in (k_cache, v_cache):
        c[:, :, :, :pos] = torch.randn(c[:, :, :, :pos].shape, generator=g, device=device, dtype=dtype)
    idx = torch.randint(0, config_of(model).vocab_size, (args.batch, 1), device=device, generator=g)
    inputs = (idx, torch.tensor(pos, device=device), k_cache, v_cache)
    step = snlp_compile.transform(CachedStep(model), inputs, iterations=args.k, dynamic_shapes=False)
    return step, inputs


def build(args: argparse.Namespace) -> dict[str, Any]:
    """(runs in its own process) package ``args.case`` into ``args.dir``, with its inputs and the
    eager outputs; with ``--load-here`` also load and run it in this process."""
    case_dir = Path(args.dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    package = case_dir / "model.pt2"
    started = time.perf_counter()
    if args.case == "mlp":
        module, inputs = _mlp_inputs(args.device, DTYPES[args.dtype])
    else:
        module, inputs = transformed_step(args)
    with torch.no_grad():
        out = module(*inputs)
    expected = list(out) if isinstance(out, (tuple, list)) else [out]
    info: dict[str, Any] = {}
    if args.case in ("step", "step-aten"):
        from snlp_compile.export.aoti import export_aoti

        result = export_aoti(module, inputs, package, dynamic=False, triton_kernels=args.case == "step")
        info["custom_ops"] = result.custom_ops
    else:
        from torch._inductor import aoti_compile_and_package

        with torch.no_grad():
            program = torch.export.export(module, inputs, strict=False)
        ops = sorted({str(n.target) for n in program.graph.nodes if "snlp" in str(n.target)})
        info["custom_ops"] = ops
        aoti_compile_and_package(program, package_path=str(package))
    info["build_s"] = round(time.perf_counter() - started, 1)
    torch.save(tuple(t.cpu() for t in inputs), case_dir / "inputs.pt")
    torch.save([t.cpu() for t in expected], case_dir / "expected.pt")
    if args.load_here:
        from torch._inductor import aoti_load_package

        runner = aoti_load_package(str(package))
        with torch.no_grad():
            got = runner(*inputs)
        info["max_abs_diff"] = _diff(got, expected)
    return info


def _diff(got: Any, expected: list[torch.Tensor]) -> float:
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    if len(got) != len(expected):
        return float("inf")
    return max(float((g.float().cpu() - e.float()).abs().max()) for g, e in zip(got, expected))


def load(args: argparse.Namespace) -> dict[str, Any]:
    """(runs in a fresh process) load ``args.dir``'s package by ``args.route`` and run it. The
    ``-cold`` route loads before this process has touched the device (no CUDA context yet); the
    others move the inputs to the device first."""
    if args.import_project:
        import snlp_compile.kernels  # noqa: F401  (registers the snlp:: op schemas)
    case_dir = Path(args.dir)
    package = str(case_dir / "model.pt2")
    host_inputs = torch.load(case_dir / "inputs.pt")
    expected = torch.load(case_dir / "expected.pt")
    started = time.perf_counter()
    with torch.no_grad():
        if args.route == "aoti_load_package-cold":
            from torch._inductor import aoti_load_package

            runner = aoti_load_package(package)
            got = runner(*[t.to(args.device) for t in host_inputs])
        elif args.route in ("aoti_load_package", "aoti_load_package-single-threaded"):
            from torch._inductor import aoti_load_package

            inputs = [t.to(args.device) for t in host_inputs]
            single = args.route.endswith("single-threaded")  # (the runner without its thread pool)
            got = aoti_load_package(package, run_single_threaded=single)(*inputs)
        else:
            inputs = [t.to(args.device) for t in host_inputs]
            device_index = -1 if args.device == "cpu" else (torch.device(args.device).index or 0)
            loader = torch._C._aoti.AOTIModelPackageLoader(package, "model", False, 1, device_index)
            got = loader.run(inputs)
    return {"load_run_s": round(time.perf_counter() - started, 2), "max_abs_diff": _diff(got, expected)}


def run_probe(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run this module as a child process; its last stdout line is a JSON result. The child runs
    with faulthandler, so a crash names the Python call it happened in (compiling, loading, running)."""
    cmd = [sys.executable, "-X", "faulthandler", "-m", "benchmarks.aoti_probe", *argv]
    started = time.perf_counter()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "seconds": round(timeout, 1), "error": f"no answer within {timeout:.0f} s"}
    row: dict[str, Any] = {"rc": done.returncode, "seconds": round(time.perf_counter() - started, 1)}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines and lines[-1].startswith("{"):
        row.update(json.loads(lines[-1]))
    else:
        row["error"] = error_line(done.returncode, done.stderr)
        row["stderr_tail"] = done.stderr[-3000:]
    return row


def error_line(returncode: int, stderr: str) -> str:
    """What a failed child said: its last unindented stderr line that is not a warning (a crash
    leaves torch's FutureWarnings last), prefixed with the signal that killed it, if one did, and
    the innermost Python frame faulthandler printed for the crash."""
    lines = stderr.splitlines()
    fatal = next((i for i, ln in enumerate(lines) if ln.startswith("Fatal Python error")), len(lines))
    said = [ln for ln in lines[:fatal] if ln.strip() and not ln.startswith(" ") and "Warning:" not in ln]
    if returncode >= 0:
        return (said[-1] if said else "(no stderr)")[:400]
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    frame = next((ln.strip() for ln in lines[fatal:] if ln.startswith("  File ")), None)
    return (
        f"killed by {name}"
        + (f" in {frame}" if frame else "")
        + (f"; last stderr line: {said[-1]}" if said else "")
    )[:400]


def toolchain() -> dict[str, str | None]:
    """What AOTInductor compiles and links a package with (a package built against another CUDA
    toolkit than torch's runtime is one known way to crash at load): torch's CUDA version, the
    CUDA_HOME torch's extension builder finds, and the first version line of nvcc and the C++
    compiler (None where missing)."""
    from torch.utils import cpp_extension

    def first_line(cmd: list[str], pick: str) -> str | None:
        if shutil.which(cmd[0]) is None:
            return None
        try:
            said = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return None
        return next((ln.strip() for ln in said if pick in ln), said[0].strip() if said else None)

    cxx = os.environ.get("CXX") or "c++"
    return {
        "torch_cuda": torch.version.cuda,
        "cuda_home": cpp_extension.CUDA_HOME,
        "nvcc": first_line(["nvcc", "--version"], "release"),
        "cxx": first_line([cxx, "--version"], ""),
    }


def child_args(args: argparse.Namespace) -> list[str]:
    """The options every child process gets from the probe's own (--max-len only where given)."""
    max_len = [] if args.max_len is None else ["--max-len", str(args.max_len)]
    return ["--device", args.device, "--dtype", args.dtype, "--model", args.model, "--batch", str(args.batch),
            *max_len, "-K", str(args.k)]  # fmt: skip


def markdown(payload: dict[str, Any]) -> str:
    env = payload["env"]
    lines = [
        "# AOTInductor loading routes",
        "",
        f"torch {env['torch']}, {env['device_name']}, {payload['config']}",
        "",
        "toolchain: " + ", ".join(f"{k} {env.get(k)}" for k in ("torch_cuda", "cuda_home", "nvcc", "cxx")),
        "",
        "| case | route | import snlp_compile | rc | s | max abs diff | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        diff = r.get("max_abs_diff")
        error = str(r.get("error", "")).replace("|", "/")
        lines.append(
            f"| {r['case']} | {r['route']} | {r['import_project']} | {r['rc']} | {r.get('seconds', '')} "
            f"| {'' if diff is None else f'{diff:.3g}'} | {error} |"
        )
    return "\n".join(lines) + "\n"


def probe(args: argparse.Namespace) -> int:
    """Build every case and try every route; the packages live in ``--work`` or, without it, in
    a temporary folder removed at the end, so that only the small JSON and markdown reach --out."""
    # (imported here, not at the top: the children import this module, and the ``mlp`` control
    # must run in a process that never imported snlp_compile, which benchmarks.common does)
    from benchmarks.common import out_dir_from

    out = out_dir_from(args.out)
    if args.work:
        return _probe(args, out, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="snlp_aoti_probe_") as work:
        return _probe(args, out, Path(work))


def _probe(args: argparse.Namespace, out: Path, work: Path) -> int:
    device_name = (
        torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    env: dict[str, str | None] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device_name": device_name,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env.update(toolchain())
    done: dict[tuple[int, int], dict[str, Any]] = {}  # (case, route) position -> row
    lock = threading.Lock()

    def record(at: tuple[int, int], row: dict[str, Any]) -> None:
        """Keep a finished child's row and rewrite the tables, so a call cut short keeps every row so far."""
        with lock:
            done[at] = row
            print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
            payload = {
                "env": env,
                "config": {k: v for k, v in vars(args).items() if k not in ("role", "out", "work")},
                "rows": [done[k] for k in sorted(done)],
            }
            out.mkdir(parents=True, exist_ok=True)
            (out / "aoti_probe.json").write_text(json.dumps(payload, indent=1))
            (out / "aoti_probe.md").write_text(markdown(payload))

    def build_then_load(c: int, case: str, pool: ThreadPoolExecutor) -> list[Future[None]]:
        case_dir = work / case
        built = run_probe(
            ["--role", "build", "--case", case, "--dir", str(case_dir), "--load-here", *child_args(args)],
            args.timeout,
        )
        record(
            (c, 0),
            {
                "case": case,
                "route": "build + load in the compiling process",
                "import_project": case != "mlp",
                **built,
                # (a crash of the build process is ambiguous: did it compile, then crash loading?)
                "package_written": (case_dir / "model.pt2").exists(),
            },
        )
        if built["rc"] != 0 and not (case_dir / "model.pt2").exists():
            return []
        routes = [(route, imp) for route in ROUTES for imp in (False, True)]
        return [pool.submit(load_route, c, r, case, route, imp) for r, (route, imp) in enumerate(routes, 1)]

    def load_route(c: int, r: int, case: str, route: str, import_project: bool) -> None:
        argv = [
            "--role",
            "load",
            "--case",
            case,
            "--dir",
            str(work / case),
            "--route",
            route,
            *child_args(args),
        ]
        row = run_probe(argv + (["--import-project"] if import_project else []), args.timeout)
        record((c, r), {"case": case, "route": route, "import_project": import_project, **row})

    # one pool, so that at most --jobs children run at once (a build never waits on a load: it
    # only queues its case's routes behind the work already there)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        started = [
            pool.submit(build_then_load, c, case, pool) for c, case in enumerate(args.cases.split(","))
        ]
        for future in [f for b in started for f in b.result()]:
            future.result()
    print(f"wrote {out / 'aoti_probe.json'} and {out / 'aoti_probe.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    p.add_argument(
        "--work", default=None, help="where the packages stay (default: a temporary folder, removed)"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--model", default="nanochat-small", help="reference model of the decode step")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--max-len", type=int, default=None, help="positions the caches hold (default: the model's)"
    )
    p.add_argument("-K", dest="k", type=int, default=1, help="iterations of the transformed step")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--timeout", type=float, default=420, help="seconds per child process")
    p.add_argument(
        "--jobs",
        type=int,
        default=4,
        help="child processes at once (their seconds share the machine; 1: one at a time)",
    )
    p.add_argument("--role", choices=["probe", "build", "load"], default="probe", help=argparse.SUPPRESS)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--route", choices=ROUTES, help=argparse.SUPPRESS)
    p.add_argument("--import-project", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--load-here", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"aoti-probe: --jobs must be at least 1, got {args.jobs}")
    if args.role == "probe":
        return probe(args)
    result = build(args) if args.role == "build" else load(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
