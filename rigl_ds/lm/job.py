"""The ``"job"`` block of ``launch/train_lm.py``'s DeepSpeed config: what to train, on what, for how long.

It sits beside the ``"rigl"`` block in the same JSON (DeepSpeed ignores both). Keys are validated at
start-up like the ``"rigl"`` block: every error names ``job.<key>``, the bad value and what is allowed.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .models import FAMILIES


class JobConfigError(ValueError):
    """A ``"job"`` block that cannot be run; the message names every bad key."""


class JobConfig(BaseModel):
    """One language-model training run. Defaults: the paper's char-GRU narrowed for a 2-core CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = "char_gru"  # one of FAMILIES, or a local Hugging Face model directory
    model: Dict[str, Any] = Field(default_factory=dict)  # size overrides passed to build_model
    data: Optional[List[str]] = None  # local text files, one document per line; default: bundled KJV
    validation_fraction: float = Field(default=0.05, gt=0.0, lt=1.0)
    tokenizer: Literal["auto", "bpe", "char"] = "auto"  # auto: char for char_gru, BPE otherwise
    vocab_size: int = Field(default=4096, ge=260)
    seq_len: int = Field(default=64, ge=2)
    steps: int = Field(default=600, ge=1)  # optimizer steps
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # ignored when the DeepSpeed config has "optimizer"
    lr: float = Field(default=3e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # sgd only
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # ignored with a DeepSpeed "scheduler"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    log_every: int = Field(default=20, ge=1)
    eval_every: int = Field(default=200, ge=0)  # 0: only at the end
    eval_blocks: int = Field(default=400, ge=1)  # validation blocks per evaluation (all ranks together)
    save_every: int = Field(default=0, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(default=2, ge=1)
    out_dir: str = "runs/train_lm"
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _family_known(self) -> "JobConfig":
        from pathlib import Path

        if self.family not in FAMILIES and not (Path(self.family) / "config.json").is_file():
            raise ValueError(
                f"job.family: {self.family!r} is neither one of {', '.join(FAMILIES)} "
                "nor a local model directory holding config.json"
            )
        return self

    @property
    def tokenizer_kind(self) -> str:
        if self.tokenizer != "auto":
            return self.tokenizer
        return "char" if self.family == "char_gru" else "bpe"


def load_job(block: Optional[Mapping[str, Any]], overrides: Sequence[str] = ()) -> JobConfig:
    """The validated ``"job"`` block with ``KEY=VALUE`` overrides applied (VALUE parsed as JSON
    where it parses, else taken as a string)."""
    if block is not None and not isinstance(block, Mapping):
        raise JobConfigError(f"job: must be a JSON object, got {type(block).__name__}")
    merged: Dict[str, Any] = dict(block or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobConfigError(f"--job expects KEY=VALUE, got {item!r}")
        try:
            merged[key] = json.loads(value)
        except json.JSONDecodeError:
            merged[key] = value
    try:
        return JobConfig.model_validate(merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; allowed: {', '.join(JobConfig.model_fields)}"
            where = f"job.{key}: " if key else ""
            lines.append(f"{where}{msg} (got {err.get('input')!r})" if key else msg)
        raise JobConfigError("\n".join(lines)) from None
