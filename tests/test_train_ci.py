"""Training on real text, end to end on the CPU: the regulariser buys one-iteration convergence
(issue 5, what must be shown 1), checkpoints round-trip into transform(), the CLI works."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch

from snlp_compile import transform
from snlp_compile.cli import main
from snlp_compile.train import (
    RegulariserConfig,
    SolveSetting,
    TrainConfig,
    evaluate_model,
    load_checkpoint,
    load_corpus,
    perplexity,
    read_checkpoint_info,
    save_checkpoint,
    train,
)
from snlp_compile.train.data import collect_files, default_sources, eval_windows, is_held_out

SEQ = 64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: deterministic sums, and no oversubscription when xdist runs workers
    side by side on a 2-core box (which slows tiny matmuls down by an order of magnitude)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=300_000)


def _config(reg: RegulariserConfig | None) -> TrainConfig:
    return TrainConfig(
        model="nanochat-tiny",
        model_overrides={"sequence_len": SEQ},
        steps=100,
        batch_size=8,
        seq_len=SEQ,
        lr=3e-3,
        warmup_steps=10,
        seed=0,
        regulariser=reg,
        eval_windows=32,
        progress=False,
    )


def test_regulariser_halves_the_one_iteration_gap(corpus) -> None:
    """Same data, seed and steps, with and without the regulariser: the regularised model's gap
    between K=1 all-parallel SNLP perplexity and its own sequential perplexity is at most half
    the baseline's (measured: about a tenth)."""
    windows = eval_windows(corpus.val, SEQ, 64)
    gaps, seq_ppl = {}, {}
    for name, reg in (("baseline", None), ("regularised", RegulariserConfig(weight=1.0, ramp_steps=25))):
        result = train(_config(reg), corpus)
        rows = evaluate_model(
            result.model,
            windows,
            [SolveSetting(1, "all")],
            batch_size=16,
            device="cpu",
            bytes_per_token=corpus.val_bytes_per_token,
            label=name,
        )
        seq, k1 = rows
        assert (seq["mode"], k1["mode"], k1["K"], k1["parallel"]) == ("sequential", "snlp", 1, 4)
        gaps[name] = k1["ppl"] - seq["ppl"]
        seq_ppl[name] = seq["ppl"]
        if reg is not None:
            assert result.history[-1]["lam"] == 1.0 and result.history[-1]["reg"] > 0
    # both learned the text (uniform over 256 bytes is ppl 256) and the baseline's gap is real
    assert max(seq_ppl.values()) < 30
    assert gaps["baseline"] > 1.0
    assert gaps["regularised"] <= 0.5 * gaps["baseline"], gaps


def test_checkpoint_round_trip_and_transform(corpus, tmp_path) -> None:
    cfg = _config(None)
    cfg.steps, cfg.warmup_steps = 3, 1
    model = train(cfg, corpus).model
    folder = save_checkpoint(
        tmp_path / "ckpt", model, "nanochat-tiny", tokenizer=corpus.tokenizer.to_json(), note="x"
    )
    loaded = load_checkpoint(folder)
    assert read_checkpoint_info(folder)["note"] == "x" and not loaded.training
    idx = eval_windows(corpus.val, SEQ, 2)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
        fast = transform(loaded, (idx,), iterations=4)  # K = layers: exact
        torch.testing.assert_close(fast(idx), model(idx), rtol=1e-4, atol=1e-4)


def test_split_is_by_file_and_stable(corpus) -> None:
    files = collect_files(default_sources())
    held = [k for k, _ in files if is_held_out(k, 0.05)]
    assert 0 < len(held) < 0.2 * len(files)
    assert all(".py" in k and "site-packages" not in k for k, _ in files)
    assert corpus.train_files > 0 and corpus.val_files > 0 and corpus.tokenizer.vocab_size == 256
    assert corpus.val_bytes_per_token == 1.0  # bytes: bits per byte = bits per token


def test_bpe_tokenizer_round_trip() -> None:
    """The optional byte-level BPE: trained on the training files, more than a byte per token,
    saved in the checkpoint JSON and restored to the same encoder."""
    from snlp_compile.train.data import tokenizer_from_json

    small = load_corpus(max_bytes=40_000, tokenizer="bpe", bpe_vocab_size=320)
    assert small.tokenizer.vocab_size == 320 and int(small.train.max()) < 320
    assert small.val_bytes_per_token > 1.2
    again = tokenizer_from_json(json.loads(json.dumps(small.tokenizer.to_json())))
    text = b"def f(x):\n    return x + 1\n"
    assert list(again.encode(text)) == list(small.tokenizer.encode(text))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        TrainConfig(steps=10, warmup_steps=20)
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        load_corpus(["/no/such/place"])
    with pytest.raises(ValueError, match="seq_len=512 exceeds the model's context 128"):
        from snlp_compile.train.loop import build_for_corpus

        build_for_corpus(TrainConfig(seq_len=512), load_corpus(max_bytes=10_000))


def test_cli_train_and_eval(tmp_path) -> None:
    ckpt = tmp_path / "base"
    common = ["--max-bytes", "60000", "--seq-len", "32"]
    assert (
        main(
            [
                "train",
                "--set",
                "n_layer=3",
                "--steps",
                "4",
                "--warmup",
                "1",
                "--batch-size",
                "4",
                "--eval-windows",
                "4",
                "--out",
                str(ckpt),
                "--no-progress",
                *common,
            ]
        )
        == 0
    )
    out = tmp_path / "r"
    assert (
        main(
            [
                "eval",
                str(ckpt),
                "-K",
                "1",
                "3",
                "--parallel",
                "all",
                "--windows",
                "8",
                "--batch-size",
                "4",
                "--json",
                f"{out}.json",
                "--markdown",
                f"{out}.md",
                "--plot",
                f"{out}.png",
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["mode"], r["K"], r["parallel"]) for r in rows] == [
        ("sequential", None, 0),
        ("snlp", 1, 3),
        ("snlp", 3, 3),
    ]
    assert math.isclose(rows[2]["ppl"], rows[0]["ppl"], rel_tol=1e-4)  # K = layers: exact
    assert rows[1]["ppl"] > rows[0]["ppl"]
    info = read_checkpoint_info(ckpt)
    corpus = load_corpus(**info["data"])
    direct = perplexity(load_checkpoint(ckpt), eval_windows(corpus.val, 32, 8), 4, "cpu", 1.0)
    assert math.isclose(direct["ppl"], rows[0]["ppl"], rel_tol=1e-6)
    assert "| base | snlp | 1 | 3/3 | h0 |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").stat().st_size > 10_000
