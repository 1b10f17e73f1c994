"""Issue 24, "What must be shown" 2: fine-tune and evaluate a `transformers` model from its local
folder. A tiny LlamaForCausalLM (saved with ``save_pretrained``) is fine-tuned with the SNLP
regulariser from its saved weights through ``snlp-compile train --model FOLDER``: its K=1 gap
falls, the checkpoint reloads into ``LlamaForCausalLM.from_pretrained``, and ``snlp-compile eval
FOLDER`` prints the perplexity table. Plus: ``evaluate_model`` on a `transformers` Llama (its
DynamicCache) against the sequential model, the folder's own tokenizer, and the refusals.
"""

from __future__ import annotations

import random
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from snlp_compile.cli import main
from snlp_compile.config import SNLPConfig
from snlp_compile.errors import SNLPConfigError, SNLPUsageError
from snlp_compile.models import build_model
from snlp_compile.train import (
    SolveSetting,
    evaluate_model,
    load_checkpoint,
    load_corpus,
    save_checkpoint,
    train,
)
from snlp_compile.train.data import eval_windows
from snlp_compile.train.hf_folder import folder_tokenizer, read_record
from snlp_compile.train.model_source import resolve_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SEQ = 32
TXT = {"suffix": ".txt", "val_fraction": 0.25}
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "then",
    "it",
    "ran",
    "to",
    "the",
    "red",
    "house",
    "where",
    "two",
    "dogs",
    "sleep",
    "all",
    "day",
]


def _llama_config(vocab: int = 256, **kw: object) -> object:
    # initializer_range 0.2: layers big enough that K=1 is visibly off the sequential model
    base = dict(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    return transformers.LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text folder and a Llama folder whose weights saw that text for a few steps (an "existing
    model": fine-tuning starts from trained, not random, weights)."""
    root = tmp_path_factory.mktemp("hf_finetune")
    text = root / "text"
    text.mkdir()
    rng = random.Random(0)
    for i in range(24):  # 3 files held out at the default val_fraction (0.05), 8 at 0.25
        (text / f"f{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(200)))
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(_llama_config())
    corpus = load_corpus([text], **TXT)
    train(llama, corpus, steps=40, batch_size=4, seq_len=SEQ, warmup_steps=2, progress=False, eval_windows=4)
    llama.save_pretrained(root / "base")
    return root


def _k1_gap(folder: Path, text: Path) -> tuple[float, list[dict[str, object]]]:
    """|ce(K=1) - ce(sequential)| of the folder's model on the held-out text, as evaluate_model measures it."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    corpus = load_corpus([text], **TXT)
    windows = eval_windows(corpus.val, SEQ, 8)
    rows = evaluate_model(
        model,
        windows,
        [SolveSetting(1), SolveSetting(4)],
        batch_size=4,
        device="cpu",
        bytes_per_token=1.0,
        label="llama",
    )
    return abs(float(rows[1]["ce"]) - float(rows[0]["ce"])), rows  # type: ignore[arg-type]


def test_regulariser_fine_tune_of_a_transformers_folder_lowers_the_k1_gap(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, base, out = workdir / "text", workdir / "base", workdir / "tuned"
    before, rows = _k1_gap(base, text)
    # the evaluator on a transformers Llama (DynamicCache) agrees with the sequential model ...
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    windows = eval_windows(load_corpus([text], **TXT).val, SEQ, 8)
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1)).item()
    assert rows[0]["ce"] == pytest.approx(ce, rel=1e-5)
    # ... and K = 4 (every layer) is exact
    assert rows[2]["K"] == 4 and rows[2]["ce"] == pytest.approx(ce, rel=1e-4)
    assert before > 0.5  # K=1 is visibly off on this model: there is a gap to lower

    args = ["train", "--model", str(base), "--objective", "regulariser", "--reg-weight", "2.0"]
    args += ["--data", str(text), "--suffix", ".txt", "--val-fraction", "0.25", "--steps", "15"]
    args += ["--batch-size", "4", "--seq-len", str(SEQ), "--lr", "1e-3", "--warmup", "2"]
    args += ["--eval-windows", "4", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert f"wrote checkpoint: {out}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "snlp_compile.json"} <= {p.name for p in out.iterdir()}

    tuned = transformers.LlamaForCausalLM.from_pretrained(out)  # the model's own class loads it
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    after, _ = _k1_gap(out, text)
    assert after < 0.85 * before, (before, after)  # measured: 2.06 -> 1.54 nats

    assert (
        main(["eval", str(out), "-K", "1", "2", "--parallel", "all", "--windows", "8", "--batch-size", "4"])
        == 0
    )
    table = capsys.readouterr().out
    assert "| model | setting | K | parallel layers | init | ppl | bits/byte | vs own sequential |" in table
    assert "| tuned | sequential | - | - | - |" in table
    assert "| tuned | snlp | 1 | 4/4 | h0 |" in table and "| tuned | snlp | 2 | 4/4 | h0 |" in table


def test_the_folders_own_tokenizer_reads_the_text_and_travels_with_the_checkpoint(
    workdir: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    folder = tmp_path / "llama-bpe"
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(_llama_config(vocab=tok.get_vocab_size())).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))

    result = train(
        str(folder),
        workdir / "text",
        data_options=TXT,
        steps=2,
        batch_size=2,
        seq_len=16,
        warmup_steps=0,
        progress=False,
        eval_windows=2,
    )
    assert result.source is not None and result.source.tokenizer is not None
    assert result.source.tokenizer.name == "the model's own (tokenizer.json)"
    result.save(tmp_path / "out")
    assert read_record(tmp_path / "out")["tokenizer"] == {"kind": "folder"}
    sample = b"the red house"
    saved = folder_tokenizer(tmp_path / "out")
    assert saved is not None and saved.encode(sample).tolist() == tok.encode(sample.decode()).ids
    transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")


def test_refusals_are_one_line(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = workdir / "text"
    # no tokenizer in the folder: bytes, which a 128-token vocabulary cannot embed
    small = tmp_path / "small"
    transformers.LlamaForCausalLM(_llama_config(vocab=128)).save_pretrained(small)
    with pytest.raises(SNLPConfigError, match=r"vocab_size=128 is smaller than the tokenizer's 256.*bytes"):
        train(str(small), text, data_options=TXT, steps=1, progress=False)
    assert main(["eval", str(small), "--data", str(text), "--suffix", ".txt", "--val-fraction", "0.25"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: transformers' loading bar)
    assert last.startswith("snlp-compile eval: error: SNLPConfigError:") and "vocab_size=128" in last

    # pickled weights only: refused, nothing unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((small / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(SNLPConfigError, match="safetensors only"):
        train(str(pickled), text, data_options=TXT, steps=1, progress=False)

    # a folder that is neither a transformers folder nor a checkpoint
    stray = tmp_path / "stray"
    stray.mkdir()
    assert main(["train", "--model", str(stray), "--data", str(text), "--out", str(tmp_path / "x")]) == 1
    assert "not a transformers folder" in capsys.readouterr().err
    with pytest.raises(SNLPConfigError, match="no such file or folder"):
        resolve_model(tmp_path / "missing")

    # a context shorter than the training windows
    with pytest.raises(ValueError, match="seq_len=256 exceeds the model's context 128"):
        train(str(workdir / "base"), text, data_options=TXT, steps=1, seq_len=256, progress=False)

    # config and TrainConfig fields at once; a module nothing can rebuild
    from snlp_compile.train import TrainConfig

    with pytest.raises(SNLPUsageError, match="not both"):
        train(str(workdir / "base"), text, TrainConfig(steps=1, warmup_steps=0), steps=2)
    with pytest.raises(SNLPUsageError, match="cannot rebuild"):
        save_checkpoint(tmp_path / "m", torch.nn.Linear(2, 2), "linear")


def test_snlp_forward_fine_tune_of_a_transformers_folder(workdir: Path, tmp_path: Path) -> None:
    """The SNLP-forward objective on a transformers model: its K=1 cross-entropy falls over a few
    seeded steps, and the result is a save_pretrained folder again."""
    result = train(
        str(workdir / "base"),
        workdir / "text",
        data_options=TXT,
        objective="snlp-forward",
        snlp=SNLPConfig(iterations=1),
        steps=8,
        batch_size=4,
        seq_len=SEQ,
        lr=1e-3,
        warmup_steps=1,
        progress=False,
        eval_windows=4,
    )
    first, last = result.history[0]["snlp_ce"], result.history[-1]["snlp_ce"]
    assert last < first, (first, last)
    assert "snlp_ppl" in result.val
    result.save(tmp_path / "sft")
    transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sft")


def test_a_factory_model_round_trips(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'module:factory': trained as given, saved with the factory's name, rebuilt by calling it."""
    (tmp_path / "byom_factory.py").write_text(
        "from snlp_compile.models import build_model\n\n\ndef tiny():\n    return build_model('gpt-tiny', seed=3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = train("byom_factory:tiny", workdir / "text", data_options=TXT, steps=2, batch_size=2, seq_len=16)
    path = result.save(tmp_path / "tiny.safetensors")
    loaded = load_checkpoint(path)
    for (name, want), got in zip(result.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(want, got), name
    fresh = build_model("gpt-tiny", seed=3)  # what the factory alone gives: training moved the weights
    assert not torch.equal(fresh.lm_head.weight, loaded.lm_head.weight)


def test_the_readme_section_runs(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands and code of the README's "Fine-tune and evaluate your own model", as written
    (2 steps instead of 200), on a tiny Llama folder and a text folder named as there."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Fine-tune and evaluate your own model\n")[1].split("\n## ")[0]
    (bash,) = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    (python,) = re.findall(r"```python\n(.*?)\n```", section, flags=re.S)
    shutil.copytree(workdir / "base", tmp_path / "my-llama")
    shutil.copytree(workdir / "text", tmp_path / "notes")
    monkeypatch.chdir(tmp_path)
    for line in bash.splitlines():
        argv = shlex.split(line.replace("--steps 200", "--steps 2"))
        assert argv[0] == "snlp-compile", line
        assert main(argv[1:]) == 0, line
    assert (tmp_path / "my-llama-reg" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "my-llama-reg")
    namespace: dict[str, object] = {}
    exec(python.replace("steps=200", "steps=2"), namespace)
    assert isinstance(namespace["tuned"], transformers.LlamaForCausalLM)


def test_a_config_alone_and_init_from_a_folder(workdir: Path, tmp_path: Path) -> None:
    """config.json alone: the architecture with seeded random weights (not the folder's); the
    folder given as --init-from: the same as --model FOLDER."""
    base = workdir / "base"
    weights = transformers.LlamaForCausalLM.from_pretrained(base).model.layers[0].mlp.up_proj.weight
    fresh = resolve_model(base / "config.json", seed=5).model
    again = resolve_model(base / "config.json", seed=5).model
    assert isinstance(fresh, transformers.LlamaForCausalLM)
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.weight, again.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, weights)

    args = ["train", "--init-from", str(base), "--data", str(workdir / "text"), "--suffix", ".txt"]
    args += ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    record = read_record(tmp_path / "out")
    assert record is not None and record["source"] == str(base) and record["tokenizer"] == {"kind": "bytes"}


def test_inspect_takes_a_transformers_folder(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The other commands' --model takes the folder too (as token ids -> logits, its cache off)."""
    assert main(["inspect", "--model", str(workdir / "base"), "--no-picture", "--seq", "16"]) == 0
    assert "parallel:  4 layers (model.model.layers.0 .. model.model.layers.3)" in capsys.readouterr().out
