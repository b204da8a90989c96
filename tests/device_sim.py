"""sharded_sim's training runs over views laid out as ZeRO lays them out, with each kind of tensor
on the device ZeRO puts it on, on the pretend accelerator of fake_device.

A *story* says where things live: the fp32 master, its gradient and optimizer state (on the host
under ``offload_optimizer``), the low-precision weights (on the accelerator), and the device the
collectives' backend carries (the accelerator for NCCL, the host for gloo). The shards are the
real ``rigl_ds.zero.views`` classes over stand-ins for DeepSpeed's optimizer: ``HpFragmentShard``
over a flat fp32 partition cut without regard to layers (ZeRO-1/2), ``Stage3Shard`` over padded
per-layer slices (ZeRO-3). Everything runs inside ``FakeAccelerator`` with ``RecordedCollectives``,
so a tensor on the wrong device raises on the rank, as on a GPU.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import sharded_sim
import torch
from fake_device import ACCEL, CPU, FakeAccelerator, OnAccel, RecordedCollectives, to_cpu

from rigl_ds import keyed_random
from rigl_ds.config import load_config
from rigl_ds.controller import SparseController
from rigl_ds.plan import build_plan
from rigl_ds.zero.views import HpFragmentShard, Stage3Shard

#: name: (layout, master/grad/optimizer-state device, low-precision device, collectives' device)
STORIES: Dict[str, Tuple[str, torch.device, torch.device, torch.device]] = {
    "zero2_offload_nccl": ("fragments", CPU, ACCEL, ACCEL),
    "zero3_offload_nccl": ("stage3", CPU, ACCEL, ACCEL),
    "zero3_nccl": ("stage3", ACCEL, ACCEL, ACCEL),
    "zero2_accel_over_gloo": ("fragments", ACCEL, ACCEL, CPU),
}
#: The fp32 runs of sharded_sim: their masters are the reference's parameters, bit for bit.
RUNS = [run for run, (_, dtype) in sharded_sim.RUNS.items() if dtype == torch.float32]
#: Offload (the review's A1) runs them all; the other stories the per-entry pools, random_normal
#: growth and SNFS's gradient average.
STORY_RUNS = {
    story: RUNS if master == CPU else ["rigl_erk_groups", "rigl_global_random_normal", "snfs_erk"]
    for story, (_, master, _, _) in STORIES.items()
}
LOW = torch.bfloat16


def ranges(story: str, world: int) -> Dict[str, List[Tuple[int, int]]]:
    """Each rank's range of each layer: a flat cut for ZeRO-1/2, per-layer padded slices for ZeRO-3."""
    layout = STORIES[story][0]
    return sharded_sim.partition("flat_even" if layout == "fragments" else "per_layer_even", world)


def _grad(step: int, name: str, start: int, weight: torch.Tensor) -> torch.Tensor:
    """sharded_sim.synthetic_grad over entries [start, start + len(weight)) only (it is elementwise)."""
    idx = torch.arange(start, start + weight.numel(), device=weight.device)
    noise = keyed_random.normal(keyed_random.derive_key("grad", step, name), idx)
    return torch.round(noise * 4) / 4 + 0.25 * weight


class _Param:
    """A low-precision parameter as ZeRO-1/2 keep it: whole on every rank, with a fragment mapping."""

    _index_in_param_group = 0

    def __init__(self, lp: torch.Tensor, mapping: Optional["_Mapping"]):
        self.data, self._hp_mapping = lp, mapping

    def numel(self) -> int:
        return self.data.numel()


class _Address:
    def __init__(self, start: int, numel: int):
        self.start, self.numel = start, numel


class _Mapping:
    """DeepSpeed's tensor-fragment mapping: this rank's range of one parameter in the flat partition."""

    param_group_index = 0

    def __init__(self, engine: "_FragmentEngine", name: str, a: int, b: int, at: int):
        self.engine, self.at, self.n = engine, at, b - a
        self.lp_fragment_address = _Address(a, b - a)
        self.hp_fragment_address = _Address(at, b - a)
        self.hp_fragment = engine.flat.narrow(0, at, b - a)
        self.lp_fragment = engine.lp[name].view(-1).narrow(0, a, b - a)

    @property
    def optim_fragment(self) -> Dict[str, torch.Tensor]:  # linked after the first step, as DeepSpeed does
        state = self.engine.optimizer.state.get(self.engine.flat, {})
        return {k: v.narrow(0, self.at, self.n) for k, v in state.items() if v.dim() == 1}

    def get_lp_grad_fragment(self, index_in_param_group: int) -> Optional[torch.Tensor]:
        g = self.engine.flat.grad
        return None if g is None else g.narrow(0, self.at, self.n)


class _FragmentEngine:
    """ZeRO-1/2: one flat fp32 partition per rank on the master device, low-precision params whole."""

    def __init__(self, plan, parts, rank: int, master: torch.device, low: torch.device):
        self.plan, self.mine = plan, {n: parts[n][rank] for n in parts}
        init = {layer.name: _init(layer) for layer in plan.layers}
        self.flat = torch.cat([init[n][a:b] for n, (a, b) in self.mine.items()]).to(master)
        self.lp = {n: w.view(sharded_sim.SHAPES[n]).to(device=low, dtype=LOW) for n, w in init.items()}
        self.optimizer = torch.optim.Adam([self.flat], lr=0.05)
        self.single_partition_of_fp32_groups = [self.flat]  # what HpFragmentShard reads
        self.params, at = {}, 0
        for n, (a, b) in self.mine.items():
            self.params[n] = _Param(self.lp[n], _Mapping(self, n, a, b, at) if b > a else None)
            at += b - a
        self.shards = [HpFragmentShard(layer, self.params[layer.name], self, low) for layer in plan.layers]

    def backward(self, step: int) -> None:
        self.flat.grad = torch.cat(
            [_grad(step, n, a, self.flat.narrow(0, m.at, m.n)) for n, (a, _), m in self._held()]
            or [self.flat.new_zeros(0)]
        )

    def step(self) -> None:
        self.optimizer.step()
        for _, _, m in self._held():  # DeepSpeed's copy of the stepped master into the low-precision weights
            m.lp_fragment.copy_(m.hp_fragment)

    def _held(self):
        return [(n, self.mine[n], p._hp_mapping) for n, p in self.params.items() if p._hp_mapping is not None]


class _Stage3Engine:
    """ZeRO-3: every layer cut into ceil(numel / world) slices, padded; rank r's slices of all layers
    in one flat fp32 partition on the master device, its low-precision ``ds_tensor``s on ``low``."""

    def __init__(self, plan, world: int, rank: int, master: torch.device, low: torch.device):
        self.plan, self.part, self.grad_position = plan, {}, {}
        pieces, at = [], 0
        for i, layer in enumerate(plan.layers):
            part = -(-layer.numel // world)
            a, b = min(rank * part, layer.numel), min((rank + 1) * part, layer.numel)
            piece = torch.zeros(part)
            piece[: b - a] = _init(layer)[a:b]
            pieces.append(piece)
            self.part[layer.name] = (a, b, at, part)
            self.grad_position[i] = (0, at, part)
            at += part
        self.flat = torch.cat(pieces).to(master)
        self.fp32_partitioned_groups_flat = [self.flat]
        self.optimizer = torch.optim.Adam([self.flat], lr=0.05)
        self.params = {}
        for i, layer in enumerate(plan.layers):
            p = _Param(None, None)
            _, _, at, part = self.part[layer.name]
            p.ds_tensor = self.flat.narrow(0, at, part).to(device=low, dtype=LOW)
            p.ds_id, p.name = i, layer.name
            self.params[layer.name] = p
        self.shards = [Stage3Shard(layer, self.params[layer.name], self, rank) for layer in plan.layers]

    def get_param_id(self, param) -> int:
        return param.ds_id

    def _get_fp32_opt_state_partition(self, param, release_swap_buffers=False, optim_state_key=None):
        _, _, at, part = self.part[param.name]
        flat = self.flat if optim_state_key is None else self.optimizer.state[self.flat][optim_state_key]
        return flat.narrow(0, at, part), None

    def _get_fp32_grad_state_partition(self, param, release_swap_buffers=False):
        _, _, at, part = self.part[param.name]
        return (None if self.flat.grad is None else self.flat.grad.narrow(0, at, part)), None

    def backward(self, step: int) -> None:
        grad = torch.zeros_like(self.flat)
        for name, (a, b, at, _) in self.part.items():
            grad.narrow(0, at, b - a).copy_(_grad(step, name, a, self.flat.narrow(0, at, b - a)))
        self.flat.grad = grad

    def step(self) -> None:
        self.optimizer.step()
        for name, p in self.params.items():  # DeepSpeed's copy into the low-precision partition
            _, _, at, part = self.part[name]
            p.ds_tensor.copy_(self.flat.narrow(0, at, part))


def _init(layer) -> torch.Tensor:
    """sharded_sim's initial weights of ``layer`` (flat, fp32, host)."""
    return keyed_random.normal(keyed_random.derive_key("init", layer.name), torch.arange(layer.numel)) * 0.5


def _train(story: str, run: str, world: int, rank: int) -> Dict[str, Any]:
    layout, master, low, comm_device = STORIES[story]
    config = load_config(sharded_sim.RUNS[run][0])
    plan = build_plan(config, sharded_sim.SHAPES)
    from rigl_ds.select import ShardedCollectives

    comm = ShardedCollectives(device=comm_device)
    recorder = RecordedCollectives(comm_device)
    with FakeAccelerator(), recorder.active():
        if layout == "fragments":
            engine = _FragmentEngine(plan, ranges(story, world), rank, master, low)
        else:
            engine = _Stage3Engine(plan, world, rank, master, low)
        shards = engine.shards
        controller = SparseController(config, plan, shards, comm, total_steps=sharded_sim.STEPS)
        controller.initialize_masks()
        for step in range(sharded_sim.STEPS):
            engine.backward(step)
            stepped = controller.before_step()
            if stepped:
                engine.step()
            controller.after_step(stepped)
        low_copies = {s.layer.name: [c.float() for c in s.extra_copies()] for s in shards}
        result = {
            "masks": {s.layer.name: s.mask for s in shards},
            "weights": {s.layer.name: s.weight.clone() for s in shards},
            "states": {s.layer.name: [t.clone() for t in s.optimizer_states()] for s in shards},
            "low": low_copies,
            "history": [(h.step, h.dropped, h.grown, h.regrown, h.n_active) for h in controller.history],
            "report": controller.layer_report(),
        }
    result["ranges"] = {s.layer.name: (s.offset, s.offset + s.numel) for s in shards}
    result["shard_devices"] = sorted({str(s.device) for s in shards})
    result["calls"] = recorder.calls
    return to_cpu(result)


def rank_stories(story_runs: Dict[str, List[str]]) -> Dict[str, Dict[str, Any]]:
    """Entry point on a gloo rank: every (story, run) on this rank's views."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    return {f"{story}/{run}": _train(story, run, world, rank) for story, runs in story_runs.items() for run in runs}


def rank_selections(cases: List[Dict[str, Any]], combos: List[Tuple[str, str]]) -> Dict[str, Any]:
    """Entry point on a gloo rank: sharded_sim's selection cases with the scores on the first device
    of each combo (eligibility and pools stay on the host) and collectives carrying the second."""
    import torch.distributed as dist

    from rigl_ds.select import ShardedCollectives, radix_select_topk

    devices = {"cpu": CPU, "accel": ACCEL}
    rank, results = dist.get_rank(), {}
    for score_device, comm_device in combos:
        comm = ShardedCollectives(device=devices[comm_device])
        recorder = RecordedCollectives(devices[comm_device])
        out = []
        with FakeAccelerator(), recorder.active():
            for case in cases:
                sl = [slice(*layer["ranges"][rank]) for layer in case["layers"]]
                chosen = radix_select_topk(
                    comm,
                    [layer["scores"][s].to(devices[score_device]) for layer, s in zip(case["layers"], sl)],
                    [p if isinstance(p := layer["pools"], int) else p[s] for layer, s in zip(case["layers"], sl)],
                    case["k"],
                    [layer["eligible"][s] for layer, s in zip(case["layers"], sl)],
                    [s.start for s in sl],
                    layer_pools=[layer["layer_pools"] for layer in case["layers"]],
                )
                out.append({"chosen": chosen, "devices": [str(c.device) for c in chosen]})
        results[f"{score_device}/{comm_device}"] = to_cpu({"cases": out, "calls": recorder.calls})
    return results


def _whole(shards, tensors) -> Dict[str, torch.Tensor]:
    """Test-only: each layer's whole tensor (float64) from every rank's range, by an all_reduce of
    zero-filled copies on the host."""
    import torch.distributed as dist

    out = {}
    for s, t in zip(shards, tensors):
        whole = torch.zeros(s.layer.numel, dtype=torch.float64)
        if t is not None:
            whole[s.offset : s.offset + s.numel] = t.detach().double().cpu()
        dist.all_reduce(whole)
        out[s.layer.name] = whole
    return out


def _deepspeed_offload(stage: int) -> Dict[str, Any]:
    """Real DeepSpeed views with ``offload_optimizer`` (fp32 masters, gradients and moments on the
    host); the low-precision weights are then labelled as accelerator tensors (their storage stays
    DeepSpeed's) and the collectives made to carry the accelerator only, as NCCL would. One RigL
    drop/grow runs over those views and must choose what one process chooses on the whole tensors."""
    import ds_sim

    import rigl_ds
    from rigl_ds.lm.models import lm_loss
    from rigl_ds.masks import apply_masks, drop_and_grow, mask_gradients
    from rigl_ds.select import ShardedCollectives
    from rigl_ds.shards import LocalCollectives, ParamRangeShard

    model = ds_sim.tiny_model("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = ds_sim.ds_config(stage, "fp32", ds_sim.RIGL, zero_force_ds_cpu_optimizer=False)
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
    sparse = engine.rigl
    for step in range(2):  # the product's own steps (gloo: its collectives carry the host)
        engine.backward(lm_loss(engine, ds_sim.batch("gpt2", step)))
        engine.step()
    engine.backward(lm_loss(engine, ds_sim.batch("gpt2", 2)))  # gradients held until the next step
    shards, plan = sparse.shards, sparse.plan
    result: Dict[str, Any] = {
        "product_comm_device": str(sparse.comm.device),
        "shard_devices": sorted({str(s.device) for s in shards}),
        "fragment_devices": sorted({str(s.weight.device) for s in shards if s.numel}),
        "ranges": {s.layer.name: (s.offset, s.offset + s.numel) for s in shards},
    }
    weights = _whole(shards, [s.weight for s in shards])
    grads = _whole(shards, [s.grad() for s in shards])
    masks = _whole(shards, [s.mask for s in shards])
    scores = [s.grad().abs() for s in shards]

    # One process on the whole tensors: the reference.
    ref = []
    for layer in plan.layers:
        shard = ParamRangeShard(layer, torch.nn.Parameter(weights[layer.name].float().view(layer.shape)), None)
        shard.mask = masks[layer.name] > 0.5
        ref.append(shard)
    ref_scores = [grads[layer.name].float().abs() for layer in plan.layers]
    drop_and_grow(ref, LocalCollectives(), plan.n_pools, 99, 0.3, ref_scores)
    result["reference"] = {s.layer.name: s.mask.clone() for s in ref}

    for s in shards:  # the low-precision copies, labelled as the accelerator's; storage stays DeepSpeed's
        if stage == 3:
            s.param.ds_tensor = OnAccel(s.param.ds_tensor)
        elif s.mapping is not None:
            s.mapping.lp_fragment = OnAccel(s.mapping.lp_fragment)
    comm = ShardedCollectives(sparse.comm.group, device=ACCEL)
    recorder = RecordedCollectives(ACCEL)
    with FakeAccelerator(), recorder.active():
        stats = drop_and_grow(shards, comm, plan.n_pools, 99, 0.3, scores)
        mask_gradients(shards)
        apply_masks(shards, with_optimizer_state=True)
        result["copy_devices"] = sorted({str(c.device) for s in shards for c in s.extra_copies()})
        result["masks"] = {s.layer.name: s.mask for s in shards}
        result["weights"] = {s.layer.name: s.weight.clone() for s in shards}
        result["low"] = {s.layer.name: [c.clone() for c in s.extra_copies()] for s in shards}
        result["grads"] = {s.layer.name: s.grad().clone() for s in shards}
    result["grown"], result["calls"] = stats.grown, recorder.calls
    return to_cpu(result)


def rank_deepspeed_offload(stages: List[int]) -> Dict[int, Dict[str, Any]]:
    """Entry point on a gloo rank: ``_deepspeed_offload`` at each ZeRO stage."""
    return {stage: _deepspeed_offload(stage) for stage in stages}
