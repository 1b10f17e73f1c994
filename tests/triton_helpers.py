"""Running a kernel test script under Triton's interpreter (tests/test_layer_gemv.py,
tests/test_decode_attention.py): in a subprocess, because the interpreter is chosen when a kernel
is defined, i.e. when its module is imported."""

from __future__ import annotations

import os
import subprocess
import sys


def run_under_interpreter(script: str) -> subprocess.CompletedProcess:
    """``python -c script`` with ``TRITON_INTERPRET=1``; the caller checks its output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
