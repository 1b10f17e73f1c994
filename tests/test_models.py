"""Reference models: registry, shapes, determinism, nanochat specifics, and export capture."""

from __future__ import annotations

import re

import pytest
import torch

from snlp_compile.models import (
    DEFAULT_MODEL,
    GPT,
    MODEL_NAMES,
    GPTConfig,
    NanochatConfig,
    NanochatGPT,
    build_model,
    config_of,
    model_config,
)

SMALL = (
    "gpt-tiny",
    "gpt-small",
    "nanochat-tiny",
    "nanochat-small",
    "mhc-tiny",
    "mhc-dyn-tiny",
    "mhc-small",
    "mhc-dyn-small",
)
BIG = ("nanochat-d20", "nanochat-0.5b", "gpt-0.5b", "mhc-d20", "mhc-0.5b", "mhc-dyn-d20", "mhc-dyn-0.5b")
TINY = ("gpt-tiny", "nanochat-tiny")


def _idx(model: torch.nn.Module, batch: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, t), generator=g)


def test_names() -> None:
    assert set(MODEL_NAMES) == set(SMALL) | set(BIG)
    assert DEFAULT_MODEL == "nanochat-small"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_name_builds(name: str) -> None:
    device = "meta" if name in BIG else "cpu"
    model = build_model(name, device=device)
    assert not model.training
    assert isinstance(model, GPT if name.startswith("gpt") else NanochatGPT)
    assert len(model.transformer.h) == model.config.n_layer
    assert all(p.device.type == device for p in model.parameters())


def test_big_shapes() -> None:
    d20 = model_config("nanochat-d20")
    assert (d20.n_layer, d20.n_embd, d20.n_embd // d20.n_head, d20.vocab_size) == (20, 1280, 128, 65536)
    half = model_config("nanochat-0.5b")
    assert (half.n_layer, half.n_embd, half.n_embd // half.n_head) == (32, 640, 64)
    gpt = model_config("gpt-0.5b")
    assert (gpt.n_layer, gpt.n_embd, gpt.n_head, gpt.block_size) == (32, 640, 10, 2048)


def test_nanochat_d20_param_count() -> None:
    model = build_model("nanochat-d20", device="meta")
    d, L, V = 1280, 20, 65536
    trunk = sum(p.numel() for p in model.transformer.h.parameters())
    # per layer: q, k, v, proj (d x d each, no GQA here) + MLP 2 x (d x 4d)
    assert trunk == L * 12 * d * d == 393_216_000
    total = sum(p.numel() for p in model.parameters())
    assert total == trunk + 2 * V * d + 2 * L  # untied wte + lm_head, two lambda vectors
    assert 5.5e8 < total < 5.7e8


def test_gpt_head_is_tied() -> None:
    model = build_model("gpt-tiny")
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("name", SMALL)
def test_forward_shapes(name: str) -> None:
    model = build_model(name)
    idx = _idx(model, batch=2, t=16)
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (2, 16, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 1e-2  # non-trivial at random init


@pytest.mark.parametrize("name", TINY)
def test_seed_determinism(name: str) -> None:
    state = torch.random.get_rng_state()
    a, b, c = build_model(name, seed=0), build_model(name, seed=0), build_model(name, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    idx = _idx(a)
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))


def test_dtype_override() -> None:
    model = build_model("nanochat-tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert model(_idx(model)).dtype == torch.bfloat16


def test_nanochat_branches_nontrivial() -> None:
    """Each block must change the stream visibly (c_proj is not zero-initialised)."""
    model = build_model("nanochat-tiny")
    x = torch.randn(1, 8, model.config.n_embd)
    cos, sin = model.cos[:, :8], model.sin[:, :8]
    with torch.no_grad():
        for block in model.transformer.h:
            rel = (block(x, cos, sin) - x).norm() / x.norm()
            assert 0.05 < rel < 2.0


def test_nanochat_softcap_bounds_logits() -> None:
    model = build_model("nanochat-tiny", softcap=2.0)
    with torch.no_grad():
        logits = model(_idx(model))
    assert logits.abs().max() <= 2.0
    assert logits.abs().max() > 1.0  # the cap is actually reached for


def test_nanochat_backout_changes_output() -> None:
    on = build_model("nanochat-small", backout=True)
    off = build_model("nanochat-small", backout=False)
    assert hasattr(on, "backout_lambda") and not hasattr(off, "backout_lambda")
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert missing == [] and unexpected == ["backout_lambda"]
    idx = _idx(on)
    with torch.no_grad():
        assert not torch.allclose(on(idx), off(idx), atol=1e-4)
        on.backout_lambda.zero_()
        torch.testing.assert_close(on(idx), off(idx))


def test_nanochat_rotary_buffers_not_persistent() -> None:
    model = build_model("nanochat-tiny")
    assert "cos" not in model.state_dict() and "sin" not in model.state_dict()
    assert model.cos.shape == (
        1,
        model.config.sequence_len,
        1,
        model.config.n_embd // model.config.n_head // 2,
    )


def test_overrides_and_errors() -> None:
    cfg = model_config("gpt-tiny", n_layer=2)
    assert isinstance(cfg, GPTConfig) and cfg.n_layer == 2
    assert model_config("gpt-tiny").n_layer == 4  # the registry entry is not mutated
    assert isinstance(model_config("nanochat-tiny"), NanochatConfig)
    assert len(build_model("nanochat-tiny", n_layer=3).transformer.h) == 3
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*gpt-tiny.*nanochat-small"):
        build_model("nope")
    with pytest.raises(ValueError, match=r"'n_kv_head'.*vocab_size.*n_layer"):
        build_model("gpt-tiny", n_kv_head=2)
    with pytest.raises(ValueError, match="unknown model"):
        model_config("GPT-TINY")


def test_config_of() -> None:
    """The typed ``model.config`` of a built reference model; anything else is refused by name."""
    model = build_model("mhc-tiny", n_layer=2, device="meta")
    assert config_of(model) is model.config and config_of(model).n_layer == 2
    with pytest.raises(TypeError, match=r"Linear has no GPTConfig/NanochatConfig \.config \(got NoneType\)"):
        config_of(torch.nn.Linear(2, 2))


_BLOCK_PATH = re.compile(r"^transformer\.h\.(\d+)(\.|$)")


@pytest.fixture(scope="module", params=TINY)
def exported(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, torch.export.ExportedProgram]:
    model = build_model(request.param)
    ep = torch.export.export(model, (_idx(model, batch=1, t=16),), strict=False)
    return model, ep


def test_export_matches_eager(exported: tuple[torch.nn.Module, torch.export.ExportedProgram]) -> None:
    model, ep = exported
    idx = _idx(model, batch=1, t=16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(idx), model(idx))


def test_export_block_nodes_carry_layer_index(
    exported: tuple[torch.nn.Module, torch.export.ExportedProgram],
) -> None:
    """Every node inside a block names its layer in nn_module_stack; every use of a layer's
    parameters sits inside that layer. The compiler's layer discovery rests on this."""
    model, ep = exported
    sig = ep.graph_signature
    param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    seen: set[int] = set()
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        layers = {int(m.group(1)) for path, _ in stack.values() if (m := _BLOCK_PATH.match(path))}
        assert len(layers) <= 1, f"{node} claims several layers: {stack}"
        seen |= layers
        for arg in node.all_input_nodes:
            target = param_of.get(arg.name, "")
            m = _BLOCK_PATH.match(target)
            if m:
                assert layers == {int(m.group(1))}, f"{node} uses {target} but has stack {stack}"
    assert seen == set(range(model.config.n_layer))
