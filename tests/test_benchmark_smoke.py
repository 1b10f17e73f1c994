"""The lowering benchmarks run end to end on the CPU (tiny shapes) and write their JSON and table:
the GPU runs use the same code paths, so a broken script is found here, not on a lent machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", "--out", str(out), *args],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(next(out.glob("*.json")).read_text())


def test_attention_lowering_smoke(tmp_path: Path) -> None:
    result = _run(
        "attention_lowering.py", "--shapes", "tiny", "--context", "64", "--modes", "compiled", out=tmp_path
    )
    assert {r["lowering"] for r in result["rows"]} == {"matmul", "kernel", "mulsum"}
    assert all(r["rel_err"] < 1e-5 for r in result["rows"]), result["rows"]  # float32 on the CPU
    assert "| tiny | kernel | compiled |" in (tmp_path / "attention_lowering.md").read_text()


def test_gemv_lowering_smoke(tmp_path: Path) -> None:
    result = _run("gemv_lowering.py", "--shapes", "4x64x32", out=tmp_path)
    assert len(result["rows"]) == 5 and all(r["rel_err"] < 1e-5 for r in result["rows"]), result["rows"]
    assert "| 4x64x32 | kernel | 1 |" in (tmp_path / "gemv_lowering.md").read_text()


def test_decode_benchmark_compiles_snlp_with_its_own_inductor_options(tmp_path: Path) -> None:
    """decode.py compiles the sequential step with --inductor only and the SNLP steps with
    --snlp-inductor on top, and says so in its table."""
    result = _run(
        "decode.py", "--shapes", "tiny", "--context", "32", "--batch", "1", "--modes", "compiled",
        "--ks", "1", "--warm-ks", "", "--chunks", "", "--deferred-ks", "", "--einsum-ks", "",
        "--dtype", "fp32", "--inductor", "", "--snlp-inductor", "combo_kernels=True", out=tmp_path,
    )  # fmt: skip
    variants = {r["variant"]: r for r in result["records"]}
    assert set(variants) == {"seq compiled", "snlp K=1 compiled"}, list(variants)
    assert all(r["median_ms"] > 0 and r["error"] is None for r in variants.values()), variants
    assert result["meta"]["snlp_inductor"] == {"combo_kernels": True}
    assert variants["seq compiled"]["extra"]["own_inductor_options"] == {}
    assert variants["snlp K=1 compiled"]["extra"]["own_inductor_options"] == {"combo_kernels": True}
    assert (
        "Inductor options of the SNLP variants (on top): combo_kernels=True"
        in (tmp_path / "decode.md").read_text()
    )


def test_unknown_inductor_option_is_refused_by_name(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--device", "cpu", "--shapes", "tiny",
         "--out", str(tmp_path), "--snlp-inductor", "no_such_option=1"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--snlp-inductor: 'no_such_option=1' is not KEY=VALUE" in proc.stderr
