"""SNLP-aware training: the regulariser, SNLP-forward fine-tuning, real-text data, a training
loop, evaluation, checkpoints.

from snlp_compile.train import RegulariserConfig, SNLPRegulariser
reg = SNLPRegulariser(model, (idx,), RegulariserConfig())   # the paper's recipe
out = reg(idx)                                   # model output + K=1 SNLP trace error
loss = cross_entropy(out.output, y) + reg.config.weight_at(step) * out.loss

from snlp_compile.train import SNLPForward
snlp = SNLPForward(model, (idx,), SNLPConfig(parallel_layers=8, iterations=2))
loss = cross_entropy(snlp(idx), y)               # through the solve, grads on model's parameters

res = train(TrainConfig(objective="snlp-forward", snlp=SNLPConfig(...), init_from="base.safetensors"), corpus)

res = train("./my-llama", "notes/", objective="regulariser", steps=200)   # a local transformers folder
res.save("./my-llama-reg")                      # save_pretrained: LlamaForCausalLM.from_pretrained loads it
"""

from .checkpoint import (
    checkpoint_tokenizer,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from .data import BPETokenizer, ByteTokenizer, Corpus, Tokenizer, load_corpus, tokenizer_from_json
from .evaluate import SolveSetting, UnfitSetting, evaluate_model, markdown_table, perplexity, plot_ppl_vs_k
from .loop import OBJECTIVES, TrainConfig, TrainResult, train
from .regulariser import RegulariserConfig, RegulariserOutput, SNLPRegulariser
from .snlp_forward import SNLPForward

__all__ = [
    "OBJECTIVES",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "RegulariserConfig",
    "RegulariserOutput",
    "SNLPForward",
    "SNLPRegulariser",
    "SolveSetting",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "UnfitSetting",
    "checkpoint_tokenizer",
    "evaluate_model",
    "load_checkpoint",
    "load_corpus",
    "markdown_table",
    "perplexity",
    "plot_ppl_vs_k",
    "read_checkpoint_info",
    "save_checkpoint",
    "tokenizer_from_json",
    "train",
]
