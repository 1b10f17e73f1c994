"""SNLP-aware training: the regulariser, real-text data, a training loop, evaluation, checkpoints.

from snlp_compile.train import RegulariserConfig, SNLPRegulariser
reg = SNLPRegulariser(model, (idx,), RegulariserConfig(weight=1.0))
out = reg(idx)                                   # model output + K=1 SNLP trace error
loss = cross_entropy(out.output, y) + reg.config.weight_at(step) * out.loss
"""

from .checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from .data import ByteTokenizer, Corpus, load_corpus
from .evaluate import SolveSetting, evaluate_model, markdown_table, perplexity, plot_ppl_vs_k
from .loop import TrainConfig, TrainResult, train
from .regulariser import RegulariserConfig, RegulariserOutput, SNLPRegulariser

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "RegulariserConfig",
    "RegulariserOutput",
    "SNLPRegulariser",
    "SolveSetting",
    "TrainConfig",
    "TrainResult",
    "evaluate_model",
    "load_checkpoint",
    "load_corpus",
    "markdown_table",
    "perplexity",
    "plot_ppl_vs_k",
    "read_checkpoint_info",
    "save_checkpoint",
    "train",
]
