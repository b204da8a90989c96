"""Language models rigl_ds trains: Hugging Face causal LMs built from config (or loaded from a
local directory) and the RNN LMs of the RigL paper, behind one loss function.

Which weights are sparse comes from rigl_ds's default (block projections and RNN gate matrices;
embeddings and the LM head stay dense); ``MASK_GROUPS`` gives each family's optional split of
fused weights into mask groups for the ``"mask_groups"`` config key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..host_memory import freed_buffers_return_to_the_os

FAMILIES = ("gpt2", "llama", "char_gru", "word_lstm")

#: Fused weights split into per-gate / per-projection mask groups (opt-in via "mask_groups").
MASK_GROUPS: Dict[str, Dict[str, Dict[str, int]]] = {
    "gpt2": {"*.attn.c_attn": {"axis": 1, "blocks": 3}},  # Conv1D (in, 3 * d): Q | K | V
    "llama": {},  # q/k/v/gate/up are separate Linear layers already
    "char_gru": {"rnn.weight_*": {"axis": 0, "blocks": 3}},  # r | z | n gates
    "word_lstm": {"rnn.weight_*": {"axis": 0, "blocks": 4}},  # i | f | g | o gates
}


class CharGRU(nn.Module):
    """The RigL paper's character-level LM: embedding 128, GRU 512, readout 256 then 128."""

    def __init__(self, vocab_size: int, embed: int = 128, hidden: int = 512, readout: Tuple[int, ...] = (256, 128)):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        layers, width = [], hidden
        for r in readout:
            layers += [nn.Linear(width, r), nn.ReLU()]
            width = r
        self.readout = nn.Sequential(*layers)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(input_ids))
        return self.head(self.readout(h))


class WordLSTM(nn.Module):
    """A word-level (or BPE-level) LSTM LM in the style of Zaremba et al., head tied to the embedding."""

    def __init__(self, vocab_size: int, hidden: int = 256, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.rnn = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.drop(self.embed(input_ids)))
        return self.head(self.drop(h))


def build_model(
    family: str, vocab_size: int, zero3_config: Optional[Mapping[str, Any]] = None, **sizes: Any
) -> nn.Module:
    """A model of ``family`` built from config (no download), or loaded from a local directory when
    ``family`` is a path holding a Hugging Face ``config.json``. ``sizes`` override the defaults.
    Token id 0 is the end-of-text token of rigl_ds's tokenizers (``data.EOS``).

    With ``zero3_config`` (a DeepSpeed config dict with ZeRO stage 3; ``torch.distributed`` up), the
    model is built under ``deepspeed.zero.Init``: each module's parameters are partitioned over the
    ranks as soon as that module is built, so no rank ever holds the whole model, only one module
    at a time. Hugging Face models take transformers' own ZeRO-3 path (``_from_config`` or
    ``from_pretrained`` while an ``HfDeepSpeedConfig`` lives), which initialises or loads the
    weights one module (with its direct children) at a time, gathered."""
    if zero3_config is None:
        return _build(family, vocab_size, sizes)
    import deepspeed
    import torch._dynamo  # noqa: F401  (before zero.Init patches Tensor.__new__; see docs/deepspeed-notes)
    from transformers.integrations import HfDeepSpeedConfig

    config = dict(zero3_config)
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage != 3:
        raise ValueError(f"build_model: zero3_config must have zero_optimization.stage 3, got {stage!r}")
    on_cpu = deepspeed.get_accelerator().device_name() == "cpu"
    with freed_buffers_return_to_the_os(on_cpu):
        if _is_hf(family):
            hf_ds = HfDeepSpeedConfig(config)  # while it lives, transformers builds under deepspeed.zero.Init
            try:
                model = _build(family, vocab_size, sizes)
            finally:
                del hf_ds
        else:
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = _build(family, vocab_size, sizes)
    whole = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if whole:
        raise RuntimeError(f"build_model: built under zero.Init, yet {len(whole)} parameters are whole: {whole[:4]}")
    return model




def _is_hf(family: str) -> bool:
    return family in ("gpt2", "llama") or Path(family).is_dir()


def _build(family: str, vocab_size: int, sizes: Dict[str, Any]) -> nn.Module:
    # Hugging Face models through ``_from_config`` (what ``AutoModelForCausalLM.from_config`` calls),
    # as the constructor alone would not enter transformers' ZeRO-3 path; without ZeRO-3 the two
    # build the same weights from the same seed.
    if Path(family).is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(family, local_files_only=True)
    if family == "char_gru":
        return CharGRU(vocab_size, **sizes)
    if family == "word_lstm":
        return WordLSTM(vocab_size, **sizes)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = dict(n_layer=4, n_embd=256, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)
        cfg.update(sizes)
        return GPT2LMHeadModel._from_config(GPT2Config(vocab_size=vocab_size, **cfg))
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        )
        cfg.update(sizes)
        return LlamaForCausalLM._from_config(LlamaConfig(vocab_size=vocab_size, **cfg))
    raise ValueError(f"model family {family!r} is unknown; allowed: {', '.join(FAMILIES)}, or a local model directory")


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a batch of blocks, for any family."""
    out = model(input_ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
