"""The ``"rigl"`` config block: one validated model whose field names are the JSON keys.

Validation happens once, at start-up; every error names the key, the bad value and what is
allowed, in the ``rigl.<key>: ...`` form so it reads like DeepSpeed's own config errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Mapping, Optional, Type, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from .methods import SparseMethod

DISTRIBUTIONS = ("uniform", "er", "erk", "global")
DROP_FRACTION_SCHEDULES = ("cosine", "constant", "linear")
GROW_INITS = ("zeros", "random_normal")
GROW_BIAS_CORRECTIONS = ("global", "per_entry")
#: Keys whose non-default value only the single-process path (``rigl_ds.sparsify``) implements
#: exactly today; the sharded (DeepSpeed) path refuses them at start-up, by name.
SINGLE_PROCESS_KEYS = ("grow_bias_correction", "grow_warmup_steps", "constant_fan_in", "n_m")


class RigLConfigError(ValueError):
    """A ``"rigl"`` block that cannot be trained with; the message names every bad key."""


def _registered_methods() -> Mapping[str, Type["SparseMethod"]]:
    # Imported when needed, not at module level: the methods import this module.
    from .methods import METHODS

    return METHODS


class MaskGroupSplit(BaseModel):
    """Split one weight into ``blocks`` equal mask groups along ``axis`` (fused Q/K/V, RNN gates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    axis: int = Field(ge=0)
    blocks: int = Field(ge=1)


class RigLConfig(BaseModel):
    """Settings of one sparse-training run. Defaults are the RigL paper's."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    method: str = "rigl"  # a name in rigl_ds.METHODS
    sparsity: float = 0.9
    distribution: Literal["uniform", "er", "erk", "global"] = "erk"
    erk_power_scale: float = Field(default=1.0, gt=0.0)
    dense_layers: List[str] = Field(default_factory=list)
    custom_sparsity: Dict[str, float] = Field(default_factory=dict)
    modules: Optional[List[str]] = None
    mask_groups: Dict[str, MaskGroupSplit] = Field(default_factory=dict)
    delta_t: int = Field(default=100, ge=1)
    alpha: float = Field(default=0.3, gt=0.0, le=1.0)
    begin_step: int = Field(default=0, ge=0)
    end_step: Optional[int] = Field(default=None, ge=0)
    end_fraction: float = Field(default=0.75, gt=0.0, le=1.0)
    drop_fraction_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    grow_init: Literal["zeros", "random_normal"] = "zeros"
    skip_optimizer_step_on_update: Optional[bool] = None
    grad_ema_decay: float = Field(default=0.9, ge=0.0, lt=1.0)
    initial_sparsity: float = 0.0
    seed: int = Field(default=0, ge=0)
    compact_optimizer_state: bool = False
    compact_master_weights: bool = False
    storage: Literal["masked", "packed"] = "masked"
    # RigL-plus options (docs/results.md, "RigL-plus"); each default is the paper's behaviour.
    grow_bias_correction: Literal["global", "per_entry"] = "global"
    grow_warmup_steps: int = Field(default=0, ge=0)
    constant_fan_in: bool = False
    n_m: Optional[List[int]] = None
    grow_candidate_fraction: float = Field(default=1.0, gt=0.0, le=1.0)

    @field_validator("method", mode="before")
    @classmethod
    def _registered_method(cls, value: Any) -> Any:
        methods = _registered_methods()
        if not isinstance(value, str) or value not in methods:
            raise ValueError(f"allowed values: {', '.join(methods)}")
        return value

    @field_validator("sparsity", "initial_sparsity")
    @classmethod
    def _fraction_below_one(cls, value: float) -> float:
        if not (0.0 <= value < 1.0) or math.isnan(value):
            raise ValueError("must be in [0, 1)")
        return value

    @field_validator("custom_sparsity")
    @classmethod
    def _custom_values(cls, value: Dict[str, float]) -> Dict[str, float]:
        bad = {k: v for k, v in value.items() if not (0.0 <= v < 1.0)}
        if bad:
            raise ValueError(f"sparsities must be in [0, 1); bad entries: {bad}")
        return value

    @field_validator("modules")
    @classmethod
    def _non_empty_patterns(cls, value: Optional[List[str]]) -> Optional[List[str]]:
        if value is not None and (not value or any(not p for p in value)):
            raise ValueError("must be a non-empty list of non-empty name patterns, or null for the default")
        return value

    @field_validator("n_m")
    @classmethod
    def _n_of_m(cls, value: Optional[List[int]]) -> Optional[List[int]]:
        if value is not None and (len(value) != 2 or not (1 <= value[0] < value[1])):
            raise ValueError("must be [N, M] with 1 <= N < M (N active in every M consecutive inputs), or null")
        return value

    def _check_plus_options(self) -> None:
        """The RigL-plus keys: what each needs from the rest of the block."""
        method = self.method_class
        for key in ("grow_bias_correction", "grow_warmup_steps"):
            if key in self.model_fields_set and getattr(self, key) != RigLConfig.model_fields[key].default:
                if not method.updates_masks:
                    raise ValueError(f"{key}: method {self.method!r} never grows entries; leave it at its default")
        if self.grow_bias_correction == "per_entry" and self.compact_optimizer_state:
            raise ValueError(
                "grow_bias_correction 'per_entry' reads dense Adam state; set compact_optimizer_state: false"
            )
        structured = self.constant_fan_in or self.n_m is not None
        plus = [k for k in SINGLE_PROCESS_KEYS if getattr(self, k) != RigLConfig.model_fields[k].default]
        if plus and getattr(self, "storage", "masked") != "masked":
            raise ValueError(f"{plus[0]}: implemented for storage 'masked' (the default) only")
        if structured and self.distribution == "global":
            raise ValueError(
                f"{'n_m' if self.n_m is not None else 'constant_fan_in'}: needs a per-layer distribution "
                "(erk, er, uniform), not 'global'"
            )
        if self.n_m is not None:
            n, m = self.n_m
            if abs(self.sparsity - (1.0 - n / m)) > 1e-9:
                raise ValueError(
                    f"n_m {self.n_m} fixes sparsity at 1 - {n}/{m} = {1 - n / m}; got sparsity {self.sparsity}"
                )
            if self.custom_sparsity:
                raise ValueError("n_m fixes every masked layer's sparsity; custom_sparsity cannot be combined with it")

    @model_validator(mode="after")
    def _consistent(self) -> "RigLConfig":
        method = self.method_class
        if self.end_step is not None and "end_fraction" in self.model_fields_set:
            raise ValueError("set either end_step or end_fraction, not both")
        if self.end_step is not None and self.end_step <= self.begin_step and method.updates_masks:
            raise ValueError(f"end_step ({self.end_step}) must be greater than begin_step ({self.begin_step})")
        both = set(self.dense_layers) & set(self.custom_sparsity)
        if both:
            raise ValueError(f"layers both in dense_layers and custom_sparsity: {sorted(both)}")
        method.check_config(self)
        self._check_plus_options()
        if self.compact_master_weights and not self.compact_optimizer_state:
            raise ValueError("compact_master_weights needs compact_optimizer_state: true")
        if self.storage == "packed":
            self._check_packed(method)
        for key in RigLConfig.model_fields:
            if key in self.model_fields_set and key not in method.own_keys:
                owners = [repr(name) for name, cls in _registered_methods().items() if key in cls.own_keys]
                if owners:
                    raise ValueError(f"{key} is a setting of method {' or '.join(owners)} only")
        return self

    def _check_packed(self, method: Type["SparseMethod"]) -> None:
        """Packed storage holds a fixed number of slots per layer and no state at masked entries."""
        if not method.keeps_counts:
            raise ValueError(
                f'storage: "packed" holds a fixed count per layer, and method {self.method!r} changes counts; '
                'use storage: "masked" (the default) with it'
            )
        if self.distribution == "global":
            raise ValueError(
                'storage: "packed" holds a fixed count per layer, and distribution "global" moves counts '
                'between layers at every update; use "erk", "er" or "uniform", or storage: "masked"'
            )
        if self.compact_optimizer_state or self.compact_master_weights:
            raise ValueError(
                'storage: "packed" already keeps optimizer state and master weights for active entries only; '
                "compact_optimizer_state and compact_master_weights are for storage: \"masked\" (leave them false)"
            )

    @property
    def method_class(self) -> Type["SparseMethod"]:
        """The registered class of ``method``."""
        return _registered_methods()[self.method]

    @property
    def skip_step_on_update(self) -> bool:
        """``skip_optimizer_step_on_update``, or the method's default when null (the reference skips the
        optimizer step on RigL update steps only; SET/SNFS/GMP step first)."""
        if self.skip_optimizer_step_on_update is None:
            return self.method_class.skip_optimizer_step_on_update
        return self.skip_optimizer_step_on_update

    def resolve_end_step(self, total_steps: Optional[int]) -> Optional[int]:
        """The last step at which masks may change; needs ``total_steps`` when only end_fraction is set."""
        if self.end_step is not None:
            return self.end_step
        if not self.method_class.updates_masks:
            return None
        if total_steps is None:
            raise RigLConfigError(
                "rigl.end_step: not set, and rigl.end_fraction needs the total number of training steps; "
                "pass total_steps or set rigl.end_step"
            )
        if total_steps <= 0:
            raise RigLConfigError(f"total_steps must be a positive number of optimizer steps, got {total_steps}")
        end = int(self.end_fraction * total_steps)
        if end <= self.begin_step:
            raise RigLConfigError(
                f"rigl.end_fraction: {self.end_fraction} of {total_steps} steps ends at step {end}, "
                f"not after rigl.begin_step ({self.begin_step})"
            )
        return end


ConfigLike = Union[RigLConfig, Mapping[str, Any], str, Path, None]


def _format_errors(err: ValidationError) -> str:
    allowed_keys = ", ".join(RigLConfig.model_fields)
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"rigl.{loc}" if loc else "rigl"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key; allowed keys: {allowed_keys}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error" and e["loc"][0] in (
            "distribution",
            "drop_fraction_schedule",
            "grow_init",
            "grow_bias_correction",
        ):
            allowed = {
                "distribution": DISTRIBUTIONS,
                "drop_fraction_schedule": DROP_FRACTION_SCHEDULES,
                "grow_init": GROW_INITS,
                "grow_bias_correction": GROW_BIAS_CORRECTIONS,
            }[e["loc"][0]]
            msg = f"allowed values: {', '.join(allowed)}"
        got = e.get("input")
        lines.append(f"{key}: {msg} (got {got!r})" if e["type"] != "missing" else f"{key}: {msg}")
    return 'invalid "rigl" config block:\n  ' + "\n  ".join(lines)


def load_config(config: ConfigLike = None) -> RigLConfig:
    """Accepts a RigLConfig, the ``"rigl"`` block as a dict, a whole DeepSpeed config dict
    (with a ``"rigl"`` key), or a path to a JSON file of either kind."""
    if isinstance(config, RigLConfig):
        return config
    if config is None:
        config = {}
    if isinstance(config, (str, Path)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RigLConfigError(f"cannot read rigl config from {config}: {exc}") from exc
    if not isinstance(config, Mapping):
        raise RigLConfigError(f"rigl config must be a dict, a JSON path or a RigLConfig, got {type(config).__name__}")
    if "rigl" in config:
        config = config["rigl"]
        if not isinstance(config, Mapping):
            raise RigLConfigError(f"rigl: must be a JSON object, got {type(config).__name__}")
    try:
        return RigLConfig.model_validate(dict(config))
    except ValidationError as exc:
        raise RigLConfigError(_format_errors(exc)) from None


# What a checkpoint's masks mean: a resume that changes one of these is refused. Everything else in
# the block (when and how much masks move, seeds, schedules) may change on resume, and is logged.
MASK_DEFINING_KEYS = (
    "method",
    "sparsity",
    "distribution",
    "erk_power_scale",
    "dense_layers",
    "custom_sparsity",
    "modules",
    "mask_groups",
    "initial_sparsity",
    "compact_optimizer_state",
    "compact_master_weights",
    "storage",
    "constant_fan_in",
    "n_m",
)


def resume_changes(saved: Mapping[str, Any], current: RigLConfig) -> tuple:
    """``(refused, allowed)``: the keys whose value differs between a checkpoint's block and this
    run's, split by whether the change would reinterpret the saved masks and state."""
    now = current.model_dump()
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    refused = {k: v for k, v in changed.items() if k in MASK_DEFINING_KEYS}
    allowed = {k: v for k, v in changed.items() if k not in MASK_DEFINING_KEYS}
    return refused, allowed
