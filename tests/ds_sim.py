"""Short DeepSpeed runs with a "rigl" block on gloo ranks, returning what each rank holds.

Every rank feeds the same batches, so the reduced gradients do not depend on the world size and a
world-size-1 run is the reference for masks taken at the first update (before any optimizer step
can make weights differ in the last bits across world sizes; see docs/deepspeed-notes)."""

from __future__ import annotations

from typing import Any, Dict

import torch

RIGL = {"method": "rigl", "sparsity": 0.8, "delta_t": 2, "begin_step": 0, "end_step": 8, "seed": 3}


def ds_config(stage: int, dtype: str, rigl: Dict[str, Any] = None, **extra) -> Dict[str, Any]:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if rigl is not None:
        cfg["rigl"] = rigl
    cfg.update(extra)
    return cfg


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    from rigl_ds.lm.models import build_model

    torch.manual_seed(seed)
    if family == "gpt2":
        zero = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic across a resume
        return build_model("gpt2", 64, n_layer=2, n_embd=32, n_head=2, n_positions=32, **zero)
    return build_model("word_lstm", 64, hidden=32, layers=1)


def batch(family: str, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 64, (2, 16), generator=g)


def full_masks(sparse) -> Dict[str, torch.Tensor]:
    """Test-only: every layer's whole mask, assembled from the ranks' shards with an all_reduce."""
    import torch.distributed as dist

    out = {}
    for sh in sparse.shards:
        whole = torch.zeros(sh.layer.numel, dtype=torch.int32)
        whole[sh.offset : sh.offset + sh.numel] = sh.mask.cpu().int()
        if sparse.layout != "whole":
            dist.all_reduce(whole)
        out[sh.layer.name] = whole.bool()
    return out


def full_copies(engine, stage: int, names) -> Dict[str, Dict[str, torch.Tensor]]:
    """Test-only, through DeepSpeed's own APIs (not rigl_ds's views): each masked weight's
    low-precision tensor, fp32 master and Adam moments, whole."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = dict(engine.module.named_parameters())
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    masters = {}
    opt = engine.optimizer
    if stage == 0 and hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        masters = {id(lp): m for g, mg in zip(opt.fp16_groups, opt.fp32_groups) for lp, m in zip(g, mg)}
    stepped = any(engine.basic_optimizer.state.values())
    for n in names:
        p = params[n]
        entry = {}
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                entry["low_precision"] = p.detach().clone().float()
        else:
            entry["low_precision"] = p.detach().clone().float()
        if stage == 0:
            master = masters.get(id(p), p)
            entry["fp32"] = master.detach().clone().float()
            for key, v in engine.basic_optimizer.state.get(master, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == master.shape:
                    entry[key] = v.clone().float()
        else:
            entry["fp32"] = safe_get_full_fp32_param(p).float()
            if stepped:
                for key in ("exp_avg", "exp_avg_sq"):
                    entry[key] = safe_get_full_optimizer_state(p, key).float()
        out[n] = {k: v.reshape(-1).cpu() for k, v in entry.items()}
    return out


def train(
    stage: int,
    dtype: str,
    family: str = "gpt2",
    steps: int = 6,
    rigl: Dict[str, Any] = None,
    save_at: int = None,
    save_dir: str = None,
    load_dir: str = None,
    keep_copies: bool = False,
    batches: list = None,
    inject_inf: tuple = None,
    **extra,
) -> Dict[str, Any]:
    """Runs on each gloo rank; returns this rank's shards, the whole masks after every step, and
    how many masked entries were non-zero in any copy of any weight after every step.

    ``batches``: which batch each step feeds (default: step i feeds batch i). ``inject_inf=(parameter
    name, step, rank)``: that parameter's gradient is inf on that rank at that step (an overflow)."""
    import rigl_ds
    from rigl_ds.lm.models import lm_loss

    model = tiny_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = rigl_ds.initialize(
        model=model, optimizer=optimizer, config=ds_config(stage, dtype, rigl or RIGL, **extra)
    )
    sparse = engine.rigl
    names = [sh.layer.name for sh in sparse.shards]
    managed = extra.get("managed_gradient_accumulation", True)
    accumulate = extra.get("gradient_accumulation_steps", 1)
    start = 0
    masks_at_load = None
    poison = {"on": False}
    if inject_inf is not None:
        import torch.distributed as dist

        target = names[0] if inject_inf[0] == "first_masked" else inject_inf[0]
        if dist.get_rank() == inject_inf[2]:
            dict(engine.module.named_parameters())[target].register_hook(
                lambda grad: torch.full_like(grad, float("inf")) if poison["on"] else None
            )
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
        start = engine.global_steps
        masks_at_load = full_masks(sparse)
    losses, masks_per_step, violations, copies_per_step, grad_norms = [], [], [], [], []
    for step in range(start, steps):
        x = batch(family, step if batches is None else batches[step])
        poison["on"] = inject_inf is not None and step == inject_inf[1]
        loss = lm_loss(engine, x)
        engine.backward(loss)
        if managed or (step + 1) % accumulate == 0:  # unmanaged: the script's step() is the boundary
            engine.step()
        poison["on"] = False
        losses.append(float(loss.detach()))
        norm = engine.get_global_grad_norm()
        grad_norms.append(None if norm is None else float(norm))
        masks = full_masks(sparse)
        masks_per_step.append(masks)
        copies = full_copies(engine, stage, names)
        if keep_copies:
            copies_per_step.append(copies)
        violations.append({(n, key): int((t[~masks[n]] != 0).sum()) for n in names for key, t in copies[n].items()})
        if save_at is not None and step + 1 == save_at:
            engine.save_checkpoint(save_dir)
    return {
        "layout": sparse.layout,
        "local_mask_entries": sum(sh.mask.numel() for sh in sparse.shards),
        "masked_entries": sum(sh.layer.numel for sh in sparse.shards),
        "report": sparse.layer_report(),
        "targets": sparse.plan.targets(sparse.config.sparsity).tolist(),
        "pool_counts": sparse.controller.active_counts().tolist(),
        "history": [(h.step, h.dropped, h.grown, h.regrown, h.n_active) for h in sparse.history],
        "collectives": [h.collectives for h in sparse.history],
        "losses": losses,
        "masks": masks_per_step,
        "violations": violations,
        "final": full_copies(engine, stage, names),
        "copies": copies_per_step,
        "masks_at_load": masks_at_load,
        "grad_norms": grad_norms,
        "skipped_steps": int(engine.skipped_steps),
        "controller_step": int(sparse.controller.step),
        "skipped_updates": int(sparse.controller.skipped_updates),
    }


def train_many(runs) -> list:
    """Several ``train`` calls, one after another, in one set of ranks (start-up paid once)."""
    return [train(**kwargs) for kwargs in runs]


def dense_without_block() -> Dict[str, Any]:
    """A config without "rigl": rigl_ds.initialize hands back DeepSpeed's engine untouched."""
    import deepspeed

    import rigl_ds
    from rigl_ds.lm.models import lm_loss

    model = tiny_model("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=ds_config(2, "fp32"))
    wrapped = hasattr(engine, "rigl") or "step" in vars(engine) or "step" in vars(engine.basic_optimizer)
    x = batch("gpt2", 0)
    engine.backward(lm_loss(engine, x))
    engine.step()
    zeros = sum(int((p.detach() == 0).sum()) for p in engine.module.parameters() if p.dim() > 1)
    return {"is_deepspeed_engine": isinstance(engine, deepspeed.DeepSpeedEngine), "wrapped": wrapped, "zeros": zeros}


def train_and_export(stage: int, dtype: str, folder: str) -> Dict[str, Any]:
    """Trains and saves on every rank; the test then exports the checkpoint in its own process."""
    return train(stage=stage, dtype=dtype, steps=5, save_at=5, save_dir=folder)
