"""Language-model data with no hub: local text through ``datasets``, tokenizers trained here.

The bundled corpus is the King James Bible (``rigl_ds/corpus``), one verse per line. Any other
local text files work the same way. Validation is the contiguous tail of the corpus, so no
document leaks across the split. Tokenizers are trained on the training split only, with the
``tokenizers`` library (byte-level BPE, or characters for the paper's char-GRU), and cached.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import datasets
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..corpus import verified_kjv_path
from .models import lm_loss

PathLike = Union[str, Path]
EOS = "<|endoftext|>"


def load_text(
    files: Optional[Union[PathLike, Sequence[PathLike]]] = None,
    validation_fraction: float = 0.05,
    cache_dir: Optional[PathLike] = None,
) -> datasets.DatasetDict:
    """Train/validation splits of local text files (plain or compressed), one document per line.
    Defaults to the bundled KJV text."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if files is None:
        files = [verified_kjv_path()]
    elif isinstance(files, (str, Path)):
        files = [files]
    paths = [str(Path(f)) for f in files]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"text files not found: {missing}")
    ds = datasets.load_dataset("text", data_files={"train": paths}, cache_dir=str(cache_dir) if cache_dir else None)
    lines = ds["train"].filter(lambda row: bool(row["text"].strip()))
    cut = int(len(lines) * (1.0 - validation_fraction))
    if cut == 0 or cut == len(lines):
        raise ValueError(f"{len(lines)} non-empty lines are too few for a {validation_fraction} validation split")
    return datasets.DatasetDict(train=lines.select(range(cut)), validation=lines.select(range(cut, len(lines))))


def _fingerprint(split: datasets.Dataset, **params: object) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update(split._fingerprint.encode())
    return h.hexdigest()[:16]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=None)


def train_tokenizer(
    train: datasets.Dataset, kind: str = "bpe", vocab_size: int = 8192, save_dir: Optional[PathLike] = None
) -> PreTrainedTokenizerFast:
    """A tokenizer trained on ``train["text"]``: ``"bpe"`` (byte-level, GPT-2 style) or ``"char"``.
    With ``save_dir`` it is cached there and reused while the split and settings are unchanged."""
    if kind not in ("bpe", "char"):
        raise ValueError(f"tokenizer kind {kind!r} is unknown; allowed: bpe, char")
    key = _fingerprint(train, kind=kind, vocab_size=vocab_size if kind == "bpe" else None)
    path = Path(save_dir) / f"tokenizer-{kind}-{key}.json" if save_dir else None
    if path is not None and path.is_file():
        return _wrap(Tokenizer.from_file(str(path)))

    def texts():
        for i in range(0, len(train), 1000):
            yield [t + "\n" for t in train[i : i + 1000]["text"]]

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts(), trainer=trainer, length=len(train))
    else:
        chars = sorted({c for batch in texts() for line in batch for c in line})
        vocab = {EOS: 0, **{c: i + 1 for i, c in enumerate(chars)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return _wrap(tok)


def lm_blocks(split: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> datasets.Dataset:
    """Documents joined by newlines, tokenised, and cut into ``seq_len``-token blocks, with the
    characters each block covers, for bits per character. As in Hugging Face's run_clm, blocks are
    cut per map batch of 2000 documents and each batch's partial last block is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")

    def tokenize(batch: Dict[str, list]) -> Dict[str, list]:
        texts = [t + "\n" for t in batch["text"]]
        return {"input_ids": tokenizer(texts)["input_ids"], "chars": [len(t) for t in texts]}

    def group(batch: Dict[str, list]) -> Dict[str, list]:
        ids = [i for row in batch["input_ids"] for i in row]
        chars_per_token = sum(batch["chars"]) / max(len(ids), 1)
        n = len(ids) // seq_len * seq_len
        blocks = [ids[i : i + seq_len] for i in range(0, n, seq_len)]
        return {"input_ids": blocks, "chars": [seq_len * chars_per_token] * len(blocks)}

    tokens = split.map(tokenize, batched=True, remove_columns=split.column_names, desc="tokenising")
    return tokens.map(group, batched=True, batch_size=2000, desc=f"blocks of {seq_len}").with_format("torch")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, blocks: datasets.Dataset, batch_size: int = 16, max_blocks: Optional[int] = None
) -> Dict[str, float]:
    """Validation loss (nats per predicted token), perplexity and bits per character."""
    was_training = model.training
    model.eval()
    n = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
    nll, tokens, chars = 0.0, 0, 0.0
    device = next(model.parameters()).device
    for i in range(0, n, batch_size):
        batch = blocks[i : min(i + batch_size, n)]
        ids = batch["input_ids"].to(device)
        nll += lm_loss(model, ids).item() * ids[:, 1:].numel()
        tokens += ids[:, 1:].numel()
        chars += float(batch["chars"].sum()) * (ids.shape[1] - 1) / ids.shape[1]
    model.train(was_training)
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": nll / math.log(2) / chars, "tokens": tokens}
