"""The benchmarks run end to end on the CPU (tiny shapes) through their one entry point,
``python -m benchmarks``, and write their JSON and table: the GPU runs use the same code paths, so
a broken sub-command is found here, not on a lent machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.common as common
import benchmarks.targets as targets
from benchmarks.__main__ import PRESETS, SUBCOMMANDS
from benchmarks.__main__ import main as benchmarks_main

ROOT = Path(__file__).resolve().parent.parent


def _run(subcommand: str, *args: str, out: Path, forbid: tuple[str, ...] = ()) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # (as the suite: xdist's 2 workers)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", subcommand, "--device", "cpu", "--out", str(out), *args],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [text for text in forbid if text in proc.stderr], proc.stderr
    return json.loads(next(out.glob("*.json")).read_text())


def test_attention_lowering_smoke(tmp_path: Path) -> None:
    result = _run(
        "attention-lowering", "--shapes", "tiny", "--context", "64", "--modes", "compiled", out=tmp_path
    )
    assert {r["lowering"] for r in result["rows"]} == {"matmul", "kernel", "mulsum"}
    assert all(r["rel_err"] < 1e-5 for r in result["rows"]), result["rows"]  # float32 on the CPU
    assert "| tiny | kernel | compiled |" in (tmp_path / "attention_lowering.md").read_text()


def test_gemv_lowering_smoke(tmp_path: Path) -> None:
    result = _run("gemv-lowering", "--shapes", "4x64x32", out=tmp_path)
    assert len(result["rows"]) == 5 and all(r["rel_err"] < 1e-5 for r in result["rows"]), result["rows"]
    assert "| 4x64x32 | kernel | 1 |" in (tmp_path / "gemv_lowering.md").read_text()


def test_decode_benchmark_compiles_snlp_with_its_own_inductor_options(tmp_path: Path) -> None:
    """decode.py compiles the sequential step with --inductor only and the SNLP steps with
    --snlp-inductor on top, and says so in its table."""
    result = _run(
        "decode", "--shapes", "tiny", "--context", "32", "--batch", "1", "--modes", "compiled",
        "--ks", "1", "--warm-ks", "", "--stages", "", "--deferred-ks", "", "--einsum-ks", "",
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


def test_decode_hf_benchmark_smoke(tmp_path: Path) -> None:
    """decode-hf (issue 24: a transformers model through the decode adapter) at --smoke scale: the
    adapter's sequential step is the reference, the model's own StaticCache forward and exact mode
    (K = 2 layers) match it, the floor note says how the vocabulary was cut."""
    result = _run(
        "decode-hf", "--smoke", "--shapes", "tiny-llama", "--modes", "eager", "--seq-extra-modes", "",
        out=tmp_path, forbid=("`past_key_values` is deprecated",),
    )  # fmt: skip
    variants = {r["variant"]: r for r in result["records"]}
    expected = {"seq eager", "hf StaticCache eager", "snlp K=1 eager", "snlp K=2 eager"}
    assert set(variants) == expected, list(variants)
    assert all(r["median_ms"] > 0 and r["error"] is None for r in variants.values()), variants
    # the model's own forward over a StaticCache holding the same keys/values agrees with the
    # adapter's step, and so does K=2 (float32; 2 layers: exact)
    assert variants["hf StaticCache eager"]["rel_err"] < 1e-5
    assert variants["snlp K=2 eager"]["rel_err"] < 1e-5
    assert "vocabulary cut to 64 as in decode.py" in (tmp_path / "decode_hf.md").read_text()


def test_unknown_inductor_option_is_refused_by_name(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # (as the suite: xdist's 2 workers)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "decode", "--device", "cpu", "--shapes", "tiny",
         "--out", str(tmp_path), "--snlp-inductor", "no_such_option=1"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--snlp-inductor: 'no_such_option=1' is not KEY=VALUE" in proc.stderr


def test_layer_parallel_passes() -> None:
    """K SNLP iterations re-read every layer whose input is not yet exact: sum_{s<K} (N - s) / N."""
    passes = common.layer_parallel_passes
    assert passes(1, 32) == 1.0
    assert passes(2, 32) == 63 / 32
    assert passes(20, 20) == 21 / 2 == passes(50, 20)  # exact mode: (N + 1) / 2, K past N clamps


def _record(
    variant: str, family: str, k: int | None, ms: float, shape: str = "d20 (L=20, d=1280)", floor: float = 0.2
) -> dict:
    return {
        "shape": shape, "case": "b1 ctx=1024", "variant": variant, "family": family, "k": k,
        "median_ms": ms, "floor_ms": floor,
    }  # fmt: skip


def test_targets_tell_infeasible_from_missed(tmp_path: Path) -> None:
    """A ratio target above best seq / (floor x passes) is infeasible; below it, missed or met."""
    payload = {
        "regime": "decode",
        "records": [
            _record("seq compiled+graph", "sequential", None, 0.7),
            _record("snlp K=1 compiled+graph", "snlp", 1, 0.25),  # 2.8x < 4x; ceiling 3.5x: infeasible
            _record("snlp K=1 deferred compiled+graph", "snlp-deferred", 1, 0.26),  # not the best K=1
            _record("snlp K=2 compiled+graph", "snlp", 2, 0.36),  # 1.94x >= 1.9x: met
            _record("seq compiled+graph", "sequential", None, 1.0, "0.5b (L=32, d=640)"),
            _record("snlp K=1 compiled+graph", "snlp", 1, 0.14, "0.5b (L=32, d=640)"),  # ceiling 5x
        ],
    }
    path = tmp_path / "decode_x.json"
    path.write_text(json.dumps(payload))
    assert targets.main([str(path), "--out", str(tmp_path), "--name", "t"]) == 0
    rows = {r["target"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    d20_k1 = rows["d20 decode b1 ctx=1024 K=1 >= 4.0x"]
    assert d20_k1["status"] == "infeasible" and d20_k1["snlp_ms"] == 0.25
    assert abs(d20_k1["ceiling"] - 3.5) < 1e-9 and abs(d20_k1["required_ms"] - 0.175) < 1e-9
    assert rows["d20 decode b1 ctx=1024 K=2 >= 1.9x"]["status"] == "met"
    assert rows["0.5b decode b1 ctx=1024 K=1 >= 8.0x"]["status"] == "infeasible"  # 8x > 1.0 / 0.2
    assert rows["d20 decode b1 ctx=1024 K=1 within 1.5x of the bytes floor"]["status"] == "met"
    assert "| infeasible |" in (tmp_path / "t.md").read_text()
    # a run without a measured bandwidth (a CPU run) has no floor to hold a step to
    for r in payload["records"]:
        r["floor_ms"] = None
    path.write_text(json.dumps(payload))
    assert targets.main([str(path), "--out", str(tmp_path), "--name", "t"]) == 0
    rows = {r["target"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert (
        rows["d20 decode b1 ctx=1024 K=1 within 1.5x of the bytes floor"]["status"]
        == "no bytes floor in the results"
    )
    assert rows["d20 decode b1 ctx=1024 K=1 >= 4.0x"]["status"] == "missed"  # (no ceiling: not infeasible)
    # a row that records its floor at K (results since run 12) is held to that, not to a recomputed one
    payload["records"][1]["k_floor_ms"] = 0.25
    path.write_text(json.dumps(payload))
    assert targets.main([str(path), "--out", str(tmp_path), "--name", "t"]) == 0
    rows = {r["target"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    d20_k1 = rows["d20 decode b1 ctx=1024 K=1 >= 4.0x"]
    assert d20_k1["floor_at_k_ms"] == 0.25 and abs(d20_k1["ceiling"] - 2.8) < 1e-9
    assert d20_k1["status"] == "infeasible"


def test_targets_strongest_baseline_pools_runs(tmp_path: Path) -> None:
    """--strongest-baseline takes the fastest sequential time of any run: a target "met" against
    one run's slower autotuned baseline is missed against another run's faster one."""
    for name, seq_ms in (("decode_a.json", 1.0), ("decode_b.json", 0.8)):
        records = [
            _record("seq autotuned+graph", "sequential", None, seq_ms, "0.5b (L=32, d=640)", floor=0.1),
            _record("snlp K=2 compiled+graph", "snlp", 2, 0.24, "0.5b (L=32, d=640)", floor=0.1),
        ]
        (tmp_path / name).write_text(json.dumps({"regime": "decode", "records": records}))
    files = [str(tmp_path / "decode_a.json"), str(tmp_path / "decode_b.json")]
    key = "0.5b decode b1 ctx=1024 K=2 >= 4.0x"  # 1.0 / 0.24 = 4.2x; 0.8 / 0.24 = 3.3x, ceiling 4.1x
    for pooled, status, best_seq in ((False, "met", 1.0), (True, "missed", 0.8)):
        args = [*files, "--out", str(tmp_path), "--name", "t"] + (["--strongest-baseline"] if pooled else [])
        assert targets.main(args) == 0
        row = {r["target"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}[key]
        assert (row["status"], row["best_seq_ms"]) == (status, best_seq), row


@pytest.mark.parametrize(
    "family,key,name",
    [("snlp-staged", "stages", "S"), ("snlp-chunked", "chunks", "C")],  # (and as written before the rename)
)
def test_exact_sequential_mode_counts_as_the_sequential_baseline(
    tmp_path: Path, family: str, key: str, name: str
) -> None:
    """K=1 with as many stages as layers is the sequential computation (the compiler's lowering):
    when it is faster than the model as written it is the baseline; fewer stages are not. Result
    files written before SNLPConfig.chunks became stages read the same."""
    shape = "0.5b (L=32, d=640)"
    records = [
        _record("seq autotuned+graph", "sequential", None, 0.84, shape, floor=0.1),
        {
            **_record(f"snlp K=1 {name}=32 compiled+graph", family, 1, 0.735, shape, floor=0.1),
            "extra": {key: 32},
        },
        {
            **_record(f"snlp K=1 {name}=4 compiled+graph", family, 1, 0.5, shape, floor=0.1),
            "extra": {key: 4},
        },
        _record("snlp K=1 deferred compiled+graph", "snlp-deferred", 1, 0.129, shape, floor=0.1),
    ]
    (tmp_path / "decode_c.json").write_text(json.dumps({"regime": "decode", "records": records}))
    assert targets.main([str(tmp_path / "decode_c.json"), "--out", str(tmp_path), "--name", "t"]) == 0
    row = {r["target"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}[
        "0.5b decode b1 ctx=1024 K=1 >= 8.0x"
    ]
    assert (row["best_seq_ms"], row["best_seq_variant"]) == (0.735, f"snlp K=1 {name}=32 compiled+graph")
    assert abs(row["ratio"] - 0.735 / 0.129) < 1e-9
    assert f"0.735 (snlp K=1 {name}=32 compiled+graph)" in (tmp_path / "t.md").read_text()
    assert common.computes_sequentially(family, 1, 32, 32)
    assert not common.computes_sequentially(family, 1, 4, 32)
    assert not common.computes_sequentially(family, 2, 32, 32)
    assert not common.computes_sequentially("snlp", 1, None, 32)
    assert common.stages_of({key: 32}) == 32 and common.stages_of(None) is None


def test_one_entry_point_runs_targets_and_lists_its_sub_commands(tmp_path: Path) -> None:
    """``python -m benchmarks targets FILES`` writes the targets table; every registered
    sub-command names an importable module with a main(argv), and every preset a sub-command."""
    records = [
        _record("seq autotuned+graph", "sequential", None, 0.7),
        _record("snlp K=1 compiled+graph", "snlp", 1, 0.25),
    ]
    path = tmp_path / "decode_x.json"
    path.write_text(json.dumps({"regime": "decode", "records": records}))
    assert benchmarks_main(["targets", str(path), "--out", str(tmp_path), "--name", "cli"]) == 0
    assert "| d20 decode b1 ctx=1024 K=1 >= 4.0x | 0.700 | 0.250" in (tmp_path / "cli.md").read_text()
    assert benchmarks_main(["no-such-benchmark"]) == 2
    for module in SUBCOMMANDS.values():
        assert callable(__import__(module, fromlist=["main"]).main), module
    assert all(args[0] in SUBCOMMANDS for args in PRESETS.values())


def test_cli_bench_points_at_the_checkout_entry_point(capsys) -> None:
    """`snlp-compile bench ...` runs nothing outside the package: one line naming the command."""
    from snlp_compile.cli import main

    assert main(["bench", "decode", "--batch", "1"]) == 2
    out = capsys.readouterr().out.strip()
    assert out.endswith("from its root run: python -m benchmarks decode --batch 1") and "\n" not in out


def test_speculative_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/speculative.py end to end at smoke scale (training included): every row timed,
    speed-ups against the best sequential decode, acceptance and the 2x arithmetic per row; the
    speculative rows through the graphed code path, run eagerly (--uncaptured-graphs), with a
    staged draft (P = 2 of 4 layers parallel) and the plain one (P = 4), verified through the
    library's exact-seq lowering and the step as written (its weights swapped for the random ones too);
    drafts from h0 (``--init``)."""
    result = _run(
        "speculative", "--smoke", "--work", str(tmp_path / "work"), "--gammas", "2,4", "--ks", "1",
        "--parallel", "2,4", "--repeats", "1", "--warmup", "1", "--uncaptured-graphs", "--adaptive",
        "--verifier", "both", "--init", "h0", out=tmp_path,
    )  # fmt: skip
    rows = result["rows"]
    assert all(r.get("error") is None for r in rows), [r["error"] for r in rows if r.get("error")]
    assert {r["weights"] for r in rows} == {"trained", "random"}
    spec = [r for r in rows if r["kind"] == "speculative"]
    fixed = sorted(
        (r["weights"], r["parallel"], r["gamma"])
        for r in spec
        if not r["adaptive"] and r["verifier"] == "exact-seq"
    )
    assert fixed == [(w, p, g) for w in ("random", "trained") for p in (2, 4) for g in (2, 4)]
    assert all(r["graphs"] for r in spec) and sum(r["adaptive"] for r in spec) == 4
    assert sum(r["verifier"] == "sequential" for r in spec) == 8
    for r in spec:
        assert 0.0 <= r["acceptance_rate"] <= 1.0 and r["tokens_per_s"] > 0 and r["speedup_vs_best_seq"] > 0
        assert r["first_mismatch"] is None  # (float32: lossless to the token)
        assert r["draft_step_ms"] > 0 and r["verify_ms"] > 0
        assert r["adaptive"] or "acceptance_needed_2x_parts" in r
    assert max(r["speedup_vs_best_seq"] for r in rows if r["kind"] == "sequential") == 1.0
    md = (tmp_path / "speculative.md").read_text()
    assert "| trained | speculative P=2 K=1 h0 γ=2 graphs exact-seq-verifier |" in md
    assert all(r["init"] == "h0" for r in spec) and "| trained | snlp P=2 K=1 h0 eager |" in md
    assert (tmp_path / "speculative.png").exists()
    # a given checkpoint: its own positions bound the run, and data tokenised otherwise is refused
    import torch

    from benchmarks.speculative import main
    from snlp_compile.train import ByteTokenizer

    ckpt = str(tmp_path / "work" / "base-s0.safetensors")
    args = ["--smoke", "--checkpoint", ckpt, "--no-random", "--out", str(tmp_path / "again")]
    with pytest.raises(SystemExit, match="exceeds the model's 32 positions"):
        main([*args, "--work", str(tmp_path / "work"), "--new", "25"])
    other = tmp_path / "bytes"
    other.mkdir()
    corpus = torch.load(tmp_path / "work" / "corpus.pt", weights_only=False)
    corpus.tokenizer = ByteTokenizer()
    torch.save(corpus, other / "corpus.pt")
    with pytest.raises(
        SystemExit, match=r"trained with another tokenizer than the data in .*bytes: give --work"
    ):
        main([*args, "--work", str(other)])


def test_speculative_budget_keeps_a_share_for_the_random_weights() -> None:
    """A run cut by --budget-s keeps rows of both weights: the trained rows stop early enough."""
    from benchmarks.speculative import main, trained_deadline

    assert trained_deadline(100.0, 400.0, 0.3) == pytest.approx(310.0)
    assert trained_deadline(100.0, 400.0, 0.0) == 400.0
    assert trained_deadline(500.0, 400.0, 0.3) == 500.0  # (already over: the trained pass skips)
    with pytest.raises(SystemExit, match=r"--random-share must lie in \[0, 1\), got 1.0"):
        main(["--smoke", "--random-share", "1"])


def test_the_trained_pass_ends_at_its_deadline_and_the_random_rows_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main() applies the trained rows' deadline: with it already passed, every trained row is
    skipped for the share and the random weights' rows are still measured."""
    from benchmarks import speculative

    monkeypatch.setattr(speculative, "trained_deadline", lambda *args: -1.0)
    argv = ["--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path), "--gammas", "2", "--ks", "1",
            "--parallel", "2", "--repeats", "1", "--warmup", "1"]  # fmt: skip
    assert speculative.main(argv) == 0
    rows = json.loads((tmp_path / "speculative.json").read_text())["rows"]
    trained = [r for r in rows if r["weights"] == "trained"]
    assert trained and all("--random-share" in r["error"] for r in trained)
    assert [r for r in rows if r["weights"] == "random" and r.get("tokens_per_s")]


def test_a_trained_row_past_its_share_says_why(tmp_path: Path) -> None:
    """A trained row skipped because the random weights' share began says so, not only "spent"."""
    import argparse
    import time

    import torch

    from benchmarks.speculative import Run

    args = argparse.Namespace(budget_s=100.0, name="speculative")
    meta = {"env": {"cpu": "x", "torch": "t"}, "note": "", "command": "c"}
    run = Run(args, torch.zeros(1, 4, dtype=torch.long), meta, tmp_path, time.perf_counter() - 50.0)
    run.deadline = 40.0  # (the trained part ended; the budget has 50 s left)
    row = run.add({"weights": "trained", "variant": "v", "kind": "speculative"}, lambda r: None)
    assert row["error"] == "skipped: --budget-s spent (the trained rows' part; --random-share)"


def test_speculative_profile_needs_cuda() -> None:
    """--profile times CUDA kernels: on the CPU it is refused in one line, before any work."""
    from benchmarks.speculative import main

    with pytest.raises(SystemExit, match="--profile reads CUDA kernel times"):
        main(["--smoke", "--profile"])


def test_speculative_arithmetic() -> None:
    """Expected tokens per round under i.i.d. acceptance, and the acceptance a target needs."""
    from benchmarks.speculative import acceptance_needed, ceiling_any_gamma, tokens_per_round

    assert tokens_per_round(0.0, 4) == 1.0 and tokens_per_round(1.0, 4) == 5.0
    assert abs(tokens_per_round(0.5, 2) - 1.75) < 1e-12
    alpha = acceptance_needed(2.0, 4, round_ms=2.0, seq_ms=1.0)  # 4 tokens per round needed
    assert alpha is not None and abs(tokens_per_round(alpha, 4) - 4.0) < 1e-9
    assert acceptance_needed(2.0, 2, round_ms=2.0, seq_ms=1.0) is None  # (4 > γ + 1 = 3)
    # full acceptance at a large γ approaches 1 / the draft cost (the verification amortised)
    gamma, draft, verify = 4096, 0.77, 1.9
    assert abs((gamma + 1) / (gamma * draft + verify) - ceiling_any_gamma(draft)) < 1e-3
    assert acceptance_needed(2.0, gamma, round_ms=gamma * draft + verify, seq_ms=1.0) is None


def test_step_timeline_variants_are_transform_lowerings() -> None:
    """The step-timeline variants choose the rewritten step's attention through its transform's
    ``LoweringOptions`` (no patched module attributes); an unknown variant is refused by name."""
    from benchmarks.step_timeline import variant_lowering

    assert not variant_lowering("ops").decode_attention_in_layers
    fused, nopdl = variant_lowering("fused"), variant_lowering("fused-nopdl")
    assert fused.decode_attention_in_layers and nopdl.decode_attention_in_layers and not nopdl.pdl
    with pytest.raises(SystemExit, match="unknown variant 'fast'"):
        variant_lowering("fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("name", ["forward", "decode", "lowering-gpu", "decode-hf-qwen"])
def test_gpu_benchmarks_fail_in_one_line_without_cuda(name: str, tmp_path: Path, capsys) -> None:
    """The README's GPU commands on a machine without CUDA: exit 2, one line on stderr, nothing
    printed before it (lowering-gpu printed its ONNX Runtime providers first)."""
    assert benchmarks_main([name, "--out", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, out + err
    assert err.startswith(f"python -m benchmarks {name.removesuffix('-qwen')}: needs a CUDA GPU"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_multigpu_without_cuda_stops_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`torchrun ... -m benchmarks.multigpu` without CUDA: rank 0 says why in one line, before any
    process group (NCCL's traceback from every rank before)."""
    import torch.distributed as dist

    import benchmarks.multigpu as multigpu

    monkeypatch.setenv("RANK", "0")
    with pytest.raises(
        SystemExit, match=r"^python -m benchmarks.multigpu: needs a CUDA GPU .*--smoke --device cpu"
    ):
        multigpu.main([])
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:
        multigpu.main([])
    assert stop.value.code == 2 and not dist.is_initialized()


def test_output_folder_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    """--out, else $OUT, else benchmarks/results (a full run regenerates the tracked tables there);
    a smoke run without either gets a new temporary folder and says which."""
    import benchmarks.multigpu as multigpu

    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # (mkdtemp reads TMPDIR again)
    assert common.out_dir_from(None) == common.RESULTS_DIR
    assert common.out_dir_from("given", smoke=True) == Path("given")
    smoke = common.out_dir_from(None, smoke=True)
    assert smoke.is_dir() and smoke.parent == tmp_path
    assert capsys.readouterr().out == f"smoke run without --out or $OUT: results go to {smoke}\n"
    assert multigpu.out_dir(multigpu._parse([])) == common.RESULTS_DIR / "multigpu"
    assert multigpu.out_dir(multigpu._parse(["--smoke", "--out", "given"])) == Path("given")
    assert multigpu.out_dir(multigpu._parse(["--smoke"])).parent == tmp_path
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert common.out_dir_from(None, smoke=True) == common.out_dir_from(None) == tmp_path / "out"
    assert multigpu.out_dir(multigpu._parse([])) == tmp_path / "out"  # (its results come back from $OUT)


def test_multigpu_smoke_leaves_the_checkout_alone(tmp_path: Path) -> None:
    """The README's `torchrun --nproc-per-node 2 -m benchmarks.multigpu --smoke --device cpu`
    (without --out) writes its table to a temporary folder it names, not into the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env |= {"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "benchmarks.multigpu", "--smoke", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = Path(proc.stdout.split("results go to ")[1].split()[0])
    assert written.parent == tmp_path
    rows = json.loads((written / "multigpu_G2.json").read_text())["rows"]
    layer_parallel = [r for r in rows if r["variant"] == "layer-parallel K=1"]
    assert layer_parallel and all(r["error"] is None and r["max_abs_err"] < 1e-4 for r in layer_parallel)
