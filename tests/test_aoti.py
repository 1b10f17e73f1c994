"""AOTInductor package of the transformed decode step: compiled on the CPU (a C++ build, about
25 s for this tiny model, so one package for the whole file), loaded in a fresh Python process
that never imports snlp_compile, and run on inputs other than the traced ones: it must equal the
step in this process (and contain no snlp:: op, so nothing but torch is needed to load it)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

import snlp_compile
from snlp_compile import SNLPConfigError
from snlp_compile.export.aoti import (
    AOTIExport,
    AOTILoadError,
    compiled_in,
    export_aoti,
    load_aoti,
    run_in_fresh_process,
)
from snlp_compile.kernels import layer_gemv
from snlp_compile.kernels import ops as kernel_ops
from snlp_compile.models import build_model
from snlp_compile.models.kv import CachedStep, new_cache

if shutil.which("g++") is None and shutil.which("c++") is None:  # pragma: no cover - environment
    pytest.skip("AOTInductor on the CPU needs a C++ compiler", allow_module_level=True)

MAX_LEN = 16


def _step_inputs(model: torch.nn.Module, batch: int, pos: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = new_cache(model, batch, MAX_LEN)
    for c in (k_cache, v_cache):
        c[:, :, :, :pos] = torch.randn(c[:, :, :, :pos].shape, generator=g)
    idx = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g)
    return idx, torch.tensor(pos), k_cache, v_cache


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, AOTIExport]:
    model = build_model("nanochat-tiny", n_layer=2)
    step = snlp_compile.transform(CachedStep(model), _step_inputs(model, 2, 3, 0), iterations=1)
    return step, export_aoti(step, _step_inputs(model, 2, 3, 0), tmp_path_factory.mktemp("aoti") / "step.pt2")


def test_package_of_the_decode_step_runs_in_a_fresh_process(
    package: tuple[torch.nn.Module, AOTIExport],
) -> None:
    step, result = package
    assert result.path.is_file() and result.device == "cpu" and result.snlp_report is not None
    assert result.custom_ops == [] and not any(op.startswith("snlp::") for op in result.op_counts)
    assert "self-contained" in str(result)
    inputs = _step_inputs(build_model("nanochat-tiny", n_layer=2), 3, 9, 1)
    with torch.no_grad():
        want = step(*inputs)
    got = run_in_fresh_process(result.path, inputs)  # batch 3, position 9: not the traced example
    assert len(got) == 3
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    in_process = load_aoti(result.path)(*inputs)
    torch.testing.assert_close(in_process[0], want[0], rtol=1e-5, atol=1e-5)


def test_which_project_ops_a_package_carries() -> None:
    """The GEMV triton_op is compiled into a package; the opaque ops (``kernels.ops``) are not,
    and no snlp:: op is left out of those two lists."""
    assert compiled_in("snlp::layer_gemv")
    assert not compiled_in("snlp::cached_attention") and not compiled_in("snlp::layer_gemv_pdl")
    assert not compiled_in("snlp::decode_attention")
    registered = {f"snlp::{name}" for name in dir(torch.ops.snlp) if not name.startswith("_")}
    registered -= {"snlp::name"}  # (the namespace object's own attribute)
    assert registered <= kernel_ops.TRITON_OPS | kernel_ops.OPAQUE_OPS, registered
    assert ("snlp::layer_gemv" in registered) == layer_gemv.available()
    from torch._library.triton import get_triton_kernels_for_op  # torch's own record of triton_ops

    assert all(bool(get_triton_kernels_for_op(op)) == (op in kernel_ops.TRITON_OPS) for op in registered)


def test_package_errors(package: tuple[torch.nn.Module, AOTIExport], tmp_path: Path) -> None:
    step, _ = package
    with pytest.raises(SNLPConfigError, match=r"\.pt2 file"):
        export_aoti(step, (), tmp_path / "step.so")
    with pytest.raises(SNLPConfigError, match="already transformed"):
        export_aoti(step, (), tmp_path / "step.pt2", iterations=2)
    with pytest.raises(AOTILoadError, match="no AOTInductor package"):
        load_aoti(tmp_path / "missing.pt2")
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"not a package")
    with pytest.raises(AOTILoadError, match=r"failed in a fresh process \(rc 1\)"):
        run_in_fresh_process(broken, (torch.zeros(1),))


def test_probe_records_a_failing_route_and_goes_on(tmp_path: Path) -> None:
    """benchmarks/aoti_probe.py runs each route in its own process: a route that fails is a row
    with its return code and last error line, not the probe's end."""
    from benchmarks import aoti_probe

    argv = [
        "--role",
        "load",
        "--case",
        "mlp",
        "--dir",
        str(tmp_path),
        "--route",
        "cpp_loader",
        "--device",
        "cpu",
    ]
    row = aoti_probe.run_probe(argv, timeout=120)
    assert row["rc"] == 1 and "inputs.pt" in row["error"] and "max_abs_diff" not in row
    payload = {"env": {"torch": "x", "device_name": "cpu"}, "config": {}, "rows": []}
    payload["rows"].append({"case": "mlp", "route": "cpp_loader", "import_project": False, **row})
    table = aoti_probe.markdown(payload)
    assert "| mlp | cpp_loader | False | 1 |" in table and "inputs.pt" in table


def test_probe_names_the_signal_of_a_crash_and_skips_warnings() -> None:
    """A segfaulting child's last stderr line is often a FutureWarning: the row says the signal."""
    from benchmarks.aoti_probe import error_line

    stderr = "RuntimeError: early\n/x/copyreg.py:99: FutureWarning: `isinstance(...)` is deprecated\n"
    assert error_line(-11, stderr) == "killed by SIGSEGV; last stderr line: RuntimeError: early"
    assert error_line(-11, "") == "killed by SIGSEGV"
    assert error_line(1, stderr) == "RuntimeError: early"
    crash = stderr + (
        "Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n"
        '  File "/t/_inductor/package.py", line 9 in load_package\n  File "/b/aoti_probe.py", line 3 in build\n'
    )
    assert error_line(-11, crash) == (
        'killed by SIGSEGV in File "/t/_inductor/package.py", line 9 in load_package; '
        "last stderr line: RuntimeError: early"
    )


def test_probe_writes_its_tables_to_out_and_its_packages_to_a_temporary_work_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--out, else $OUT gets aoti_probe.json and .md only; without --work the packages (large
    build artefacts) go to a temporary folder that is gone after the probe, never to --out."""
    from benchmarks import aoti_probe

    dirs: list[Path] = []

    def fake_probe(argv: list[str], timeout: float) -> dict[str, object]:
        case_dir = Path(argv[argv.index("--dir") + 1])
        dirs.append(case_dir)
        return {"rc": 1, "error": "not built"}  # (no model.pt2: the case's load routes are skipped)

    monkeypatch.setattr(aoti_probe, "run_probe", fake_probe)
    monkeypatch.setenv("OUT", str(tmp_path / "env_out"))
    assert aoti_probe.main(["--device", "cpu", "--cases", "mlp"]) == 0
    assert sorted(p.name for p in (tmp_path / "env_out").iterdir()) == ["aoti_probe.json", "aoti_probe.md"]
    assert len(dirs) == 1 and tmp_path not in dirs[0].parents and not dirs[0].parent.exists()
    work = tmp_path / "work"
    assert (
        aoti_probe.main(
            ["--device", "cpu", "--cases", "mlp", "--out", str(tmp_path / "out"), "--work", str(work)]
        )
        == 0
    )
    assert dirs[1] == work / "mlp"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["aoti_probe.json", "aoti_probe.md"]


def test_probe_step_caches_default_to_the_models_positions() -> None:
    """Without --max-len the decode step's caches hold the model's own positions (a fixed 1024
    default exceeded nanochat-small's 256 and failed every step case on the GPU, 2026-12-05)."""
    from benchmarks import aoti_probe
    from snlp_compile.models import build_model
    from snlp_compile.models.kv import max_positions

    p = argparse.Namespace(device="cpu", dtype="fp32", model="nanochat-tiny", batch=1, max_len=None, k=1)
    assert "--max-len" not in aoti_probe.child_args(p)
    _, (_, pos, k_cache, v_cache) = aoti_probe.transformed_step(p)
    positions = max_positions(build_model("nanochat-tiny"))
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == positions and int(pos) == positions // 2
    assert aoti_probe.child_args(argparse.Namespace(**{**vars(p), "max_len": 16}))[-4:] == [
        "--max-len",
        "16",
        "-K",
        "1",
    ]


def test_probe_children_run_at_once_and_the_table_keeps_the_probe_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--jobs runs builds and load routes as concurrent children; the rows still come out case by
    case in route order, and the tables on disk are complete after every child (a call cut short
    keeps them)."""
    import json
    import time

    from benchmarks import aoti_probe

    def fake_probe(argv: list[str], timeout: float) -> dict[str, object]:
        case_dir = Path(argv[argv.index("--dir") + 1])
        if "build" in argv:
            case_dir.mkdir(parents=True, exist_ok=True)
            (case_dir / "model.pt2").write_bytes(b"")
            return {"rc": 0}
        time.sleep(0.05 if "cpp_loader" in argv else 0.0)  # (the last routes finish first)
        return {"rc": 0, "max_abs_diff": 0.0}

    monkeypatch.setattr(aoti_probe, "run_probe", fake_probe)
    argv = ["--device", "cpu", "--cases", "mlp,step", "--out", str(tmp_path), "--work", str(tmp_path / "w")]
    assert aoti_probe.main([*argv, "--jobs", "8"]) == 0
    rows = json.loads((tmp_path / "aoti_probe.json").read_text())["rows"]
    routes = ["build + load in the compiling process"] + [r for r in aoti_probe.ROUTES for _ in (0, 1)]
    assert [(r["case"], r["route"]) for r in rows] == [(c, r) for c in ("mlp", "step") for r in routes]
    env = json.loads((tmp_path / "aoti_probe.json").read_text())["env"]  # (the toolchain a crash may owe to)
    assert {"torch_cuda", "cuda_home", "nvcc", "cxx"} <= env.keys()
    assert "toolchain: torch_cuda " in (tmp_path / "aoti_probe.md").read_text()
    with pytest.raises(SystemExit, match="--jobs must be at least 1, got 0"):
        aoti_probe.main([*argv, "--jobs", "0"])
