"""The command line a newcomer runs first, the explain report, and golden code of a rewrite."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import snlp_compile
from snlp_compile.cli import main

GOLDEN = Path(__file__).parent / "golden"


def test_demo_prints_report_and_exact_last_row(capsys) -> None:
    assert (
        main(
            [
                "demo",
                "--model",
                "nanochat-tiny",
                "--seq",
                "8",
                "--batch",
                "2",
                "--runs",
                "1",
                "--dtype",
                "float64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "snlp_compile explain: NanochatGPT" in out
    assert "scaled IDN" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [1, 2, 3, 4]
    last_err = float(rows[-1].split("|")[2])
    first_err = float(rows[0].split("|")[2])
    assert last_err < 1e-9 < first_err


def test_inspect_writes_picture(tmp_path: Path, capsys) -> None:
    picture = tmp_path / "chain.png"
    assert (
        main(
            [
                "inspect",
                "--model",
                "gpt-tiny",
                "--seq",
                "8",
                "--batch",
                "2",
                "--code",
                "--picture",
                str(picture),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "self.snlp_solve(" in out and "batched_linear" in out
    assert picture.stat().st_size > 10_000
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_model_is_a_clear_error(capsys) -> None:
    assert main(["demo", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "nanochat-small" in err and len(err.strip().splitlines()) == 1


def test_explain_report_contents() -> None:
    from snlp_compile.models import build_model

    model = build_model("nanochat-small")  # backout on: h_{L/2} is read outside the chain
    idx = torch.randint(0, 500, (2, 8))
    report = snlp_compile.explain(model, (idx,), iterations=2, parallel_layers=6)
    text = str(report)
    assert report.rewritten and report.container == "transformer.h"
    assert report.parallel_layers == [f"transformer.h.{i}" for i in range(2, 8)]
    assert "resid_lambdas[layer]" in report.skip
    assert any("output of layer 3" in r for r in report.readers), report.readers  # the backout reader
    assert any(name == "mlp_c_fc_weight" and mode == "stacked" for name, mode, _ in report.externals)
    assert "K=2" in text and "rewritten" in text
    # values are named by where they come from, not only by graph node names (issue 25)
    reader = next(r for r in report.readers if "output of layer 3" in r)
    assert "nanochat.py:" in reader and "backout_lambda" in reader, reader
    sizes = [report.origins[name] for name, _, shape in report.externals if shape == "SymInt"]
    assert sizes and all(o.startswith("size ") and o.endswith(" of idx") for o in sizes), sizes
    assert "x = norm(self.transformer.wte(idx))" in text


class TinyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.fc(self.norm(x))))


class TinyStack(nn.Module):
    def __init__(self, depth: int = 3, d: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def _check_golden(name: str, code: str) -> None:
    path = GOLDEN / name
    if os.environ.get("SNLP_UPDATE_GOLDEN"):
        path.write_text(code)
    assert code.strip() == path.read_text().strip(), f"{name} changed; SNLP_UPDATE_GOLDEN=1 rewrites it"


def test_golden_rewrite_of_a_tiny_stack() -> None:
    """Before: three pre-norm MLP blocks. Expected: one solve call, one batched body (TVM-style)."""
    torch.manual_seed(0)
    model = TinyStack().double().eval()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    # the default lowering, not the environment's: the graph's calls name their kernel choices
    fast = snlp_compile.transform(model, (x,), iterations=3, lowering=snlp_compile.LoweringOptions())
    torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)
    _check_golden("tiny_stack_top.code", fast.code)
    _check_golden("tiny_stack_layers.code", fast.snlp_solve.layers.code)


def test_weight_derived_inputs_are_named_after_their_weights() -> None:
    """mHC's static H (a Sinkhorn projection of a parameter, folded at transform time) is listed
    under the parameter it comes from, not a node name like div_279."""
    import re

    from snlp_compile.models import build_model

    model = build_model("mhc-tiny", vocab_size=256).eval()
    idx = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    report = snlp_compile.explain(model, (idx,), iterations=2)
    names = [name for name, mode, _ in report.externals if mode == "stacked"]
    assert "hc_attn_mix_res_logits_div" in names and "hc_mlp_mix_pre_logits_softmax" in names
    assert not [n for n in names if re.fullmatch(r"(softmax|div|unsqueeze|mul|add)_\d+", n)], names
