"""Language-model training pieces (data, tokenizers, models). Imports transformers and datasets,
so the core package does not import this module."""

from .data import evaluate, lm_blocks, load_text, train_tokenizer
from .models import FAMILIES, MASK_GROUPS, CharGRU, WordLSTM, build_model, lm_loss

__all__ = [
    "evaluate",
    "lm_blocks",
    "load_text",
    "train_tokenizer",
    "FAMILIES",
    "MASK_GROUPS",
    "CharGRU",
    "WordLSTM",
    "build_model",
    "lm_loss",
]
