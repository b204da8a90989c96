"""Storage views: what one process holds of each masked layer, and how processes agree.

The method code runs over ``Shard`` objects and a ``Collectives`` object only. The plain-PyTorch
path uses ``WholeTensorShard`` (offset 0, the whole weight) and ``LocalCollectives`` (no-op
reductions, the exact single-process top-k of ``topk.py``); the sharded path supplies views onto ZeRO
partitions and collective-based selection, and the same method code runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import bits
from .plan import LayerPlan
from .topk import select_topk


class Shard:
    """The contiguous global range [offset, offset + numel) of one masked layer held here.

    ``device`` is where its master ``weight`` lives (the host under ZeRO's optimizer offload), and
    its mask with it; other copies of the range (``extra_copies``, gradients) may live elsewhere."""

    def __init__(self, layer: LayerPlan, offset: int, numel: int, device: torch.device):
        if offset < 0 or offset + numel > layer.numel:
            raise ValueError(
                f"{layer.name}: shard [{offset}, {offset + numel}) outside the layer's {layer.numel} entries"
            )
        self.layer = layer
        self.offset = offset
        self.numel = numel
        self.device = torch.device(device)
        self.mask = torch.ones(numel, dtype=torch.bool, device=device)

    @property
    def mask(self) -> torch.Tensor:
        """This range's mask as a 1-D bool tensor on ``device``, unpacked from its bits: a new tensor
        each read, so change the mask by assigning (``shard.mask = new``), never by writing into a read."""
        return bits.unpack(self.mask_bits, self.numel)

    @mask.setter
    def mask(self, value: torch.Tensor) -> None:
        if value.dtype != torch.bool or value.numel() != self.numel:
            raise ValueError(
                f"{self.layer.name}: a mask for this shard is {self.numel} bool entries, "
                f"got {value.numel()} {value.dtype}"
            )
        self.mask_bits = bits.pack(value.to(self.device))

    @property
    def mask_bits(self) -> torch.Tensor:
        """The mask packed at one bit per entry, on ``device`` (where the weight it masks lives)."""
        return self._mask_bits

    @mask_bits.setter
    def mask_bits(self, value: torch.Tensor) -> None:
        self._mask_bits = value
        self._bits_elsewhere: Dict[torch.device, torch.Tensor] = {}

    def mask_on(self, device: torch.device, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mask unpacked on ``device``, to mask a copy that lives there rather than on ``device``
        (a low-precision weight on the accelerator while the fp32 master is offloaded to the host).
        The packed bits are copied there once per mask change (1/8 byte an entry), not once a use.
        ``scratch`` (uint8 on ``device``): unpack into it (``bits.unpack``), for a mask used at once."""
        device = torch.device(device)
        if device == self.device:
            return bits.unpack(self.mask_bits, self.numel, scratch)
        packed = self._bits_elsewhere.get(device)
        if packed is None:
            packed = self._bits_elsewhere[device] = self.mask_bits.to(device)
        return bits.unpack(packed, self.numel, scratch)

    def active_count(self) -> torch.Tensor:
        """Active entries held here (int64 scalar tensor), counted on the bits."""
        return bits.count(self.mask_bits)

    @property
    def weight(self) -> torch.Tensor:
        """Live 1-D view of the master copy of this range (writes go to the model)."""
        raise NotImplementedError

    def precise_weight(self) -> torch.Tensor:
        """The weight at full precision, which magnitude ranking reads: ``weight``, unless the
        optimizer keeps the master copy elsewhere (a view then overrides this and returns a fresh
        fp32 tensor; ``rigl_ds.zero.views`` does for compact master weights)."""
        return self.weight

    def grad(self) -> Optional[torch.Tensor]:
        """Live 1-D view of the (data-parallel reduced) dense gradient, or None before backward."""
        raise NotImplementedError

    def optimizer_states(self) -> List[torch.Tensor]:
        """Live 1-D views of every per-entry optimizer state (momentum, Adam moments)."""
        raise NotImplementedError

    def take_selection(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """This step's (keep, grow) bits when the layer was selected in backward
        (``SparseMethod.selects_in_backward``), else None: the update then selects it itself."""
        return None

    def extra_copies(self) -> List[torch.Tensor]:
        """Other live copies of the weight (low precision) that must hold the same zeros."""
        return []

    #: False where the weight is not stored entry for entry (``rigl_ds.packed``): there is then
    #: nothing at masked entries to keep at zero, and a new mask is installed by ``install_mask``.
    dense_storage = True

    def install_mask(
        self,
        new: torch.Tensor,
        grown: torch.Tensor,
        dropped: torch.Tensor,
        grow_values: Optional[Callable[[torch.Tensor], torch.Tensor]],
    ) -> None:
        """Makes ``new`` (flat bool) this range's mask: grown entries (inactive before) start at
        ``grow_values(their global indices)`` (zero when None) with zero optimizer state, dropped
        ones become zero in weight and state, every copy follows; the rest keeps weight and state."""
        weight = self.weight
        if grow_values is not None and bool(grown.any()):
            born = grown.nonzero().flatten()
            weight.index_copy_(0, born, grow_values(born + self.offset).to(weight.dtype))
        else:
            weight.masked_fill_(grown, 0)
        weight.masked_fill_(dropped, 0)
        reset = grown | dropped
        reset_on = {reset.device: reset}
        for state in self.optimizer_states():
            state.masked_fill_(reset_on.setdefault(state.device, reset.to(state.device)), 0)
        del reset, reset_on
        self.mask = new
        for copy in self.extra_copies():
            copy.copy_(weight)  # onto the copy's device, in its dtype
            copy.masked_fill_(~self.mask_on(copy.device), 0)

    def global_indices(self) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + self.numel, device=self.device)

    def pool_ids(self) -> Union[int, torch.Tensor]:
        """The pool of every entry held here: an int when the layer is one pool (no tensor needed)."""
        if len(set(self.layer.pools)) == 1:
            return self.layer.pools[0]
        return self.layer.pool_ids(self.global_indices())


class ParamRangeShard(Shard):
    """Entries [start, end) of a plain parameter, with the matching slices of its torch optimizer's
    state: the whole tensor in the plain path, a rank's range in tests of the sharded path."""

    def __init__(
        self,
        layer: LayerPlan,
        param: torch.nn.Parameter,
        optimizer: Optional[torch.optim.Optimizer],
        start: int = 0,
        end: Optional[int] = None,
    ):
        if tuple(param.shape) != layer.shape:
            raise ValueError(
                f"{layer.name}: parameter shape {tuple(param.shape)} differs from the plan's {layer.shape}"
            )
        if not param.is_contiguous():
            raise ValueError(f"{layer.name}: masked parameters must be contiguous")
        end = param.numel() if end is None else end
        super().__init__(layer, start, end - start, param.device)
        self.param = param
        self.optimizer = optimizer

    def _range(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1)[self.offset : self.offset + self.numel]

    @property
    def weight(self) -> torch.Tensor:
        return self._range(self.param.data)

    def grad(self) -> Optional[torch.Tensor]:
        return None if self.param.grad is None else self._range(self.param.grad)

    def optimizer_states(self) -> List[torch.Tensor]:
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(self.param, {})
        return [
            self._range(v)
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.shape == self.param.shape and v.is_floating_point()
        ]


class WholeTensorShard(ParamRangeShard):
    """The whole parameter of a plain-PyTorch model, with its torch optimizer's state."""

    def __init__(self, layer: LayerPlan, param: torch.nn.Parameter, optimizer: Optional[torch.optim.Optimizer]):
        super().__init__(layer, param, optimizer)


@dataclass
class CommStats:
    """Collectives this process has issued: how many, the bytes it sent, and the time spent in them.

    Bytes are what a ring algorithm sends per rank: 2(w-1)/w of the payload for an all_reduce,
    (w-1) times this rank's contribution for an all_gather. Zero in a single process."""

    collectives: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0

    def copy(self) -> "CommStats":
        return replace(self)

    def __sub__(self, other: "CommStats") -> "CommStats":
        return CommStats(
            self.collectives - other.collectives, self.bytes_sent - other.bytes_sent, self.seconds - other.seconds
        )


class Collectives:
    """Reductions and exact selection across the processes that share the layers.

    Callers hand over tensors on whatever device they computed them (the shards' device, or the
    host); an implementation whose backend carries tensors of one device only (NCCL: the current
    GPU) moves the payload there and the result back itself, so no caller needs to know the
    backend's device."""

    world_size: int = 1
    rank: int = 0
    #: The device collective payloads travel on; None where nothing travels (one process).
    device: Optional[torch.device] = None

    def __init__(self) -> None:
        self.stats = CommStats()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place, whatever ``tensor``'s device; returns ``tensor``."""
        raise NotImplementedError

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Every process's 1-D ``row`` stacked in rank order: shape (world_size, len(row)), on
        ``row``'s device."""
        raise NotImplementedError

    def select_topk(
        self,
        scores: Sequence[torch.Tensor],
        pools: Sequence[Union[int, torch.Tensor]],
        k: torch.Tensor,
        eligible: Optional[Sequence[torch.Tensor]] = None,
        shards: Optional[Sequence[Shard]] = None,
        packed: bool = False,
    ) -> List[torch.Tensor]:
        """``topk.select_topk`` over every process's entries together: the same result as one process
        holding whole tensors. ``shards`` gives each layer's global offset, which a sharded
        implementation needs to break ties by global position; each layer's result is then on its
        shard's device (beside the weight it will mask), whatever device its scores came on.
        Scores, eligibility and per-entry pools may be zero-argument callables that build a layer's
        tensor anew (``select.radix.Lazy``), so that a sharded selection holds one layer's at a
        time; ``packed``: each result as ``bits.pack`` of the flat mask."""
        raise NotImplementedError


def beside_shards(masks: Sequence[torch.Tensor], shards: Optional[Sequence[Shard]]) -> List[torch.Tensor]:
    """Each layer's selection moved to its shard's device (a no-op where it is there already)."""
    if shards is None:
        return list(masks)
    return [m.to(s.device) for m, s in zip(masks, shards)]


class LocalCollectives(Collectives):
    """One process holding whole tensors: reductions are identities, selection is the sort reference."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        return row.unsqueeze(0)

    def select_topk(self, scores, pools, k, eligible=None, shards=None, packed=False):
        # The sort reference wants whole tensors: lazy layers are built, all at once.
        def built(xs):
            return None if xs is None else [x() if callable(x) else x for x in xs]

        chosen = select_topk(built(scores), built(pools), k, built(eligible))
        if packed:
            chosen = [bits.pack(c.reshape(-1)) for c in chosen]
        return beside_shards(chosen, shards)
