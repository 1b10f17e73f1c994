"""One entry point for every benchmark, from the root of a source checkout:

    python -m benchmarks SUBCOMMAND [options]        # e.g. decode --shapes 0.5b --batch 1
    python -m benchmarks SUBCOMMAND --help           # the sub-command's own options
    python -m benchmarks decode-05b                  # a preset: the arguments of a BENCHMARKS.md table

Results (NAME.json, NAME.md and a plot where there is one) go to --out, else $OUT, else
benchmarks/results, where a run of a table's --name rewrites the tracked files (--smoke runs: a new
temporary folder, named in their output). BENCHMARKS.md gives the command of every table it shows.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

# sub-command -> module with main(argv: list[str] | None) -> int (imported only when run)
SUBCOMMANDS = {
    "decode": "benchmarks.decode",
    "decode-hf": "benchmarks.decode_hf",
    "forward": "benchmarks.forward",
    "targets": "benchmarks.targets",
    "step-timeline": "benchmarks.step_timeline",
    "gemv-lowering": "benchmarks.gemv_lowering",
    "attention-lowering": "benchmarks.attention_lowering",
    "lowering-gpu": "benchmarks.lowering_gpu",
    "hcn-convergence": "benchmarks.hcn_convergence",
    "train-gpu": "benchmarks.train_gpu",
    "frontier": "benchmarks.frontier",
    "aoti-probe": "benchmarks.aoti_probe",
    "speculative": "benchmarks.speculative",
}

_DECODE_TABLE = [
    "decode", "--batch", "1", "--seq-modes", "compiled+graph,autotuned+graph", "--modes", "compiled+graph",
    "--ks", "", "--warm-ks", "", "--stage-modes", "compiled+graph,autotuned+graph", "--deferred-ks", "1,2",
    "--deferred-modes", "compiled+graph,autotuned+graph", "--einsum-ks", "", "--budget-s", "570",
]  # fmt: skip
# preset -> the full argument list of a table in BENCHMARKS.md (arguments given after it win)
PRESETS = {
    "decode-05b": [*_DECODE_TABLE, "--shapes", "0.5b", "--stages", "32", "--name", "decode_05b"],
    "decode-d20": [*_DECODE_TABLE, "--shapes", "d20", "--stages", "20", "--name", "decode_d20"],
    # issue 24 item 3: transformers models through the decode adapter, one shape a call (a budget
    # that leaves a 10-minute call room for the last variant's compile and the write-out)
    **{
        f"decode-hf-{key}": [
            "decode-hf", "--shapes", shape, "--modes", "compiled+graph", "--seq-modes", "compiled+graph,autotuned+graph",
            "--seq-extra-modes", "eager+graph", "--hf-modes", "compiled+graph", "--warm-ks", "1",
            "--budget-s", "420", "--name", f"decode_hf_{key}",
        ]
        for key, shape in (("qwen", "qwen2.5-0.5b"), ("llama", "llama-3.2-1b"))
    },
    "forward-05b": [
        "forward", "--shapes", "0.5b", "--seq", "2048", "--seq-modes", "compiled+graph,autotuned+graph",
        "--modes", "compiled+graph,autotuned+graph", "--ks", "1", "--stages", "", "--no-smoke",
        "--name", "forward_05b",
    ],
}  # fmt: skip

GPU_TESTS = ["tests/test_layer_gemv.py", "tests/test_decode_attention.py", "tests/test_defer_kv.py"]
GPU_TESTS += ["tests/test_decode.py", "tests/test_speculative.py"]


def gpu_tests(argv: list[str]) -> int:
    """The GPU tests of the kernels, deferred K/V and the decode step (``--matrix``: the GEMV op
    against einsum over 45 cases, autotuning each, on its own); further arguments go to pytest."""
    matrix = "--matrix" in argv
    select = "gpu_op_matches_einsum" if matrix else "(gpu or decode_attention) and not gpu_op_matches_einsum"
    files = GPU_TESTS[:1] if matrix else GPU_TESTS
    rest = [a for a in argv if a != "--matrix"]
    return subprocess.call([sys.executable, "-m", "pytest", "-q", *files, "-k", select, *rest])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("sub-commands:", ", ".join([*SUBCOMMANDS, "gpu-tests"]))
        print("presets:", "; ".join(f"{k} = {' '.join(v[:1])} ..." for k, v in PRESETS.items()))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in PRESETS:
        name, rest = PRESETS[name][0], PRESETS[name][1:] + rest
    if name == "gpu-tests":
        return gpu_tests(rest)
    if name not in SUBCOMMANDS:
        print(f"unknown sub-command {name!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"python -m benchmarks {name}"  # (argparse's usage line)
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach a lent machine's log as they come
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return int(importlib.import_module(SUBCOMMANDS[name]).main(rest) or 0)
    except (AssertionError, RuntimeError) as exc:  # a GPU benchmark on a machine without CUDA: one line
        import torch

        if torch.cuda.is_available() or "CUDA" not in str(exc):
            raise
        print(
            f"python -m benchmarks {name}: needs a CUDA GPU and torch {torch.__version__} sees none ({exc}); "
            "the CPU smoke runs are in tests/test_benchmark_smoke.py",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
