"""The README's commands as a new user runs them (issue 25): a fresh virtual environment made
with the README's own install line, then demo, inspect with a picture, export, a short train and
eval on its checkpoint, each asserted to succeed and to write its files.

The install needs pip to reach the package index (CI does; the torch wheel may come from a local
wheel folder); without it the test is skipped, saying so. Only packages are installed: no
weights or data are downloaded (training reads this Python's own sources).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_commands() -> tuple[str, str]:
    """The two bash blocks at the top of the README: (install + demo, install + tests)."""
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == readme_commands()[1]


def _copy_checkout(dest: Path) -> None:
    """The tracked files (as a fresh clone has them), else the tree without caches and venvs."""
    try:
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(
            ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info")
        )
        return
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())


def _pip_reaches_the_index(tmp: Path) -> str | None:
    """None if pip can fetch a small package the install needs, else why not."""
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), "safetensors"],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pip could not run: {exc}"
    return None if res.returncode == 0 else f"pip cannot reach the package index: {res.stderr.strip()[-300:]}"


@pytest.mark.slow
def test_readme_commands_in_a_fresh_venv(tmp_path: Path) -> None:
    if os.environ.get("SNLP_SKIP_FRESH_VENV"):
        pytest.skip("SNLP_SKIP_FRESH_VENV is set")
    why = _pip_reaches_the_index(tmp_path / "probe")
    if why is not None:
        pytest.skip(why)
    first, _ = readme_commands()
    install, sep, demo = first.rpartition(" && ")
    assert sep and demo == "snlp-compile demo", first
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0")
    repo = tmp_path / "clone"
    _copy_checkout(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "venv" not in p)
    env["OMP_NUM_THREADS"] = "1"  # (beside the other xdist worker: 2 cores, not oversubscribed)
    start = time.perf_counter()

    def bash(command: str, timeout: float = 600) -> str:
        res = subprocess.run(
            ["bash", "-c", f"set -e; cd {repo}; {command}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        assert res.returncode == 0, (
            f"{command}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"
        )
        assert "Traceback" not in res.stderr, res.stderr
        return res.stdout + res.stderr

    bash(f"{install} -q")
    installed = time.perf_counter() - start
    act = ". .venv/bin/activate && "
    out = bash(act + "python -c 'import torch; print(torch.__version__)'")
    assert out.startswith("2.13.0"), f"an extra replaced the pinned torch: {out}"
    out = bash(act + "snlp-compile demo")
    assert "result:    rewritten" in out and "The weights are random" in out
    assert "specialized" not in out and "Warning" not in out, out
    out = bash(
        act + "snlp-compile inspect --model nanochat-small --parallel-layers 6 --code --picture chain.png"
    )
    assert "wrote picture: chain.png" in out and (repo / "chain.png").read_bytes()[:4] == b"\x89PNG"
    out = bash(act + "snlp-compile export --model nanochat-small -o m.onnx --check")
    assert (
        "wrote ONNX model: m.onnx" in out and "MISMATCH" not in out and (repo / "m.onnx").stat().st_size > 0
    )
    small = "--seq-len 32 --max-bytes 20000"
    out = bash(
        act + f"snlp-compile train --model nanochat-tiny --objective regulariser --steps 3 --batch-size 2 "
        f"{small} --eval-windows 2 --out ckpt/"
    )
    assert "wrote checkpoint: ckpt" in out and (repo / "ckpt" / "model.safetensors").is_file()
    assert "train regulariser: 3/3 (100%)" in out  # progress lines, stderr not a terminal
    out = bash(act + f"snlp-compile eval ckpt/ -K 1 2 --parallel all --windows 2 {small} --plot ppl.png")
    assert "wrote plot: ppl.png" in out and (repo / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    # torch finds the backend through the entry point, before any import of snlp_compile
    out = bash(
        act + "python -c 'import sys, torch; from torch._dynamo.backends.registry import lookup_backend; "
        'f = lookup_backend("snlp"); print(f.__module__)\''
    )
    assert "snlp_compile.export.compile_backend" in out
    print(f"install {installed:.0f} s, commands {time.perf_counter() - start - installed:.0f} s")
