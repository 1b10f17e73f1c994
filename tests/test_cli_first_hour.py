"""The command line as a new user meets it (issue 25): a fast --help that imports no torch,
--version from the one place it is written, one-line errors (the traceback only with --debug),
missing optional packages named before any work, and progress lines in a log file."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

import snlp_compile
from snlp_compile.cli import COMMANDS, build_parser, main
from snlp_compile.cli import common as cli_common

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


def test_building_the_parser_and_help_import_no_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from snlp_compile.cli import build_parser, main\n"
        "build_parser()\n"
        "for argv in (['--help'], ['--version'], *([c, '--help'] for c in " + repr(list(COMMANDS)) + ")):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


def test_version_is_written_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"snlp-compile {snlp_compile.__version__}"
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'attr = "snlp_compile.__version__"' in text
    assert f'version = "{snlp_compile.__version__}"' not in text


def test_every_option_has_help_and_defaults_are_shown() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        if name != "bench":
            assert "(default:" in p.format_help(), name
        text = " ".join(p.format_help().split())  # (one default per option: not its own and argparse's)
        assert (
            "(default: 20% of --steps) (default: None)" not in text and "CUDA (default: None)" not in text
        ), name


def test_cli_defaults_agree_with_the_library() -> None:
    from snlp_compile.export.onnx_export import DEFAULT_OPSET
    from snlp_compile.models import DEFAULT_MODEL

    assert cli_common.DEFAULT_MODEL == DEFAULT_MODEL
    export = next(a for a in build_parser()._actions if a.dest == "command").choices["export"]
    assert export.get_default("opset") == DEFAULT_OPSET


def test_snlp_error_is_one_line_and_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["inspect", "--model", "gpt-tiny", "--seq", "8", "--no-picture", "--stages", "0"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    assert err[0].startswith("snlp-compile inspect: error: SNLPConfigError:") and "stages" in err[0]
    assert "--debug" in err[0]
    with pytest.raises(snlp_compile.SNLPConfigError):
        main([*argv, "--debug"])


def test_misuse_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "no-such-checkpoint")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-checkpoint" in err[0], err
    assert main(["train", "--set", "n_layer", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["snlp-compile train: error: --set expects key=value, got 'n_layer'"]


def test_cuda_without_a_gpu_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0] and "--device cpu" in err[0]
    assert not (tmp_path / "c").exists()


def test_missing_extra_is_named_before_any_work(monkeypatch, tmp_path: Path, capsys) -> None:
    real = cli_common.importlib.util.find_spec
    monkeypatch.setattr(
        cli_common.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", "gpt-tiny", "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran
    (line,) = captured.err.strip().splitlines()
    assert "onnx" in line and "snlp-compile[onnx]" in line and not out.exists()


def test_line_progress_in_a_log() -> None:
    from snlp_compile.progress import LineProgress

    log = io.StringIO()
    bar = LineProgress(range(20), "train ce", every=0.0, file=log)
    for i in bar:
        bar.set_postfix({"ce": f"{5 - i * 0.1:.3g}"})
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("train ce: 0/20 (0%)")
    assert lines[-1].startswith("train ce: 20/20 (100%)") and lines[-1].endswith("ce=3.1")
    assert "\r" not in log.getvalue() and len(lines) == 21
