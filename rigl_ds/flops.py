"""FLOPs of a model at its current masks, and of training it with each method, as in the paper.

Counts the multiply-adds of parameterised layers (Linear, GPT-2 Conv1D, convolutions, RNN gate
matrices and the output head): 2 FLOPs per weight entry per use, a sparse layer scaled by its
density. Attention score/value products, norms and activations are not counted (the paper's
accounting is for weight layers too); they are the same for every method, so ratios to dense
are, if anything, conservative for attention-heavy models.

Each method's training formula lives on its class (``SparseMethod.training_flops_per_step``); the
functions here take the method's registered name, or ``DENSE`` for the dense baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from .layers import RNN_WEIGHT_PREFIXES, global_shape
from .methods import DENSE, method_class


def weight_uses(model: nn.Module, *args: Any, **kwargs: Any) -> Dict[str, int]:
    """Runs one forward pass and returns, per weight name, how many times each entry is used
    (rows for Linear/Conv1D, output positions for conv, timesteps x batch for RNNs)."""
    names = {id(p): n for n, p in model.named_parameters()}
    uses: Dict[str, int] = {}
    hooks = []

    def record(module: nn.Module, inputs, output) -> None:
        x = inputs[0] if inputs else None
        if isinstance(module, nn.RNNBase):
            if not isinstance(x, torch.Tensor):  # PackedSequence: every packed row is one timestep of one sequence
                rows = int(x.data.shape[0])
            else:
                rows = x.numel() // module.input_size
            for pname, p in module.named_parameters(recurse=False):
                if pname.startswith(RNN_WEIGHT_PREFIXES):
                    uses[names[id(p)]] = uses.get(names[id(p)], 0) + rows
            return
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) not in names:
            return
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            n = output.numel() // module.out_channels
        elif isinstance(module, nn.Linear):
            n = x.numel() // module.in_features
        elif type(module).__name__ == "Conv1D":  # GPT-2: weight (in, out)
            n = x.numel() // weight.shape[0]
        else:
            return
        uses[names[id(weight)]] = uses.get(names[id(weight)], 0) + n

    for module in model.modules():
        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return uses


def weight_uses_per_token(model: nn.Module) -> Dict[str, int]:
    """Per weight name, how many times each entry is used per token of a sequence model, from the
    module types alone: no forward pass, so it works on a model too large for one rank and on
    ZeRO-3's partitioned parameters. A Linear or GPT-2 ``Conv1D`` weight is used once per token (a
    weight shared by several such modules, such as a head tied to the embedding, once per module);
    RNN gate matrices once per time step, every layer and direction. Embedding lookups are not
    matmuls and are not counted.

    Equals ``weight_uses`` over a forward of ``n`` tokens divided by ``n`` for models that apply
    every such module to every token once: the decoder-only and RNN LMs of ``rigl_ds.lm``
    (tests/test_trainer_scale.py checks each family). Not for models that route tokens to some
    modules only (mixture-of-experts built from per-expert Linear layers would be over-counted).
    A convolution uses its weight per output position, which the module alone does not give: a
    model with one is refused."""
    names = {id(p): n for n, p in model.named_parameters()}
    uses: Dict[str, int] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):
            for pname, p in module.named_parameters(recurse=False):
                if pname.startswith(RNN_WEIGHT_PREFIXES):
                    uses[names[id(p)]] = uses.get(names[id(p)], 0) + 1
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) not in names:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise ValueError(
                f"weight_uses_per_token: {module_name} is a {type(module).__name__}, whose uses per token depend "
                "on its padding and input length; count it with weight_uses (a forward pass) instead"
            )
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            uses[names[id(weight)]] = uses.get(names[id(weight)], 0) + 1
    return uses


def full_numel(p: torch.Tensor) -> int:
    """A parameter's number of entries, also when ZeRO-3 has partitioned it (``p.numel()`` is 0 there)."""
    return math.prod(global_shape(p))


def forward_flops(
    numels: Mapping[str, int], uses: Mapping[str, int], densities: Optional[Mapping[str, float]] = None
) -> Dict[str, float]:
    """Per-layer forward FLOPs: 2 * N * uses * density (density 1 for layers not listed)."""
    densities = densities or {}
    return {n: 2.0 * numels[n] * u * densities.get(n, 1.0) for n, u in uses.items()}


def training_flops_per_step(method: str, f_sparse: float, f_dense: float, update_step: bool) -> float:
    """One training step: forward, backward to inputs and backward to weights (3 forwards' worth)."""
    if method == DENSE:  # no "rigl" block: every step is 3 dense forwards' worth
        return 3.0 * f_dense
    return method_class(method).training_flops_per_step(f_sparse, f_dense, update_step)


def expected_training_flops(method: str, f_sparse: float, f_dense: float, delta_t: int = 100) -> float:
    """The paper's per-example training cost (GMP: use ``TrainingFlops`` to average over its schedule)."""
    if method == DENSE:
        return 3.0 * f_dense
    return method_class(method).expected_training_flops(f_sparse, f_dense, delta_t)


@dataclass
class FlopsReport:
    """Per-example figures at the current masks."""

    per_layer_dense: Dict[str, float]
    per_layer_sparse: Dict[str, float]
    inference_dense: float
    inference_sparse: float
    training_per_example: float  # expected per-step cost of the method at these masks
    training_multiplier: float  # training_per_example / dense training (3 f_D)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "inference_dense": self.inference_dense,
            "inference_sparse": self.inference_sparse,
            "inference_multiplier": self.inference_sparse / self.inference_dense if self.inference_dense else 0.0,
            "training_per_example": self.training_per_example,
            "training_multiplier": self.training_multiplier,
        }


def flops_report(
    numels: Mapping[str, int],
    uses_per_example: Mapping[str, float],
    densities: Mapping[str, float],
    method: str,
    delta_t: int,
) -> FlopsReport:
    dense = forward_flops(numels, uses_per_example)
    sparse = forward_flops(numels, uses_per_example, densities)
    f_d, f_s = sum(dense.values()), sum(sparse.values())
    train = expected_training_flops(method, f_s, f_d, delta_t)
    return FlopsReport(dense, sparse, f_d, f_s, train, train / (3.0 * f_d) if f_d else 0.0)


@dataclass
class TrainingFlops:
    """Training FLOPs actually spent, step by step (GMP's average over its schedule falls out of it)."""

    total: float = 0.0
    dense_equivalent: float = 0.0
    steps: int = 0

    def add(self, method: str, f_sparse: float, f_dense: float, update_step: bool, examples: int = 1) -> None:
        self.total += examples * training_flops_per_step(method, f_sparse, f_dense, update_step)
        self.dense_equivalent += examples * 3.0 * f_dense
        self.steps += 1

    @property
    def multiplier(self) -> float:
        return self.total / self.dense_equivalent if self.dense_equivalent else 0.0


class FlopsMeter:
    """Training FLOPs spent so far at each step's masks, as every entry point accounts them: per
    example (or token) uses of each weight measured once, the report refreshed when the masks
    change, each step's cost added to ``spent``."""

    def __init__(
        self,
        model: nn.Module,
        uses: Mapping[str, int],
        examples: int,
        method: str,
        delta_t: int,
        spent: Optional[TrainingFlops] = None,
    ):
        """``uses``: ``weight_uses`` of one forward over ``examples`` examples (or tokens), or
        ``weight_uses_per_token`` with ``examples=1``. Parameters may be ZeRO-3 partitioned: the
        full sizes are read from their shapes."""
        self.uses = {n: u / examples for n, u in uses.items()}
        self.numels = {n: full_numel(p) for n, p in model.named_parameters()}
        self.method, self.delta_t = method, delta_t
        self.spent = TrainingFlops() if spent is None else spent
        self.report: Optional[FlopsReport] = None

    def report_at(self, layers: Optional[Sequence[Mapping[str, Any]]]) -> FlopsReport:
        """Per-example figures at the densities of ``layers`` (a ``layer_report``; None: dense)."""
        densities = {r["name"]: 1.0 - r["sparsity"] for r in layers or []}
        return flops_report(self.numels, self.uses, densities, self.method, self.delta_t)

    def refresh(self, layers: Optional[Sequence[Mapping[str, Any]]]) -> FlopsReport:
        """Takes the current masks' figures for the steps from now on (densities change only at updates)."""
        self.report = self.report_at(layers)
        return self.report

    def add_step(self, update_step: bool, examples: int) -> None:
        """One optimizer step over ``examples`` examples (or tokens) at the current report's masks."""
        report = self.report
        self.spent.add(self.method, report.inference_sparse, report.inference_dense, update_step, examples)
