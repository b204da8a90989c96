"""Short pipeline-parallel DeepSpeed runs (``PipelineModule`` + ``engine.train_batch``) with a
"rigl" block on gloo ranks, returning what each pipeline stage holds."""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

RIGL = {
    "method": "rigl",
    "sparsity": 0.8,
    "distribution": "erk",
    "delta_t": 2,
    "begin_step": 0,
    "end_step": 8,
    "seed": 3,
}
# Unequal shapes, so ERK's split of the budget over one stage's layers differs from its split over all four.
WIDTHS = [(16, 96), (96, 24), (24, 64), (64, 8)]


def layers() -> List[nn.Module]:
    """The model as a flat list: the same names ("0.weight", "2.weight", ...) in an ``nn.Sequential``
    and in a ``PipelineModule``."""
    out: List[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(WIDTHS):
        out.append(nn.Linear(fan_in, fan_out))
        if i + 1 < len(WIDTHS):
            out.append(nn.ReLU())
    return out


def ds_config(stage: int, dtype: str, rigl: Dict[str, Any] = None) -> Dict[str, Any]:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "rigl": rigl or RIGL,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def batches(n: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        x = torch.randn(2, WIDTHS[0][0], generator=g)
        yield x.to(dtype), torch.randn(2, WIDTHS[-1][1], generator=g).to(dtype)  # a pipeline does not cast


def train(stage: int, dtype: str, steps: int = 6) -> Dict[str, Any]:
    """Runs on each gloo rank (one pipeline stage each): ``steps`` calls of ``train_batch``."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    import rigl_ds

    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    model = PipelineModule(layers(), num_stages=2, loss_fn=nn.MSELoss(), partition_method="type:Linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=ds_config(stage, dtype))
    sparse = engine.rigl
    params = dict(engine.module.named_parameters())

    def masks() -> Dict[str, torch.Tensor]:
        return {s.layer.name: s.mask.detach().cpu().clone() for s in sparse.shards}  # dp = 1: whole masks

    initial, per_step, violations = masks(), [], []
    data = batches(steps * 2, torch.bfloat16 if dtype == "bf16" else torch.float32)
    for _ in range(steps):
        engine.train_batch(data)
        now = masks()
        per_step.append(now)
        copies = {n: {"low_precision": params[n].detach().float(), "fp32": _fp32(params[n])} for n in now}
        violations.append(
            {(n, k): int((t.reshape(-1)[~now[n]] != 0).sum()) for n, c in copies.items() for k, t in c.items()}
        )
    return {
        "stage_id": engine.stage_id,
        "layout": sparse.layout,
        "report": sparse.layer_report(),
        "targets": sparse.plan.targets(sparse.config.sparsity).tolist(),
        "pool_counts": sparse.controller.active_counts().tolist(),
        "history": [(h.step, h.dropped, h.grown) for h in sparse.history],
        "initial": initial,
        "masks": per_step,
        "violations": violations,
        "global_steps": engine.global_steps,
    }


def _fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master through DeepSpeed's API where ZeRO/BF16_Optimizer keeps one; else the param."""
    from deepspeed.utils import safe_get_full_fp32_param

    if getattr(param, "_hp_mapping", None) is None:
        return param.detach().float()
    return safe_get_full_fp32_param(param)


def train_many(runs) -> list:
    return [train(**kwargs) for kwargs in runs]
