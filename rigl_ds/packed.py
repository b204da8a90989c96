"""Packed storage (``"storage": "packed"``): a masked weight held as its active values only.

Each packed weight becomes a ``torch.nn.utils.parametrize`` parametrization whose original is a 1-D
parameter of the layer's active values, one *slot* per active entry, and whose ``positions``
buffer says where in the dense weight each slot sits. Reading ``module.weight`` builds the dense
weight (zeros, then the values scattered in), so every module type that reads its weight works
unchanged: GPT-2 ``Conv1D``, ``Linear``, convolutions, ``GRU``/``LSTM`` gate matrices. The module's
forward runs under non-reentrant activation checkpointing (``torch.utils.checkpoint``), so the dense
weight built for forward is not what autograd keeps for backward: it is rebuilt there, one layer at
a time. Why not a hand-written autograd function per layer type: the recompute calls the very ops
of the masked run, so gradients equal the masked run's bit for bit for every layer type, at the
price of running each packed layer's forward twice (the weight scatter and the layer's own op).

Slots are stable: a mask update gives a dropped entry's slot to a grown entry (in ascending order
of both) and zeroes that slot's value and optimizer state, so kept entries never move and the
optimizer (any torch optimizer: its state is per slot) needs no re-layout. Methods that keep
counts per layer (RigL, SET, SNFS, static) fit; GMP and the ``global`` distribution, which move
counts, are refused by ``RigLConfig``.

Dense gradients exist only on steps whose method reads them (RigL's update steps, SNFS every
step): a hook on the rebuilt dense weight hands each layer's gradient to its shard in backward.
Where the adapter knows which backward ends the step (DeepSpeed's accumulation boundary) and the
method selects per layer (RigL: ``SparseMethod.selects_in_backward``), the hook selects that layer's
drop and grow there, keeps the packed bits, and lets the dense gradient go: one layer's at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from . import bits
from .plan import LayerPlan
from .shards import Shard

_INDEX_DTYPE_LIMIT = 2**31 - 1


class ScatterToDense(nn.Module):
    """The parametrization: active values (one per slot) -> the dense weight."""

    def __init__(
        self,
        positions: torch.Tensor,
        shape: torch.Size,
        partitioned: bool = False,
        initial_values: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.shape = torch.Size(shape)
        index_dtype = torch.int32 if self.shape.numel() <= _INDEX_DTYPE_LIMIT else torch.int64
        positions = positions.to(index_dtype)
        if partitioned:
            # A parameter (never trained), so that ZeRO-3 partitions it like the values: nothing
            # that grows with the layer is then whole on every rank.
            self.positions = nn.Parameter(positions, requires_grad=False)
        else:
            self.register_buffer("positions", positions)
        # What ``right_inverse`` hands parametrize when the dense weight cannot be read (a ZeRO-3
        # partition): the active values, taken from the gathered weight by the caller.
        self._initial_values = initial_values
        # Set on steps whose method reads the dense gradient: called with it in backward.
        self.sink: Optional[Callable[[torch.Tensor], None]] = None

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        # The hook may return a new gradient: what flows on to ``values`` (``PackedShard._receive``).
        dense = values.new_zeros(self.shape.numel()).index_put_((self.positions,), values)
        if self.sink is not None and dense.requires_grad:
            dense.register_hook(self.sink)
        return dense.view(self.shape)

    def right_inverse(self, dense: torch.Tensor) -> torch.Tensor:
        if self._initial_values is not None:
            values, self._initial_values = self._initial_values, None
            return values
        return dense.detach().reshape(-1).index_select(0, self.positions).clone()


def _checkpointed(module: nn.Module, forward: Callable, *args, **kwargs):
    """The module's own forward, its saved tensors (the dense weight among them) rebuilt in backward."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


class TorchSlots:
    """Where a packed layer's values and per-slot state live on the plain path: the values
    parameter itself (it is its own fp32 master) and its torch optimizer's state."""

    def __init__(self, optimizer: Optional[torch.optim.Optimizer]):
        self.optimizer = optimizer

    def precise_values(self, values: nn.Parameter) -> torch.Tensor:
        return values.detach()

    def states(self, values: nn.Parameter) -> List[torch.Tensor]:
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(values, {})
        return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == values.shape]

    def write(self, values: nn.Parameter, slots: torch.Tensor, new: torch.Tensor) -> None:
        """``values[slots] = new`` with the slots' optimizer state zeroed."""
        slots = slots.to(values.device)
        with torch.no_grad():
            values[slots] = new.to(values.device, values.dtype)
            for state in self.states(values):
                state[slots.to(state.device)] = 0


class PackedShard(Shard):
    """One packed weight, whole on this process: what the selection reads (dense |w| and the dense
    gradient, built per layer when asked) and how a new mask is installed in its slots. ``slots``
    says where values and per-slot state live (``TorchSlots``, or DeepSpeed's partitions);
    ``reduce_gradient`` (data-parallel runs) averages a dense gradient over the ranks when read."""

    dense_storage = False

    def __init__(
        self,
        layer: LayerPlan,
        module: nn.Module,
        name: str,
        slots: TorchSlots,
        reduce_gradient: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        self.module, self.name, self.slots = module, name, slots
        self.reduce_gradient = reduce_gradient
        super().__init__(layer, 0, layer.numel, self.values.device)
        self.mask = self.mask_from_positions()
        self.capture_dense_gradient(False)

    @property
    def values(self) -> nn.Parameter:
        return getattr(self.module.parametrizations, self.name).original

    @property
    def scatter(self) -> ScatterToDense:
        return getattr(self.module.parametrizations, self.name)[0]

    def mask_from_positions(self) -> torch.Tensor:
        mask = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        mask[self.scatter.positions.long()] = True
        return mask

    # -- what the selection reads -------------------------------------------------------------
    def precise_weight(self) -> torch.Tensor:
        """Dense |w| source at full precision (the optimizer's fp32 values), a new tensor."""
        values = self.slots.precise_values(self.values)
        dense = values.new_zeros(self.numel).index_put_((self.scatter.positions.to(values.device),), values)
        return dense.to(self.device)

    @property
    def weight(self) -> torch.Tensor:
        raise RuntimeError(f"{self.layer.name}: packed storage has no dense weight to write into")

    def grad(self) -> Optional[torch.Tensor]:
        if self._dense_grad is not None and self.reduce_gradient is not None and not self._reduced:
            self._dense_grad = self.reduce_gradient(self._dense_grad)
            self._reduced = True
        return self._dense_grad

    def capture_dense_gradient(
        self, on: bool, plan: Optional["BackwardSelection"] = None, regrade: bool = False
    ) -> None:
        """Whether the coming backward hands this layer's dense gradient over (summed over the
        micro-batches of one step), and what to do with it there (``plan``); the last step's
        gradient and selection are dropped either way. ``regrade``: the optimizer steps after this
        update, so grown entries get their own gradient in the slots they take."""
        self.scatter.sink = self._receive if on else None
        self.backward_selection = plan if on else None
        self.regrade = on and regrade
        self._dense_grad, self._reduced, self._selection, self._received = None, False, None, 0

    def _receive(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        g = grad.detach().reshape(-1)
        if self._dense_grad is None:
            self._dense_grad = g.clone()
        else:
            self._dense_grad += g  # as the dense parameter's .grad would accumulate
        return self._select_in_backward(grad)

    def _select_in_backward(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """At the step's last backward: this layer's selection, made now; its dense gradient dropped.
        Returns the gradient to hand on to the values (None: ``grad`` as it is)."""
        self._received += 1
        plan = self.backward_selection
        if plan is None or not plan.at_boundary():
            return None
        if self.regrade and self._received > 1:
            raise RuntimeError(
                f"{self.layer.name}: rigl.storage \"packed\" with rigl.skip_optimizer_step_on_update false cannot "
                "step grown entries with their accumulated gradient over several micro-batches; set "
                "skip_optimizer_step_on_update true (the reference's default), or one micro-batch per step"
            )
        keep, grow = plan.select(self)
        self._selection, self._dense_grad = (keep, grow), None
        if not self.regrade:
            return None
        return self._regraded(grad, bits.unpack(keep, self.numel) | bits.unpack(grow, self.numel))

    def _regraded(self, grad: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``grad`` (this rank's dense gradient of the whole layer) with each slot that changes hands
        reading its new entry's gradient: the optimizer step after the update then steps a grown
        entry with its own gradient, as the masked run does, not with the dropped entry's."""
        old = self.mask
        positions = self._full_positions()
        slots, born = self._moves(self._whole(new & ~old), self._whole(old & ~new), positions)
        flat = grad.reshape(-1)
        out = flat.clone()
        out[positions.to(flat.device).long()[slots.to(flat.device)]] = flat[born.to(flat.device)]
        return out.view_as(grad)

    def _moves(self, grown: torch.Tensor, dropped: torch.Tensor, positions: torch.Tensor):
        """The slots that change hands (ascending) and the entries they go to (ascending)."""
        slots = dropped.index_select(0, positions.to(dropped.device).long()).nonzero().flatten()
        born = grown.nonzero().flatten()
        if slots.numel() != born.numel():
            raise RuntimeError(
                f"{self.layer.name}: packed storage holds a fixed count per layer, but this update drops "
                f"{slots.numel()} entries and grows {born.numel()}"
            )
        return slots, born

    def _whole(self, part: torch.Tensor) -> torch.Tensor:
        """A layer-wide bool tensor from this process's range of it (here: the range is the layer)."""
        return part

    def _full_positions(self) -> torch.Tensor:
        return self.scatter.positions

    def take_selection(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        return self._selection

    def optimizer_states(self) -> List[torch.Tensor]:
        """The optimizer's per-slot state (not dense: indexed like ``values``)."""
        return self.slots.states(self.values)

    # -- a new mask ---------------------------------------------------------------------------
    def install_mask(
        self,
        new: torch.Tensor,
        grown: torch.Tensor,
        dropped: torch.Tensor,
        grow_values: Optional[Callable[[torch.Tensor], torch.Tensor]],
    ) -> None:
        """Dropped entries' slots go to grown entries (both in ascending order), at the grow-init
        value (zero without ``grow_values``) with zero optimizer state; kept slots do not move."""
        positions = self.scatter.positions
        slots, born = self._moves(grown, dropped, positions)
        with torch.no_grad():
            positions[slots.to(positions.device)] = born.to(positions.device, positions.dtype)
        new_values = torch.zeros(born.numel(), dtype=torch.float32) if grow_values is None else grow_values(born)
        self.slots.write(self.values, slots, new_values)
        self.mask = new
        grad, dense_grad = self.values.grad, self._dense_grad
        if self.regrade and grad is not None and dense_grad is not None:
            # Selected at update time, before a step that runs: the slots' new entries' gradients.
            with torch.no_grad():
                grad[slots.to(grad.device)] = dense_grad[born.to(dense_grad.device)].to(grad.dtype)


@dataclass
class BackwardSelection:
    """What a packed layer does with its dense gradient in the backward that ends an update step."""

    #: Chooses the layer's (keep, grow) bits from its shard (``SparseMethod.select_layer``).
    select: Callable[["PackedShard"], Tuple[torch.Tensor, torch.Tensor]]
    #: Whether the backward now running is the step's last (DeepSpeed's accumulation boundary).
    at_boundary: Callable[[], bool]


def arm_dense_gradients(
    shards: List["PackedShard"], controller: Any, at_boundary: Optional[Callable[[], bool]] = None
) -> None:
    """Before each step's backward: dense gradients in it only if the coming step reads them, and
    where ``at_boundary`` says which backward ends the step, each layer selected inside it."""
    method, step = controller.method, controller.step
    wanted = method.needs_dense_gradients(step, controller.last_update)
    update = wanted and method.is_update_step(step, controller.last_update)
    regrade = update and method.update_before_step and not controller.config.skip_step_on_update
    plan = None
    if update and at_boundary is not None and method.selects_in_backward:
        comm = controller.comm
        plan = BackwardSelection(lambda s: method.select_layer(s, comm, step), at_boundary)
    for s in shards:
        s.capture_dense_gradient(wanted, plan, regrade)


def check_positions(shards: List["PackedShard"]) -> None:
    """After a load: the masks rigl_ds restored are where the model's packed values sit."""
    stale = [s.layer.name for s in shards if not torch.equal(s.mask, s.mask_from_positions())]
    if stale:
        raise ValueError(
            f"packed storage: the loaded masks of {stale[:5]} are not where the model's packed values sit; "
            "load the model's state dict (which holds them) before the rigl_ds state"
        )


def pack_model(
    model: nn.Module,
    dense_shards: List[Shard],
    params: Dict[str, nn.Parameter],
    optimizer: Optional[torch.optim.Optimizer],
    partitioned: bool = False,
) -> List[PackedShard]:
    """Turns each masked weight (its mask already initialised, masked entries zero) into packed
    storage: the parametrization, the optimizer's param and per-entry state moved to the values,
    and the owning module's forward checkpointed. ``partitioned``: positions as a (never trained)
    parameter, for ZeRO-3 to partition. Returns the packed shards, in plan order."""
    owners = {id(p): (m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)}
    packed: List[PackedShard] = []
    wrapped = set()
    for shard in dense_shards:
        dense = params[shard.layer.name]
        module, name = owners[id(dense)]
        positions = shard.mask.nonzero().flatten()
        scatter = ScatterToDense(positions, dense.shape, partitioned=partitioned)
        parametrize.register_parametrization(module, name, scatter, unsafe=True)
        values = getattr(module.parametrizations, name).original
        if optimizer is not None:
            _move_in_optimizer(optimizer, dense, values, positions)
        if id(module) not in wrapped:
            module.forward = functools.partial(_checkpointed, module, module.forward)
            wrapped.add(id(module))
        packed.append(PackedShard(shard.layer, module, name, TorchSlots(optimizer)))
    return packed


def _move_in_optimizer(optimizer: torch.optim.Optimizer, dense: nn.Parameter, values: nn.Parameter, positions) -> None:
    """The optimizer steps ``values`` where it stepped ``dense``; per-entry state is gathered to slots."""
    for group in optimizer.param_groups:
        group["params"] = [values if p is dense else p for p in group["params"]]
    state = optimizer.state.pop(dense, None)
    if state:
        optimizer.state[values] = {
            k: v.reshape(-1).index_select(0, positions).clone()
            if isinstance(v, torch.Tensor) and v.shape == dense.shape
            else v
            for k, v in state.items()
        }


def dense_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every packed weight back under its own name as a dense tensor,
    and no parametrization entries: what a plain dense model of the same class loads."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in key:
            out[key] = value
    for prefix, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in module.parametrizations.keys():
            with torch.no_grad():
                out[f"{prefix}.{name}" if prefix else name] = getattr(module, name).detach().clone()
    return out
