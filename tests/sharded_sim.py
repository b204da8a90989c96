"""The same short sparse-training run on whole tensors in one process and on each rank's ranges.

Gradients are a keyed function of (step, layer, global index, weight), not of a forward pass, so
a rank that owns entries [a, b) of a layer sees exactly the gradients the whole-tensor run sees
there. With an elementwise optimizer (Adam), its masks, weights and optimizer state over [a, b)
must then equal the single-process run's, bit for bit, if the sharded path is right.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from rigl_ds import keyed_random
from rigl_ds.config import load_config
from rigl_ds.controller import SparseController
from rigl_ds.exploration import ExplorationTracker
from rigl_ds.plan import build_plan
from rigl_ds.shards import LocalCollectives, ParamRangeShard

SHAPES = {"attn.weight": (36, 16), "mlp.up": (40, 16), "mlp.down": (16, 40), "gates.weight": (48, 10)}
SCHEMES = ("per_layer_even", "flat_even", "random", "reversed")

RUNS: Dict[str, Tuple[dict, torch.dtype]] = {
    "rigl_erk_groups": (
        {
            "method": "rigl",
            "sparsity": 0.8,
            "delta_t": 3,
            "end_step": 18,
            "mask_groups": {"gates.weight": {"axis": 0, "blocks": 4}},
        },
        torch.float32,
    ),
    "rigl_global_random_normal": (
        {
            "method": "rigl",
            "sparsity": 0.7,
            "distribution": "global",
            "delta_t": 4,
            "end_step": 18,
            "grow_init": "random_normal",
            "skip_optimizer_step_on_update": False,
        },
        torch.float32,
    ),
    "set_uniform": (
        {"method": "set", "sparsity": 0.75, "distribution": "uniform", "delta_t": 3, "end_step": 18},
        torch.float32,
    ),
    "snfs_erk": ({"method": "snfs", "sparsity": 0.8, "delta_t": 3, "end_step": 18}, torch.float32),
    "gmp": (
        {"method": "gmp", "sparsity": 0.85, "initial_sparsity": 0.2, "delta_t": 3, "begin_step": 2, "end_step": 17},
        torch.float32,
    ),
    "static_er": ({"method": "static", "sparsity": 0.6, "distribution": "er"}, torch.float32),
    "rigl_erk_bf16": ({"method": "rigl", "sparsity": 0.8, "delta_t": 3, "end_step": 18}, torch.bfloat16),
    # configs/rigl_plus.json's options: growth by |g| within a keyed random pool, no skipped step.
    "rigl_plus_candidate_pool": (
        {
            "method": "rigl",
            "sparsity": 0.8,
            "delta_t": 3,
            "end_step": 18,
            "grow_candidate_fraction": 0.3,
            "skip_optimizer_step_on_update": False,
        },
        torch.float32,
    ),
}
STEPS = 20


def partition(scheme: str, world: int, seed: int = 0) -> Dict[str, List[Tuple[int, int]]]:
    """Each rank's range of each layer. flat_even cuts the layers laid end to end into equal
    pieces (as ZeRO 1/2 partition a flat buffer); reversed hands rank r the (world-1-r)-th range."""
    sizes = {n: torch.Size(s).numel() for n, s in SHAPES.items()}
    out: Dict[str, List[Tuple[int, int]]] = {}
    if scheme == "flat_even":
        total = sum(sizes.values())
        per = -(-total // world)
        start = 0
        for n, size in sizes.items():
            out[n] = [
                (min(max(r * per - start, 0), size), min(max((r + 1) * per - start, 0), size)) for r in range(world)
            ]
            start += size
        return out
    g = torch.Generator().manual_seed(seed)
    for n, size in sizes.items():
        if scheme == "random":
            points = sorted(torch.randint(0, size + 1, (world - 1,), generator=g).tolist())
        else:  # even per layer (ZeRO-3: a padded last partition, so the last ranks may get fewer)
            per = -(-size // world)
            points = [min(r * per, size) for r in range(1, world)]
        bounds = [0, *points, size]
        ranges = [(bounds[r], bounds[r + 1]) for r in range(world)]
        out[n] = ranges[::-1] if scheme == "reversed" else ranges
    return out


def synthetic_grad(step: int, name: str, weight: torch.Tensor) -> torch.Tensor:
    """Quantised to quarters, so many entries tie, and tied to the weight, so it is not constant."""
    idx = torch.arange(weight.numel())
    noise = keyed_random.normal(keyed_random.derive_key("grad", step, name), idx)
    return (torch.round(noise * 4) / 4 + 0.25 * weight.detach().view(-1).float()).to(weight.dtype).view(weight.shape)


def simulate(run: str, comm, ranges: Dict[str, Tuple[int, int]]) -> Dict[str, Any]:
    """Trains the toy parameters for STEPS steps; returns this process's ranges and update stats."""
    config_dict, dtype = RUNS[run]
    config = load_config(config_dict)
    plan = build_plan(config, SHAPES)
    params = {}
    for layer in plan.layers:
        init = keyed_random.normal(keyed_random.derive_key("init", layer.name), torch.arange(layer.numel)) * 0.5
        params[layer.name] = torch.nn.Parameter(init.view(layer.shape).to(dtype))
    optimizer = torch.optim.Adam(params.values(), lr=0.05)
    shards = [ParamRangeShard(layer, params[layer.name], optimizer, *ranges[layer.name]) for layer in plan.layers]
    controller = SparseController(config, plan, shards, comm, total_steps=STEPS)
    controller.initialize_masks()
    exploration = ExplorationTracker(controller)
    for step in range(STEPS):
        for name, p in params.items():
            p.grad = synthetic_grad(step, name, p)
        stepped = controller.before_step()
        if stepped:
            optimizer.step()
        controller.after_step(stepped)
    return {
        "masks": {s.layer.name: s.mask.clone() for s in shards},
        "weights": {s.layer.name: s.weight.clone() for s in shards},
        "states": {s.layer.name: [t.clone() for t in s.optimizer_states()] for s in shards},
        "history": [(h.step, h.dropped, h.grown, h.regrown, h.n_active) for h in controller.history],
        "collectives": [h.collectives for h in controller.history],
        "bytes_sent": [h.bytes_sent for h in controller.history],
        "report": controller.layer_report(),
        "exploration": exploration.summary(),  # ITOP and fan-in spread, summed over the ranks
    }


def reference(run: str) -> Dict[str, Any]:
    return simulate(run, LocalCollectives(), {n: (0, torch.Size(s).numel()) for n, s in SHAPES.items()})


def rank_runs(scheme: str) -> Dict[str, Any]:
    """Entry point on a gloo rank: every run with this rank's ranges under ``scheme``."""
    import torch.distributed as dist

    from rigl_ds.select import ShardedCollectives

    world, rank = dist.get_world_size(), dist.get_rank()
    ranges = {n: r[rank] for n, r in partition(scheme, world).items()}
    return {run: simulate(run, ShardedCollectives(), ranges) for run in RUNS}


def random_selection_cases(seed: int, count: int, world: int) -> List[Dict[str, Any]]:
    """Layers of random sizes and pools, quantised fp32/bf16 scores (±0 included), random
    eligibility and k (0 and all-eligible included), each layer cut at random points."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for c in range(count):
        n_pools = int(torch.randint(1, 4, (), generator=g))
        levels = [1, 3, 50, 100000][c % 4]
        dtype = torch.bfloat16 if c % 3 == 0 else torch.float32
        layers = []
        for _ in range(int(torch.randint(1, 5, (), generator=g))):
            n = int(torch.randint(0, 300, (), generator=g))
            s = torch.randint(-levels, levels + 1, (n,), generator=g).float() / 7
            s = torch.where(torch.rand(n, generator=g) < 0.2, -s, s)  # -0.0 beside +0.0
            multi = bool(torch.rand((), generator=g) < 0.5)
            if multi:
                pools = torch.randint(0, n_pools, (n,), generator=g)
            else:
                pools = int(torch.randint(0, n_pools, (), generator=g))
            points = sorted(torch.randint(0, n + 1, (world - 1,), generator=g).tolist())
            bounds = [0, *points, n]
            layers.append(
                {
                    "scores": s.to(dtype),
                    "pools": pools,
                    "layer_pools": list(range(n_pools)) if multi else [pools],
                    "eligible": torch.rand(n, generator=g) < 0.7,
                    "ranges": [(bounds[r], bounds[r + 1]) for r in range(world)],
                }
            )
        n_eligible = torch.zeros(n_pools, dtype=torch.long)
        for layer in layers:
            p = layer["pools"]
            e = layer["eligible"]
            n_eligible += torch.bincount(
                p[e] if isinstance(p, torch.Tensor) else torch.full((int(e.sum()),), p), minlength=n_pools
            )
        k = torch.tensor(
            [
                [0, int(m), int(torch.randint(0, int(m) + 1, (), generator=g))][(c + j) % 3]
                for j, m in enumerate(n_eligible)
            ]
        )
        cases.append({"layers": layers, "k": k})
    return cases


def rank_selections(cases: List[Dict[str, Any]]) -> List[List[torch.Tensor]]:
    """Entry point on a gloo rank: this rank's part of every case's selection."""
    import torch.distributed as dist

    from rigl_ds.select import ShardedCollectives, radix_select_topk

    comm = ShardedCollectives()
    rank = dist.get_rank()
    out = []
    for case in cases:
        mine = [layer["ranges"][rank] for layer in case["layers"]]
        sl = [slice(a, b) for a, b in mine]
        out.append(
            radix_select_topk(
                comm,
                [layer["scores"][s] for layer, s in zip(case["layers"], sl)],
                [p if isinstance(p := layer["pools"], int) else p[s] for layer, s in zip(case["layers"], sl)],
                case["k"],
                [layer["eligible"][s] for layer, s in zip(case["layers"], sl)],
                [a for a, _ in mine],
                layer_pools=[layer["layer_pools"] for layer in case["layers"]],
            )
        )
    return out
