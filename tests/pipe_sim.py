"""Short pipeline-parallel DeepSpeed runs (``PipelineModule`` + ``engine.train_batch``) with a
"rigl" block on gloo ranks, returning what each pipeline stage holds."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

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


def train(
    stage: int,
    dtype: str,
    steps: int = 6,
    save_at: Optional[int] = None,
    save_dir: Optional[str] = None,
    load_dir: Optional[str] = None,
    watch_save: bool = False,
) -> Dict[str, Any]:
    """Runs on each gloo rank (one pipeline stage each): ``train_batch`` up to optimizer step
    ``steps``; ``save_at``: ``save_checkpoint(save_dir)`` after that step (what the stage held then is
    returned as ``at_save``); ``load_dir``: first ``load_checkpoint(load_dir)`` (its ``latest``), then
    on from the loaded step with the batches an uninterrupted run would have fed there. ``watch_save``:
    returns as ``save_events`` what was on disk when DeepSpeed's save returned and when ``latest`` was
    written."""
    events: List[Any] = []
    # Before the engine is built (SparseEngine keeps the save method it finds); undone after the run.
    restore = _watch_save(events) if watch_save else (lambda: None)
    try:
        return _train(stage, dtype, steps, save_at, save_dir, load_dir, events)
    finally:
        restore()


def _train(stage, dtype, steps, save_at, save_dir, load_dir, events) -> Dict[str, Any]:
    engine = build(stage, dtype)
    sparse = engine.rigl
    params = dict(engine.module.named_parameters())

    def masks() -> Dict[str, torch.Tensor]:
        return {s.layer.name: s.mask.detach().cpu().clone() for s in sparse.shards}  # dp = 1: whole masks

    start = 0
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
        start = engine.global_steps
    initial, per_step, violations, losses, at_save = masks(), [], [], [], None
    data = batches(steps * 2, torch.bfloat16 if dtype == "bf16" else torch.float32)
    for _ in range(start * 2):  # two micro-batches an optimizer step (gradient_accumulation_steps)
        next(data)
    for step in range(start, steps):
        losses.append(float(engine.train_batch(data)))  # the last stage's loss, broadcast to every stage
        now = masks()
        per_step.append(now)
        copies = {n: {"low_precision": params[n].detach().float(), "fp32": _fp32(params[n])} for n in now}
        violations.append(
            {(n, k): int((t.reshape(-1)[~now[n]] != 0).sum()) for n, c in copies.items() for k, t in c.items()}
        )
        if save_at is not None and step + 1 == save_at:
            engine.save_checkpoint(save_dir)
            at_save = {"masks": now, "weights": weights(params)}
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
        "losses": losses,
        "controller_step": sparse.controller.step,
        "final": weights(params),
        "optimizer_state": _optimizer_state(engine, params),
        "at_save": at_save,
        "save_events": events,
    }


def _watch_save(events: List[Any]) -> Callable[[], None]:
    """Records, on this rank, what of the checkpoint is on disk as DeepSpeed's save returns (this
    stage's DeepSpeed files written, rigl_ds's not yet) and as ``latest`` is written (rank 0)."""
    import functools
    import os

    import deepspeed

    from rigl_ds import checkpoint

    original_save, original_latest = deepspeed.DeepSpeedEngine.save_checkpoint, checkpoint.write_latest

    @functools.wraps(original_save)
    def deepspeed_save(self, save_dir, tag=None, *args, **kwargs):
        out = original_save(self, save_dir, tag, *args, **kwargs)
        tag_dir = os.path.join(save_dir, str(tag))
        record = os.path.exists(os.path.join(tag_dir, checkpoint.FOLDER, checkpoint.RECORD))
        latest = os.path.exists(os.path.join(save_dir, checkpoint.LATEST))
        events.append(("deepspeed_saved", {"latest": latest, "record": record}))
        return out

    def write_latest(save_dir, tag):
        events.append(("write_latest", checkpoint.is_complete(os.path.join(save_dir, tag))))
        return original_latest(save_dir, tag)

    deepspeed.DeepSpeedEngine.save_checkpoint = deepspeed_save
    checkpoint.write_latest = write_latest

    def restore() -> None:
        deepspeed.DeepSpeedEngine.save_checkpoint = original_save
        checkpoint.write_latest = original_latest

    return restore


def build(stage: int, dtype: str, num_stages: int = 2):
    """A ``PipelineModule`` of ``layers()`` cut into ``num_stages`` by its Linear layers, in a sparse
    DeepSpeed engine (ZeRO ``stage``); the ranks left over are data-parallel replicas."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    import rigl_ds

    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    model = PipelineModule(layers(), num_stages=num_stages, loss_fn=nn.MSELoss(), partition_method="type:Linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=ds_config(stage, dtype))
    return engine


def load_error(stage: int, dtype: str, load_dir: str, num_stages: int, then_module_only: bool = False):
    """What ``load_checkpoint(load_dir)`` raises in an engine of ``num_stages`` stages, and whether the
    weights were left as they were; ``then_module_only``: then what ``load_module_only=True`` loads."""
    engine = build(stage, dtype, num_stages)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    try:
        engine.load_checkpoint(load_dir)
    except Exception as exc:
        error = {"type": type(exc).__name__, "message": str(exc)}
    else:
        error = None
    unchanged = all(torch.equal(p.detach(), before[n]) for n, p in engine.module.named_parameters())
    out = {"error": error, "weights_unchanged": unchanged, "steps": engine.global_steps, "stage_id": engine.stage_id}
    if then_module_only:
        engine.load_checkpoint(load_dir, load_module_only=True)
        params = dict(engine.module.named_parameters())
        out["module_only"] = {
            "masks": {s.layer.name: s.mask.detach().clone() for s in engine.rigl.shards},
            "weights": weights(params),
        }
    return out


def weights(params: Dict[str, torch.nn.Parameter]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Every parameter of this stage (masked or not): the module's copy and the fp32 master."""
    return {n: {"low_precision": p.detach().float().clone(), "fp32": _fp32(p).clone()} for n, p in params.items()}


def _fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master through DeepSpeed's API where ZeRO/BF16_Optimizer keeps one; else the param."""
    from deepspeed.utils import safe_get_full_fp32_param

    if getattr(param, "_hp_mapping", None) is None:
        return param.detach().float()
    return safe_get_full_fp32_param(param)


def _optimizer_state(engine, params: Dict[str, torch.nn.Parameter]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Adam's moments of every parameter of this stage, through DeepSpeed's API where ZeRO/BF16_Optimizer
    keeps them, else from the torch optimizer."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {}
    for n, p in params.items():
        if getattr(p, "_hp_mapping", None) is not None:
            out[n] = {k: safe_get_full_optimizer_state(p, k).float().clone() for k in ("exp_avg", "exp_avg_sq")}
        else:
            state = engine.basic_optimizer.state[p]
            out[n] = {k: state[k].float().clone() for k in ("exp_avg", "exp_avg_sq")}
    return out


def train_many(runs) -> list:
    return [train(**kwargs) for kwargs in runs]


def run_many(calls) -> list:
    """Several ``(function name, kwargs)`` calls of this module, one after another in one set of ranks."""
    return [globals()[name](**kwargs) for name, kwargs in calls]
