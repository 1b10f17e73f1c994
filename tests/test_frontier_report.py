"""The frontier's bookkeeping (benchmarks/frontier.py): joining decode-path perplexity with decode
timings, the goals, and domination of the shallow controls. The GPU run uses these functions as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import pyplot
from benchmarks.frontier import (
    SMOKE,
    Scale,
    Timed,
    Variant,
    build_points,
    figure,
    load_timings,
    markdown,
    merge_earlier,
    pareto,
    parse_point,
    summarise,
)

BASE = 10.0


def _quality() -> list[dict]:
    rows = [
        {"model": "base-s0", "parallel_layers": 0, "iterations": None, "init": None, "ppl": BASE, "bpb": 1.0},
        {"model": "base-s1", "parallel_layers": 0, "iterations": None, "init": None, "ppl": 10.1, "bpb": 1.0},
        {"model": "reg", "parallel_layers": 8, "iterations": 2, "init": "h0", "ppl": 10.05, "bpb": 1.0},
        {"model": "reg", "parallel_layers": 16, "iterations": 1, "init": "h0", "ppl": 10.4, "bpb": 1.0},
        {"model": "base-s0", "parallel_layers": 16, "iterations": 1, "init": "h0", "ppl": 90.0, "bpb": 2.0},
        {"model": "seq-l8", "parallel_layers": 0, "iterations": None, "init": None, "ppl": 11.0, "bpb": 1.1},
    ]
    return rows


def _timed() -> list[Timed]:
    return [
        Timed("base-s0", 0, None, None, "seq compiled+graph", 0.60),
        Timed("base-s0", 0, None, None, "exact-seq compiled+graph", 0.50),  # the best sequential step
        Timed("base-s0", 8, 2, "h0", "snlp compiled+graph", 0.24),
        Timed("base-s0", 16, 1, "h0", "snlp eager+graph", 0.30),
        Timed("base-s0", 16, 1, "h0", "snlp deferred compiled+graph", 0.125),
        Timed("seq-l8", 0, None, None, "seq compiled+graph", 0.26),
    ]


def test_points_join_quality_and_the_fastest_timing() -> None:
    trained = {"seq-l8": {"n_layer": 8}}
    joined = build_points(_quality(), _timed(), trained, Scale())
    assert joined["best_seq_ms"] == 0.50 and joined["best_seq_variant"] == "exact-seq compiled+graph"
    by = {(p["model"], p["parallel_layers"], p["iterations"]): p for p in joined["points"]}
    fast = by[("reg", 16, 1)]
    assert fast["decode_ms"] == 0.125 and fast["timed_variant"] == "snlp deferred compiled+graph"
    assert fast["speedup"] == pytest.approx(4.0) and fast["ppl_vs_baseline"] == pytest.approx(0.04)
    assert by[("base-s1", 0, None)]["decode_ms"] == 0.50  # a deep model's sequential step: the baseline's
    control = by[("seq-l8", 0, None)]
    assert control["kind"] == "shallow-control" and control["speedup"] == pytest.approx(0.5 / 0.26)

    summary = summarise(joined["points"])
    assert summary["best_speedup_within_1pct"] == pytest.approx(0.5 / 0.24)  # reg 8/16 K=2 at +0.5%
    assert summary["best_speedup_within_5pct"] == pytest.approx(4.0)
    assert summary["goals"] == {
        ">=2.0x at <=+1%": True,
        ">=3.0x at <=+5%": True,
        "shallow controls dominated": True,
    }
    assert summary["shallow_controls"]["seq-l8"]["dominated_by"]["model"] == "reg"
    assert summary["seed_spread_ppl_vs_baseline"]["base-s1"] == pytest.approx(0.01)
    assert [p["ppl"] for p in pareto(joined["points"])] == [10.4, 10.05, BASE]
    text = markdown({**joined, "summary": summary, "models": {}, "meta": {"env": {"gpu": "X", "torch": "t"},
                     "scale_note": "", "command": "c"}})  # fmt: skip
    assert "| >= 2.0x at <= +1% | 2.08x (met) |" in text


def test_the_seed_spread_holds_only_the_baseline_seeds() -> None:
    """``base-s0-cont`` (the baseline trained on: a token control) is not a seed of the baseline."""
    cont = {
        "model": "base-s0-cont",
        "parallel_layers": 0,
        "iterations": None,
        "init": None,
        "ppl": 9.2,
        "bpb": 1.0,
    }
    trained = {"seq-l8": {"n_layer": 8}, "base-s0-cont": {"init_from": "base-s0"}}
    summary = summarise(build_points([*_quality(), cont], _timed(), trained, Scale())["points"])
    assert set(summary["seed_spread_ppl_vs_baseline"]) == {"base-s0", "base-s1"}


def test_fine_tunes_are_judged_against_the_same_token_budget() -> None:
    """A fine-tune saw more tokens than the baseline: a point of it counts for a goal only within
    the bound both against the baseline and against its start model trained on with plain CE for
    the same steps (``reg-cont``); without that control it is not judged at all."""
    row = {"bpb": 1.0, "fusion": 1}
    quality = [
        *_quality(),
        {**row, "model": "reg-cont", "parallel_layers": 0, "iterations": None, "init": None, "ppl": 9.5},
        {**row, "model": "sft-tail8", "parallel_layers": 0, "iterations": None, "init": None, "ppl": 9.6},
        {**row, "model": "sft-tail8", "parallel_layers": 16, "iterations": 1, "init": "h0", "ppl": 10.05},
        {**row, "model": "sft-x", "parallel_layers": 16, "iterations": 1, "init": "h0", "ppl": 9.0},
    ]
    trained = {
        "seq-l8": {"n_layer": 8},
        "reg-cont": {"init_from": "reg"},
        "sft-tail8": {"init_from": "reg"},
        "sft-x": {"init_from": "base-s0"},
    }
    joined = build_points(quality, _timed(), trained, Scale())
    by = {(p["model"], p["parallel_layers"]): p for p in joined["points"]}
    tail = by[("sft-tail8", 16)]  # +0.5% against the baseline, +5.8% against the same tokens
    assert tail["speedup"] == pytest.approx(4.0) and tail["ppl_vs_baseline"] == pytest.approx(0.005)
    assert tail["token_control"] == "reg-cont" and tail["ppl_vs_token_control"] == pytest.approx(
        10.05 / 9.5 - 1
    )
    assert tail["ppl_judged"] == pytest.approx(10.05 / 9.5 - 1)
    assert by[("reg", 8)]["token_control"] == "base-s0" and by[("reg", 8)]["ppl_judged"] == pytest.approx(
        0.005
    )
    assert by[("sft-x", 16)]["ppl_judged"] is None  # (base-s0-cont was not trained)
    summary = summarise(joined["points"])
    assert summary["best_speedup_within_1pct"] == pytest.approx(0.5 / 0.24)  # reg 8/16 K=2, not the tail's 4x
    assert summary["best_point_within_5pct"]["model"] == "reg" and summary["not_judged"] == ["sft-x"]
    untimed = [{**p, "speedup": None, "decode_ms": None} for p in joined["points"]]  # (a quality-only report)
    assert summarise(untimed)["not_judged"] == ["sft-x"]
    text = markdown({**joined, "summary": summary, "models": {}, "meta": {"env": {"gpu": "X", "torch": "t"},
                     "scale_note": "", "command": "c"}})  # fmt: skip
    assert "Not judged (that control not trained): sft-x." in text
    assert "| sft-x | 16 | 1 | h0 |" not in text  # (not on the Pareto front: ahead only by its tokens?)
    assert "sft-x" not in {p["model"] for p in pareto(joined["points"])}
    # the quality grid twice: against the baseline, then judged (a row not judged left out); the
    # shallow control with its sequential change alone
    judged_grid = text[text.index("The same, judged") :]
    assert "| sft-tail8 | h0 | -4.00% |  | +0.5% |" in text[: text.index("The same, judged")]
    assert "| sft-tail8 | h0 | +1.05% |  | +5.8% |" in judged_grid and "| sft-x |" not in judged_grid
    assert "| seq-l8 |  | +10.00% |  |  |" in judged_grid


def test_fused_points_join_only_fused_timings() -> None:
    """A fused point (wide layers of M) takes the timing of the same M, never the unfused one's;
    earlier runs' points ("fusion": "none") read as unfused."""
    quality = _quality()
    quality[0] = {**quality[0], "fusion": "none"}
    quality.append({"model": "sft-fused", "parallel_layers": 16, "iterations": 1, "init": "h0", "ppl": 10.02,
                    "bpb": 1.0, "fusion": 4})  # fmt: skip
    timed = [*_timed(), Timed("base-s0", 16, 1, "h0", "snlp eager+graph", 0.10, fusion=4)]
    joined = build_points(quality, timed, {"seq-l8": {"n_layer": 8}}, Scale())
    by = {(p["model"], p["parallel_layers"], p["iterations"], p["fusion"]): p for p in joined["points"]}
    assert by[("sft-fused", 16, 1, 4)]["decode_ms"] == 0.10
    assert by[("reg", 16, 1, 1)]["decode_ms"] == 0.125 and by[("base-s0", 0, None, 1)]["ppl"] == BASE
    summary = summarise(joined["points"])
    assert summary["best_point_within_1pct"]["fusion"] == 4
    text = markdown({**joined, "summary": summary, "models": {}, "meta": {"env": {"gpu": "X", "torch": "t"},
                     "scale_note": "", "command": "c"}})  # fmt: skip
    assert "| sft-fused | 16 | 1 | h0 | 4 | 10.020 |" in text and "16/K=1/F4" in text
    assert "dominated | yes by sft-fused par=16 K=1 h0 fused=4 |" in text


def test_points_syntax_takes_an_optional_fusion() -> None:
    assert parse_point("8:2:h0") == (8, 2, "h0", 1)
    assert parse_point("16:2:h0:f4") == (16, 2, "h0", 4)
    for bad in ("16:2:h0:4", "16:2:cold", "16:2:h0:f4:x", "16:2:h0:f0"):
        with pytest.raises(Exception, match="PAR:K:INIT"):
            parse_point(bad)


def test_a_slower_snlp_point_does_not_dominate_a_control() -> None:
    timed = [t for t in _timed() if "compiled" in t.variant and t.parallel_layers == 0]
    timed.append(Timed("base-s0", 8, 2, "h0", "snlp eager+graph", 0.9))
    joined = build_points(_quality(), timed, {"seq-l8": {"n_layer": 8}}, Scale())
    summary = summarise(joined["points"])
    assert not summary["goals"]["shallow controls dominated"]
    assert summary["shallow_controls"]["seq-l8"]["dominated_by"] is None


def test_timings_read_back_from_a_log(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text(
        "[17:15:47] speed base-s0 par=0 K=None None seq compiled+graph: 0.7012 ms\n"
        "[17:18:28] speed base-s0 par=4 K=1 h0 snlp eager+graph: 1.0925 ms\n"
        "[17:18:30] speed base-s0 par=16 F=4 K=2 h0 snlp eager+graph: 0.5 ms\n"
        "[17:18:29] train noise\n"
    )
    rows = load_timings(tmp_path, log)
    assert [(r.parallel_layers, r.iterations, r.init, r.variant, r.median_ms, r.fusion) for r in rows] == [
        (0, None, None, "seq compiled+graph", 0.7012, 1),
        (4, 1, "h0", "snlp eager+graph", 1.0925, 1),
        (16, 2, "h0", "snlp eager+graph", 0.5, 4),
    ]


def test_speed_only_run_over_an_earlier_quality(tmp_path: Path) -> None:
    """``run --quality-from``: the timing stage end to end (smoke scale, CPU, random weights), the
    path a speed-only GPU call takes."""
    import json

    from benchmarks.frontier import main

    points = [
        {"model": m, "parallel_layers": 0, "iterations": None, "init": None, "ppl": ppl, "bpb": 1.0}
        for m, ppl in (("base-s0", BASE), ("seq-l2", 11.0), ("seq-l1", 12.0))
    ]
    points += [
        {
            "model": "base-s0",
            "parallel_layers": par,
            "iterations": 1,
            "init": "h0",
            "ppl": BASE + par,
            "bpb": 1.0,
        }
        for par in (2, 4)
    ]
    models = {"seq-l2": {"n_layer": 2}, "seq-l1": {"n_layer": 1}}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"points": points, "models": models}))
    out = tmp_path / "out"
    args = [
        "run",
        "--smoke",
        "--quality-from",
        str(earlier),
        "--work",
        str(tmp_path / "w"),
        "--out",
        str(out),
    ]
    args += ["--models", "base-s0", "seq-l2", "seq-l1"]
    assert main(args) == 0
    result = json.loads((out / "frontier.json").read_text())
    timed = {(p["model"], p["parallel_layers"]) for p in result["points"] if p["decode_ms"] is not None}
    assert timed == {("base-s0", 0), ("base-s0", 2), ("base-s0", 4), ("seq-l2", 0), ("seq-l1", 0)}
    assert result["best_seq_variant"] in ("seq eager", "exact-seq eager")
    assert (out / "frontier.md").exists() and (tmp_path / "w" / "timings.json").exists()


def test_a_run_of_some_models_joins_an_earlier_runs_others(tmp_path: Path) -> None:
    """``assemble --quality-from``: a session that trained only the fine-tunes keeps the earlier
    run's other models; a model measured again replaces all of its earlier rows and facts."""
    import json

    earlier = tmp_path / "earlier.json"
    old = [{**r, "fusion": 1} for r in _quality()]
    earlier.write_text(
        json.dumps({"points": old, "models": {"reg": {"steps": 700}, "seq-l8": {"n_layer": 8}}})
    )
    new = [{"model": "reg", "parallel_layers": 8, "iterations": 2, "init": "h0", "ppl": 9.9, "bpb": 1.0}]
    rows, models = merge_earlier(new, {"reg": {"steps": 950}}, earlier)
    assert [r["ppl"] for r in rows if r["model"] == "reg"] == [9.9]  # (the earlier 16/K=1 row is gone)
    assert {r["model"] for r in rows} == {"base-s0", "base-s1", "reg", "seq-l8"}
    assert models == {"reg": {"steps": 950}, "seq-l8": {"n_layer": 8}}
    points = build_points(rows, _timed(), models, Scale(n_layer=16))["points"]
    assert next(p for p in points if p["model"] == "reg")["speedup"] == pytest.approx(0.50 / 0.24)


def test_the_whole_frontier_run_at_smoke_scale(tmp_path: Path) -> None:
    """``frontier run --smoke``: data and BPE, every training objective, the decode-path quality
    grid, timing and the report, end to end on the CPU (about a minute): the stages a GPU call runs."""
    import json

    from benchmarks.frontier import main

    out = tmp_path / "out"
    assert main(["run", "--smoke", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    result = json.loads((out / "frontier.json").read_text())
    models = {p["model"] for p in result["points"]}
    tails = {"sft-tail2", "sft-tail3", "sft-tail3-base", "sft-tail3-solo", "reg-cont", "base-s0-cont"}
    tails |= {"sft-tail3-k1", "sft-tail3-f3-k1"}  # (all but one of 4 layers is 3 again: one K=1 tail)
    assert (
        models == {"base-s0", "base-s1", "reg", "sft-k1", "sft-k2", "sft-fused", "seq-l2", "seq-l1"} | tails
    )
    assert all(p["ppl"] > 1 for p in result["points"])
    exact = [p for p in result["points"] if p["model"] == "reg" and p["iterations"] == p["parallel_layers"]]
    seq = next(p for p in result["points"] if p["model"] == "reg" and p["parallel_layers"] == 0)
    assert exact and all(abs(p["ppl"] / seq["ppl"] - 1) < 1e-5 for p in exact)  # exact mode = sequential
    assert all(p["decode_ms"] for p in result["points"])  # every point timed (eager on the CPU)
    assert result["models"]["reg"]["objective"] == "regulariser"
    # the paper's fusion (smoke: wide layers of 2, K=1) on every deep model, timed as its own steps
    fused = [p for p in result["points"] if p["fusion"] == 2]
    assert {p["model"] for p in fused} == models - {"seq-l2", "seq-l1"} - tails
    # partial-tail fine-tunes (issue 20): through the K=2 solve of their last P layers, with the
    # sequential CE and distillation (-solo: without), from reg (-base: from base-s0); quality at P only
    for name, par, start, keep in (
        ("sft-tail2", 2, "reg", 1.0),
        ("sft-tail3", 3, "reg", 1.0),
        ("sft-tail3-base", 3, "base-s0", 1.0),
        ("sft-tail3-solo", 3, "reg", 0.0),
    ):
        facts = result["models"][name]
        assert facts["init_from"] == start and facts["snlp"]["parallel_layers"] == par
        assert facts["snlp"]["iterations"] == 2 and facts["snlp"]["init"] == "h0"
        assert facts["seq_ce_weight"] == keep and facts["distill_weight"] == keep
        assert ({"ce", "kl"} <= set(facts["last"])) == bool(keep) and "snlp_ce" in facts["last"]
        assert facts["val_full_forward"]["snlp_ppl"] > 1
        mine = [p for p in result["points"] if p["model"] == name]
        assert {p["parallel_layers"] for p in mine} == {0, par} and len(mine) == 5  # seq + K {1,4} x 2 inits
    # K=1 tails (the shallow controls): from reg through the K=1 solve of the last 3, one of them
    # as one wide layer of 3; a fused tail's quality and timings are its wide layers at each K
    for name, m in (("sft-tail3-k1", 1), ("sft-tail3-f3-k1", 3)):
        facts = result["models"][name]
        assert facts["init_from"] == "reg" and facts["seq_ce_weight"] == facts["distill_weight"] == 1.0
        assert (facts["snlp"]["iterations"], facts["snlp"]["parallel_layers"], facts["snlp"]["fused_layers"]) == (
            1, 3, m,
        )  # fmt: skip
        mine = [p for p in result["points"] if p["model"] == name and p["parallel_layers"]]
        assert {(p["parallel_layers"], p["fusion"]) for p in mine} == {(3, m)}
        assert all(p["decode_ms"] and p["token_control"] == "reg-cont" for p in mine)
    one_wide = [p for p in result["points"] if p["model"] == "sft-tail3-f3-k1" and p["parallel_layers"]]
    assert sorted(p["iterations"] for p in one_wide) == [1, 4]  # (one wide layer: K=1 is exact to it)
    assert one_wide[0]["ppl"] == pytest.approx(one_wide[1]["ppl"], rel=1e-5)
    assert result["summary"]["not_judged"] == []  # (base-s0-cont judges the baseline's fine-tunes)
    assert {p["token_control"] for p in result["points"] if p["model"] in ("sft-k1", "sft-fused")} == {
        "base-s0-cont"
    }
    cont = result["models"]["reg-cont"]  # the control of the tails' extra tokens: plain CE from reg
    assert (cont["objective"], cont["init_from"], cont["steps"], cont["snlp"]) == ("ce", "reg", 6, None)
    assert {p["parallel_layers"] for p in result["points"] if p["model"] == "reg-cont"} == {0, 2, 3}
    seq2 = next(p for p in result["points"] if p["model"] == "sft-tail2" and p["parallel_layers"] == 0)
    for p in result["points"]:
        if p["model"] == "sft-tail2" and p["iterations"] == 4:  # K=4 >= 2 parallel layers: exact
            assert abs(p["ppl"] / seq2["ppl"] - 1) < 1e-5
    assert all(p["parallel_layers"] == 4 and p["iterations"] == 1 and p["init"] == "h0" for p in fused)
    assert {p["fusion"] for p in result["points"]} == {1, 2, 3}
    assert result["models"]["sft-fused"]["snlp"]["fused_layers"] == 2
    timed = {(r["fusion"], r["parallel_layers"], r["iterations"]) for r in result["timings"]}
    assert (2, 4, 1) in timed and {(3, 3, 1), (3, 3, 4)} <= timed
    # the quality calls of a split device schedule: their stage files alone make a quality-only report
    import shutil

    q = tmp_path / "q"
    q.mkdir()
    for f in (tmp_path / "w").glob("*.json"):
        if f.name != "timings.json":
            shutil.copy(f, q / f.name)
    assert main(["assemble", "--smoke", "--quality-only", "--work", str(q), "--out", str(q / "out")]) == 0
    only = json.loads((q / "out" / "frontier.json").read_text())
    assert len(only["points"]) == len(result["points"]) and not any(p["decode_ms"] for p in only["points"])
    assert [p["fusion"] for p in only["points"]] == [p["fusion"] for p in result["points"]]
    report = (q / "out" / "frontier.md").read_text()
    assert "**Quality only**" in report and "Incomplete run" not in report
    assert "| goal |" not in report and "Pareto points" not in report  # (no speed claim either way)
    assert "\n\n\n" not in report and "\n\n\n" not in (tmp_path / "out" / "frontier.md").read_text()
    # and an earlier run's timings join them (timing does not depend on the weights), their floor too
    meta = json.loads((q / "meta.json").read_text())
    (q / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "floor_ms"}))
    args = [
        "assemble",
        "--smoke",
        "--work",
        str(q),
        "--out",
        str(q / "t"),
        "--timings-from",
        str(out / "frontier.json"),
    ]
    assert main(args) == 0
    timed_again = json.loads((q / "t" / "frontier.json").read_text())
    assert [p["decode_ms"] for p in timed_again["points"]] == [p["decode_ms"] for p in result["points"]]
    assert "floor_ms" in timed_again["meta"] and "floor_ms" in result["meta"]
    with pytest.raises(SystemExit, match=r"timed another shape: n_layer=4 \(here 16\)"):  # (full scale)
        main(args[:1] + args[2:])
    # a later session that measured one model again: its files, the rest from the earlier report
    one = tmp_path / "one"
    one.mkdir()
    for f in ("meta.json", "reg-cont.train.json", "reg-cont.quality.json"):
        shutil.copy(q / f, one / f)
    earlier = str(out / "frontier.json")
    args = ["assemble", "--smoke", "--work", str(one), "--out", str(one / "o"), "--quality-from", earlier]
    assert main([*args, "--timings-from", earlier]) == 0
    joined = json.loads((one / "o" / "frontier.json").read_text())
    assert sorted(map(str, joined["points"])) == sorted(map(str, result["points"]))
    assert joined["models"].keys() == result["models"].keys()
    assert (tmp_path / "w" / "sft-k2.safetensors").exists()
    # a checkpoint records its data: `snlp-compile eval` reads the run's held-out text, not the stdlib
    import torch

    from snlp_compile.train import load_corpus
    from snlp_compile.train.eval_source import load_for_eval

    src = load_for_eval(tmp_path / "w" / "sft-tail3-k1.safetensors")
    corpus = torch.load(tmp_path / "w" / "corpus.pt", weights_only=False)
    assert src.data == corpus.spec and src.seq_len == SMOKE.seq_len
    assert torch.equal(load_corpus(**src.data, tokenizer=src.tokenizer).val, corpus.val)


def test_plot_colours_every_model_apart_and_shows_the_lowest_point(tmp_path: Path) -> None:
    """Fourteen models (a smoke run's count) get fourteen colours (the default cycle repeats after
    ten), and a point 4% better than the baseline lies inside the plot (the y-limit was -1%)."""
    plt = pyplot()
    if plt is None:
        pytest.skip("matplotlib missing")
    models = [f"m{i}" for i in range(12)] + ["seq-l2", "seq-l1"]
    pts = [
        {"model": m, "kind": "shallow-control" if m.startswith("seq") else "snlp", "speedup": 1.0 + i / 4,
         "ppl": BASE * (1 + (i - 1) / 100), "ppl_vs_baseline": (i - 1) / 100, "fusion": 1}
        for i, m in enumerate(models)
    ]  # fmt: skip
    pts[0] = {**pts[0], "ppl": 0.96 * BASE, "ppl_vs_baseline": -0.04}
    fig = figure({"points": pts, "summary": {"seed_spread_ppl_vs_baseline": {"m1": 0.002}}}, pts, plt)
    ax = fig.axes[0]
    colours = {c.get_label(): tuple(c.get_facecolor()[0][:3]) for c in ax.collections}
    assert len({colours[m] for m in models[:12]} | {colours[f"{m} (sequential)"] for m in models[12:]}) == 14
    assert ax.get_ylim()[0] < -4.0 < ax.get_ylim()[1]
    fig.savefig(tmp_path / "frontier.png")
    plt.close(fig)


def test_the_cpu_scale_is_a_recipe_study_of_the_same_variants() -> None:
    """``--scale cpu``: the GPU run's variants at L=8 (tails of 4 and 6 layers) on the CPU."""
    from benchmarks.frontier import CPU_STUDY, parser, scale_of, variants

    args = parser().parse_args(
        ["run", "--scale", "cpu", "--stages", "train,quality", "--work", "w", "--out", "o"]
    )
    assert scale_of(args) is CPU_STUDY and (CPU_STUDY.device, CPU_STUDY.n_layer) == ("cpu", 8)
    names = {v.name for v in variants(CPU_STUDY)}
    assert {
        "sft-tail4",
        "sft-tail6",
        "sft-tail6-base",
        "sft-tail6-solo",
        "sft-tail6-k1",
        "sft-tail6-f3-k1",
        "sft-tail7-k1",
        "reg-cont",
        "seq-l4",
        "seq-l2",
    } <= names
    assert scale_of(parser().parse_args(["run", "--smoke", "--work", "w", "--out", "o"])) is SMOKE
    # --scale cpu16: the same at the GPU frontier's depth (tails of 12 and 15 against seq-l8, seq-l4)
    deep = scale_of(parser().parse_args(["run", "--scale", "cpu16", "--work", "w", "--out", "o"]))
    assert (deep.n_layer, deep.n_embd, deep.device) == (16, CPU_STUDY.n_embd, "cpu")
    by = {v.name: v for v in variants(deep)}
    assert {"sft-tail12-k1", "sft-tail12-f3-k1", "sft-tail15-k1", "seq-l8", "seq-l4"} <= set(by)
    # the deep K=2 tail (all but two layers); at L=4 and L=8 it is the 3/4 tail, listed once
    assert by["sft-tail14"].snlp is not None and (
        by["sft-tail14"].snlp.iterations,
        by["sft-tail14"].quality_parallel,
    ) == (2, (14,))
    assert [v.name for v in variants(CPU_STUDY)].count("sft-tail6") == 1


def test_a_variant_may_set_its_regulariser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Variant.regulariser reaches the training config (None: RegulariserConfig's defaults)."""
    import benchmarks.frontier as frontier
    from snlp_compile.train import RegulariserConfig

    seen = []

    def train(cfg: Any, corpus: Any) -> None:
        seen.append(cfg.regulariser)
        raise StopIteration

    monkeypatch.setattr(frontier, "train", train)
    for v in (
        Variant("a", "regulariser", regulariser=RegulariserConfig(weight=0.25)),
        Variant("b", "regulariser"),
    ):
        with pytest.raises(StopIteration):
            frontier.train_variant(v, SMOKE, None, tmp_path)
    assert seen == [RegulariserConfig(weight=0.25), RegulariserConfig()]


def test_the_models_table_counts_a_fine_tunes_start_tokens() -> None:
    """A fine-tune's tokens are its own; the next column adds its start model's (the budget a
    same-token control matches); a start not in the run leaves it empty."""
    from benchmarks.frontier import total_tokens

    def facts(name: str, tokens: int, start: str | None) -> dict[str, Any]:
        return {"name": name, "objective": "ce", "n_layer": 16, "tokens": tokens, "init_from": start,
                "tokens_per_layer_param": 0.5, "train_flops": 1e15, "train_seconds": 60, "note": ""}  # fmt: skip

    models = {m["name"]: m for m in (facts("base-s0", 700, None), facts("reg", 700, None),
              facts("reg-cont", 250, "reg"), facts("sft", 250, "reg-cont"), facts("orphan", 250, "gone"))}  # fmt: skip
    assert [total_tokens(n, models) for n in models] == [700, 700, 950, 1200, None]
    joined = build_points(_quality(), _timed(), {"seq-l8": {"n_layer": 8}}, Scale())
    text = markdown({**joined, "summary": summarise(joined["points"]), "models": models,
                     "meta": {"env": {"gpu": "X", "torch": "t"}, "scale_note": "", "command": "c"}})  # fmt: skip
    assert "| sft | ce | 16 | 250 | 1,200 | 0.50 |" in text and "| orphan | ce | 16 | 250 |  | 0.50 |" in text
