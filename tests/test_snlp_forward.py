"""SNLP-forward fine-tuning (issue 20, item 2): the model's output through the K-iteration solve is
the transformed model's, its loss is the transformed model's cross-entropy, its gradients reach the
model's own parameters (finite differences agree), and training through it lowers the K=1 loss
(all layers) and the K=2 loss of a partial tail."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_model

from snlp_compile import SNLPConfig, SNLPConfigError, transform
from snlp_compile.models import build_model
from snlp_compile.train import (
    SNLPForward,
    TrainConfig,
    load_corpus,
    read_checkpoint_info,
    save_checkpoint,
    train,
)
from snlp_compile.train.data import eval_windows


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = reference_model(name)  # random c_proj: every layer does something
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, model.config.vocab_size, (2, 11), generator=g)
    return model, idx, torch.randint(0, model.config.vocab_size, (2, 11), generator=g)


@pytest.fixture(scope="module")
def small() -> dict:
    """nanochat-small (8 layers, scaled IDN, a backout reader of layer 3): the last 6 layers at K=2."""
    model, idx, y = _model("nanochat-small")
    cfg = SNLPConfig(parallel_layers=6, iterations=2)
    snlp, fast = SNLPForward(model, (idx,), cfg), transform(model, (idx,), cfg)
    return {"model": model, "idx": idx, "y": y, "snlp": snlp, "fast": fast}


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@pytest.mark.parametrize(
    ("name", "cfg"),
    [
        ("nanochat-small", SNLPConfig(parallel_layers=6, iterations=2)),
        ("gpt-tiny", SNLPConfig(iterations=1, init="batch_fwd")),
        ("nanochat-tiny", SNLPConfig(iterations=1, stages=2, parallel_layers=3)),
    ],
)
def test_output_is_the_transformed_models(name: str, cfg: SNLPConfig, small: dict) -> None:
    """Same config, float64: SNLPForward(model)(x) == transform(model, config)(x) to 1e-10, on
    another batch shape too, and it is not the sequential output (K is below exact)."""
    if name == "nanochat-small":
        model, idx, snlp, fast = small["model"], small["idx"], small["snlp"], small["fast"]
    else:
        model, idx, _ = _model(name)
        snlp, fast = SNLPForward(model, (idx,), cfg), transform(model, (idx,), cfg)
    other = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for x in (idx, other):
            out = snlp(x)
            torch.testing.assert_close(out, fast(x), rtol=1e-10, atol=1e-10)
            assert (out - model(x)).abs().max() > 1e-4


def test_loss_is_the_transformed_models_cross_entropy(small: dict) -> None:
    model, idx, y, snlp, fast = small["model"], small["idx"], small["y"], small["snlp"], small["fast"]
    with torch.no_grad():
        torch.testing.assert_close(_ce(snlp(idx), y), _ce(fast(idx), y), rtol=1e-12, atol=1e-12)
        assert abs(_ce(snlp(idx), y) - _ce(model(idx), y)) > 1e-4


def test_gradients_reach_the_models_own_parameters(small: dict) -> None:
    """Every parameter the solve's output depends on gets a gradient (prefix layers, parallel
    layers, lambdas, embedding, head), and it matches central finite differences (float64) along
    random directions of a parallel layer's weight, a sequential prefix layer's and the lambdas."""
    model, idx, y, snlp = small["model"], small["idx"], small["y"], small["snlp"]
    model.zero_grad(set_to_none=True)
    _ce(snlp(idx), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    g = torch.Generator().manual_seed(0)
    for name in ("transformer.h.5.mlp.c_fc.weight", "transformer.h.1.attn.c_q.weight", "resid_lambdas"):
        w = model.get_parameter(name)
        direction = torch.randn(w.shape, generator=g, dtype=w.dtype)
        analytic = (w.grad * direction).sum()
        saved, eps = w.detach().clone(), 1e-6
        with torch.no_grad():
            w.copy_(saved + eps * direction)
            up = _ce(snlp(idx), y)
            w.copy_(saved - eps * direction)
            down = _ce(snlp(idx), y)
            w.copy_(saved)
        torch.testing.assert_close(analytic, (up - down) / (2 * eps), rtol=1e-6, atol=1e-9, msg=name)
    model.zero_grad(set_to_none=True)


def test_training_through_k1_lowers_its_cross_entropy(tmp_path) -> None:
    """A few seeded steps of objective="snlp-forward" at K=1 (all layers parallel) from a saved
    checkpoint: the K=1 cross-entropy of the transformed model on held-out windows falls, the
    model keeps the checkpoint's config, and distillation towards the starting model starts at
    KL 0 where the solve is exact."""
    corpus = load_corpus(max_bytes=120_000)
    base = build_model("nanochat-tiny", n_layer=3, sequence_len=32, zero_init_out=False)
    ckpt = save_checkpoint(tmp_path / "base.safetensors", base, "nanochat-tiny", tokenizer=corpus.tokenizer)
    common = {
        "steps": 12,
        "batch_size": 8,
        "seq_len": 32,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_windows": 8,
        "progress": False,
    }
    held = eval_windows(corpus.val, 32, 8)
    x, y = held[:, :-1], held[:, 1:]

    def k1_ce(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(_ce(transform(model, (x,), iterations=1)(x), y))

    cfg = TrainConfig(objective="snlp-forward", snlp=SNLPConfig(iterations=1), init_from=ckpt, **common)
    result = train(cfg, corpus, log_every=4)
    assert result.model.config == base.config and result.model_name == "nanochat-tiny"
    assert len(result.history) == 12 and all("snlp_ce" in r and "grad_norm" in r for r in result.history)
    assert "ce" not in result.history[0]  # seq_ce_weight 0: no sequential forward
    before, after = k1_ce(base), k1_ce(result.model)
    print(f"K=1 held-out cross-entropy {before:.3f} -> {after:.3f}")
    assert after < before - 0.1, (before, after)
    assert result.val["snlp_ce"] == pytest.approx(after, rel=1e-4)  # the same windows, the same solve
    # K = layers is exact: the SNLP logits are the teacher's at step 0, the KL term 0
    exact = TrainConfig(
        objective="snlp-forward",
        snlp=SNLPConfig(iterations=3),
        init_from=ckpt,
        distill_weight=1.0,
        seq_ce_weight=0.5,
        **{**common, "steps": 2},
    )
    first = train(exact, corpus).history[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["snlp_ce"] == pytest.approx(first["ce"], rel=1e-5)
    assert first["loss"] == pytest.approx(1.5 * first["ce"], rel=1e-5)
    info = read_checkpoint_info(ckpt)
    assert info["model_config"]["zero_init_out"] is False and info["tokenizer"] == {"kind": "bytes"}


def test_init_from_checks(tmp_path) -> None:
    corpus = load_corpus(max_bytes=20_000)
    base = build_model("nanochat-tiny", n_layer=2, sequence_len=32)
    ckpt = save_checkpoint(tmp_path / "b", base, "nanochat-tiny", tokenizer={"kind": "bpe", "tokenizer": {}})
    cfg = {"steps": 1, "warmup_steps": 0, "seq_len": 32, "init_from": ckpt}
    with pytest.raises(ValueError, match="corpus tokenizer is not the init_from checkpoint's"):
        train(TrainConfig(**cfg), corpus)
    ckpt = save_checkpoint(tmp_path / "c", base, "nanochat-tiny", tokenizer=corpus.tokenizer)
    with pytest.raises(ValueError, match=r"model_overrides \['n_layer'\] disagree"):
        train(TrainConfig(model_overrides={"n_layer": 4}, **cfg), corpus)


def test_refuses_the_warm_init_and_deferred_kv() -> None:
    model, idx, _ = _model("nanochat-tiny")
    with pytest.raises(SNLPConfigError, match="init='warm'"):
        SNLPForward(model, (idx,), SNLPConfig(init="warm"))
    with pytest.raises(SNLPConfigError, match="deferred_kv"):
        SNLPForward(model, (idx,), deferred_kv=True)


def test_training_a_partial_tail_at_k2_with_sequential_ce_and_distillation(tmp_path) -> None:
    """The frontier's sft-tail variants at toy scale: objective="snlp-forward" through the K=2 h0
    solve of the last 3 of 4 layers (the first sequential), + sequential CE + KL to the starting
    model. The loss is the three terms, the held-out SNLP loss is the transformed model's at that
    config, and a few seeded steps lower its K=2 cross-entropy. (Gradients of a partial tail reach
    the prefix and the parallel layers: ``test_gradients_reach_the_models_own_parameters``.)"""
    corpus = load_corpus(max_bytes=120_000)
    base = build_model("nanochat-tiny", n_layer=4, sequence_len=32, zero_init_out=False)
    ckpt = save_checkpoint(tmp_path / "base.safetensors", base, "nanochat-tiny", tokenizer=corpus.tokenizer)
    tail = SNLPConfig(iterations=2, parallel_layers=3)
    cfg = TrainConfig(
        objective="snlp-forward",
        snlp=tail,
        init_from=ckpt,
        seq_ce_weight=1.0,
        distill_weight=1.0,
        steps=10,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_windows=8,
        progress=False,
    )
    held = eval_windows(corpus.val, 32, 8)
    x, y = held[:, :-1], held[:, 1:]

    def tail_ce(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(_ce(transform(model, (x,), tail)(x), y))

    result = train(cfg, corpus, log_every=5)
    first = result.history[0]
    assert first["kl"] > 1e-4  # K=2 over 3 layers is not exact: the solve starts off the teacher
    for row in result.history:
        assert row["loss"] == pytest.approx(row["snlp_ce"] + row["ce"] + row["kl"], rel=1e-5)
    before, after = tail_ce(base), tail_ce(result.model)
    print(f"last 3 of 4 layers at K=2: held-out cross-entropy {before:.3f} -> {after:.3f}")
    assert after < before - 0.1, (before, after)
    assert result.val["snlp_ce"] == pytest.approx(after, rel=1e-4)
