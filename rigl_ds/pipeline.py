"""Pipeline parallelism (``deepspeed.pipe.PipelineModule``): each rank builds only its stage's
layers, but the sparsity budget (ERK, ER, uniform with dense or custom layers) is the whole model's.

At start-up the stages of one pipeline exchange their parameters' shapes (one ``all_gather_object``
over the pipe group); every stage builds the whole model's plan from them and keeps its own layers,
each at the target the whole plan gives it. Masks, updates and counts then stay within the stage
(and its data-parallel group): no collective crosses stages after start-up.

Pure torch (a ``PipelineModule`` is recognised by its grid, without importing DeepSpeed), so the
shared planning step (``rigl_ds.adapter.plan_for_model``) can use it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .config import RigLConfig
from .layers import default_sparse_weights, global_shape, weights_matching
from .plan import SparsityPlan, build_plan


def pipeline_grid(model: torch.nn.Module) -> Optional[Any]:
    """The ``PipelineParallelGrid`` of a ``PipelineModule`` cut into two or more stages, else None."""
    grid = getattr(model, "_grid", None)
    if grid is None or not hasattr(grid, "get_pipe_parallel_group"):
        return None
    return grid if grid.get_pipe_parallel_world_size() > 1 else None


def stage_plan(
    model: torch.nn.Module, config: RigLConfig, grid: Any
) -> Tuple[Dict[str, torch.nn.Parameter], SparsityPlan]:
    """This stage's weights to sparsify and their plan, cut from the whole model's plan. Raises
    ``ValueError`` naming the key for patterns that match nothing on any stage, the ``global``
    distribution, masked weights tied across stages, and a stage with nothing to sparsify."""
    import torch.distributed as dist

    params = dict(model.named_parameters())
    local = {
        "stage": grid.get_stage_id(),
        "shapes": {n: global_shape(p) for n, p in params.items()},
        "default": default_sparse_weights(model) if config.modules is None else [],
    }
    stages: List[Dict[str, Any]] = [None] * grid.get_pipe_parallel_world_size()
    dist.all_gather_object(stages, local, group=grid.get_pipe_parallel_group())
    stages.sort(key=lambda s: s["stage"])
    shapes: Dict[str, Tuple[int, ...]] = {}
    for s in stages:
        for n, shape in s["shapes"].items():
            shapes.setdefault(n, tuple(shape))  # a tied module has the same name on each stage holding it
    if config.modules is None:
        chosen = list(dict.fromkeys(n for s in stages for n in s["default"]))
        if not chosen:
            raise ValueError("rigl.modules: the model has no Linear, Conv1D, conv or RNN weights to sparsify")
    else:
        chosen = weights_matching(config.modules, shapes)
    plan = build_plan(config, {n: shapes[n] for n in chosen})
    holders = {n: sum(n in s["shapes"] for s in stages) for n in shapes}
    tied = [layer.name for layer in plan.layers if holders[layer.name] > 1]
    if tied:
        raise ValueError(
            f"rigl.dense_layers: {tied[:3]} are tied across pipeline stages, whose masks rigl_ds cannot keep "
            "identical on every stage; list them in rigl.dense_layers (or leave them out of rigl.modules)"
        )
    mine = [layer.name for layer in plan.layers if layer.name in params]
    if not mine:
        raise ValueError(
            f"rigl.modules: pipeline stage {local['stage']} holds none of the weights to sparsify; rigl_ds "
            "needs at least one masked weight on every stage"
        )
    return {n: params[n] for n in mine}, plan.subset(mine)
