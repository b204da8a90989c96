"""The main job: sparse-train a language model under DeepSpeed with the config's ``"rigl"`` block.

``launch/train_lm.py`` is the script users start with the ``deepspeed`` launcher; this module holds
the loop so tests and other scripts can call it. One DeepSpeed JSON holds everything: DeepSpeed's
own keys, the ``"rigl"`` block (absent: dense training) and the ``"job"`` block (``job.py``).

Under ZeRO stage 3 the model is built partitioned (``deepspeed.zero.Init``), so no rank ever holds
the whole model, and everything read from it afterwards (parameter counts, the FLOPs accounting,
rigl_ds's plan) comes from the parameters' full shapes; FLOPs are counted from the layers, not by a
forward pass.

Every rank reads the same deterministic batch order, keyed by optimizer step, so a run resumed from
a checkpoint sees the batches the uninterrupted run would have seen. Rank 0 writes the run folder:
``metrics.csv`` (one row per logged step), ``summary.json`` and ``layers.json`` at the end,
``checkpoints/`` (DeepSpeed's, with every rank's mask shard), and TensorBoard/CSV monitor events
wherever DeepSpeed's ``"tensorboard"`` / ``"csv_monitor"`` settings point.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .. import checkpoint  # noqa: E402
from ..adapter import UpdateWatch  # noqa: E402
from ..flops import DENSE, FlopsMeter, TrainingFlops, full_numel, weight_uses_per_token  # noqa: E402
from .data import lm_blocks, load_text, train_tokenizer  # noqa: E402
from .job import JobConfig, load_job  # noqa: E402
from .models import build_model, lm_loss  # noqa: E402

logger = logging.getLogger("rigl_ds")
CHECKPOINT_TAG = r"step\d+"  # the tags train() saves under

METRICS = (
    "step",
    "tokens",
    "loss",
    "perplexity",
    "lr",
    "drop_fraction",
    "itop_rate",  # rigl_ds.exploration: fraction of masked entries ever active
    "fan_in_cv_mean",  # std / mean of active inputs per output unit, averaged over masked layers
    "active_params",
    "total_params",
    "training_flops",
    "training_flops_vs_dense",
    "val_loss",
    "val_perplexity",
    "val_bits_per_char",
    "seconds",
)


def read_config(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _init_distributed() -> None:
    """A plain ``python launch/train_lm.py`` is one rank; under a launcher the env says who we are."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank0_first(fn):
    """Run ``fn`` on rank 0, then on the others: tokenizer training and ``datasets`` map caches are
    written once and read by the rest, instead of every rank racing to write the same files."""
    if dist.get_rank() == 0:
        out = fn()
        dist.barrier()
    else:
        dist.barrier()
        out = fn()
    return out


def _lr_lambda(job: JobConfig):
    def factor(step: int) -> float:
        if job.warmup_steps and step < job.warmup_steps:
            return (step + 1) / job.warmup_steps
        if job.lr_schedule == "constant":
            return 1.0
        span = max(1, job.steps - job.warmup_steps)
        t = min(1.0, (step - job.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if job.lr_schedule == "cosine" else 1.0 - t
        return job.min_lr_fraction + (1 - job.min_lr_fraction) * shape

    return factor


def _optimizer(job: JobConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if job.optimizer == "sgd":
        return torch.optim.SGD(params, lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay)
    cls = torch.optim.AdamW if job.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=job.lr, weight_decay=job.weight_decay)


@torch.no_grad()
def evaluate_distributed(engine, blocks, max_blocks: int, micro_batch: int) -> Dict[str, float]:
    """Validation loss, perplexity and bits per character over the first ``max_blocks`` blocks,
    split evenly over the ranks (every rank runs the same number of forwards, as ZeRO-3's
    parameter gathering requires) and summed with one all_reduce."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = max(1, min(len(blocks), max_blocks) // world)
    lo = min(rank * per_rank, len(blocks) - per_rank)
    device = engine.device
    sums = torch.zeros(3, dtype=torch.float64)  # nll, tokens, chars
    engine.eval()
    for i in range(lo, lo + per_rank, micro_batch):
        batch = blocks[i : min(i + micro_batch, lo + per_rank)]
        ids = batch["input_ids"].to(device)
        n = ids[:, 1:].numel()
        sums[0] += float(lm_loss(engine, ids)) * n
        sums[1] += n
        sums[2] += float(batch["chars"].sum()) * (ids.shape[1] - 1) / ids.shape[1]
    engine.train()
    sums = _all_reduce(sums, device)
    loss = float(sums[0] / sums[1])
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": float(sums[0] / math.log(2) / sums[2])}


@dataclass
class _Run:
    """What the phases of one training run share: the job, the world, the data, the engine."""

    job: JobConfig
    rank: int
    world: int
    out_dir: Path
    train_blocks: Any
    val_blocks: Any
    engine: Any
    sparse: Any
    method: str
    flops: FlopsMeter
    total_params: int
    micro: int
    accumulation: int
    layers: Optional[List[Dict[str, Any]]] = None
    masked_numel: int = 0
    exploration: Any = None  # rigl_ds.exploration.ExplorationTracker of a sparse run

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.micro * self.accumulation * self.world * self.job.seq_len

    def refresh_layers(self) -> None:
        self.layers = self.sparse.layer_report() if self.sparse else None
        if self.layers:
            self.masked_numel = sum(r["numel"] for r in self.layers)
        self.flops.refresh(self.layers)


def train(config: Dict[str, Any], overrides: Sequence[str] = (), resume: bool = False) -> Dict[str, Any]:
    """Trains per ``config`` (a DeepSpeed config dict with optional ``"rigl"`` and ``"job"``
    blocks); returns the final summary (on every rank)."""
    from rigl_ds.config import load_config

    job = load_job(config.get("job"), overrides)
    # Validate before anything is built or any rank starts work.
    rigl = load_config(config["rigl"]) if "rigl" in config else None
    rank, world = _start_ranks(job)
    run = _build(config, job, rigl, rank, world)
    start_step, tokens = _resume(run) if resume else (0, 0)
    run.refresh_layers()
    row, val, tokens = _train_loop(run, start_step, tokens, resume)
    return _finish(run, row, val, tokens)


def _start_ranks(job: JobConfig) -> tuple:
    _init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available():
        # CPU ranks share the cores: more intra-op threads than cores per rank makes each several times slower.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if rank == 0:
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(job.seed)
    return rank, world


def _build(config: Dict[str, Any], job: JobConfig, rigl, rank: int, world: int) -> _Run:
    """Data (tokenised by rank 0 first, cached), the model and the DeepSpeed engine with the rigl block."""
    import rigl_ds

    out_dir = Path(job.out_dir)
    text = _rank0_first(lambda: load_text(job.data, job.validation_fraction))
    cache = out_dir.parent / "cache"
    tokenizer = _rank0_first(lambda: train_tokenizer(text["train"], job.tokenizer_kind, job.vocab_size, cache))
    train_blocks = _rank0_first(lambda: lm_blocks(text["train"], tokenizer, job.seq_len + 1))
    val_blocks = _rank0_first(lambda: lm_blocks(text["validation"], tokenizer, job.seq_len + 1))

    ds_config = {k: v for k, v in config.items() if k != "job"}
    # ZeRO-3: built partitioned under zero.Init, so no rank ever holds the whole model.
    zero3_config = ds_config if zero_stage(ds_config) == 3 else None
    model = build_model(job.family, len(tokenizer), zero3_config=zero3_config, **job.model)
    method = rigl.method if rigl else DENSE
    flops = lm_flops_meter(model, method, rigl.delta_t if rigl else 1)
    total_params = sum(full_numel(p) for p in model.parameters())

    optimizer = None if "optimizer" in ds_config else _optimizer(job, model)
    scheduler = None
    if optimizer is not None and "scheduler" not in ds_config:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(job))
    engine, _, _, scheduler = rigl_ds.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, total_steps=job.steps
    )
    sparse = getattr(engine, "rigl", None)
    exploration = None
    if sparse is not None:
        from rigl_ds.exploration import ExplorationTracker
        from rigl_ds.fan_in import output_axes

        exploration = ExplorationTracker(sparse.controller, output_axes(model))
    # DeepSpeed resolves the batch keys (any two of train_batch_size, micro-batch, accumulation).
    return _Run(
        job=job,
        rank=rank,
        world=world,
        out_dir=out_dir,
        train_blocks=train_blocks,
        val_blocks=val_blocks,
        engine=engine,
        sparse=sparse,
        exploration=exploration,
        method=method,
        flops=flops,
        total_params=total_params,
        micro=engine.train_micro_batch_size_per_gpu(),
        accumulation=engine.gradient_accumulation_steps(),
    )


def zero_stage(ds_config: Dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no ``zero_optimization`` block)."""
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def lm_flops_meter(model: torch.nn.Module, method: str, delta_t: int) -> FlopsMeter:
    """FLOPs per token at each step's masks (the paper's accounting), counted from the model's
    layers and shapes, not by a forward: it works on ZeRO-3 partitioned weights of any size."""
    return FlopsMeter(model, weight_uses_per_token(model), 1, method, delta_t)


def _resume(run: _Run) -> tuple:
    """Loads the newest complete checkpoint; returns (optimizer step, tokens seen) it was saved at."""
    tag = _resume_tag(run.ckpt_dir, run.sparse is not None)
    _, client = run.engine.load_checkpoint(str(run.ckpt_dir), tag=tag)
    run.flops.spent = TrainingFlops(**client["training_flops"])
    return int(client["step"]), int(client["tokens"])


def _open_metrics(run: _Run, resume: bool, start_step: int):
    """Rank 0's ``metrics.csv`` writer (appending after a resume, from the resumed step on)."""
    if run.rank != 0:
        return None, None
    metrics_path = run.out_dir / "metrics.csv"
    fresh = not (resume and metrics_path.is_file())
    if not fresh:
        _drop_rows_after(metrics_path, start_step)
    handle = open(metrics_path, "w" if fresh else "a", newline="")
    writer = csv.DictWriter(handle, fieldnames=METRICS)
    if fresh:
        writer.writeheader()
    return handle, writer


def _train_loop(run: _Run, start_step: int, tokens: int, resume: bool) -> tuple:
    """The optimizer steps: micro-batches, FLOPs accounting, logging and evaluation, checkpoints."""
    from tqdm import tqdm

    job, engine = run.job, run.engine
    order = torch.randperm(len(run.train_blocks), generator=torch.Generator().manual_seed(job.seed))
    handle, writer = _open_metrics(run, resume, start_step)
    bar = tqdm(
        total=job.steps, initial=start_step, desc=run.method, disable=run.rank != 0, mininterval=1.0, dynamic_ncols=True
    )
    # Loss sum and micro-steps since the last log, kept on the device: no host sync per micro-step.
    window = torch.zeros(2, dtype=torch.float64, device=engine.device)
    started, row, val = time.time(), {}, None
    updates = UpdateWatch(run.sparse.controller) if run.sparse else None
    for step in range(start_step, job.steps):
        for m in range(run.accumulation):
            loss = _micro_step(run, order, step, m)
            window[0] += loss.detach().double()
            window[1] += 1.0
        tokens += run.tokens_per_step
        updated = updates is not None and updates.changed()
        if updated:
            run.refresh_layers()
        run.flops.add_step(updated, run.tokens_per_step)
        done = step + 1
        bar.update(1)
        evaluate_now = done == job.steps or (job.eval_every and done % job.eval_every == 0)
        if done % job.log_every == 0 or evaluate_now:
            row, val = _log(run, window, done, tokens, started, evaluate_now, writer, handle, bar)
        if (job.save_every and done % job.save_every == 0) or done == job.steps:
            _save(run, done, tokens)
    bar.close()
    if handle is not None:
        handle.close()
    return row, val, tokens


def _micro_step(run: _Run, order: torch.Tensor, step: int, m: int) -> torch.Tensor:
    engine, world, micro = run.engine, run.world, run.micro
    # Per-(step, micro, rank) seeding: dropout and friends replay exactly after a resume.
    torch.manual_seed(run.job.seed * 1_000_003 + (step * run.accumulation + m) * world + run.rank)
    first = ((step * run.accumulation + m) * world + run.rank) * micro
    idx = order[(first + torch.arange(micro)) % len(order)]
    ids = run.train_blocks[idx]["input_ids"].to(engine.device)
    loss = lm_loss(engine, ids)
    engine.backward(loss)
    engine.step()
    return loss


def _log(run: _Run, window, done, tokens, started, evaluate_now, writer, handle, bar) -> tuple:
    """One ``metrics.csv`` row (loss averaged over ranks and micro-steps since the last one)."""
    engine, sparse, layers = run.engine, run.sparse, run.layers
    reduced = _all_reduce(window, engine.device)
    loss_avg = float(reduced[0] / reduced[1])
    window.zero_()
    val = evaluate_distributed(engine, run.val_blocks, run.job.eval_blocks, run.micro) if evaluate_now else None
    active = run.total_params - run.masked_numel + (sum(r["active"] for r in layers) if layers else 0)
    explored = run.exploration.summary() if run.exploration is not None else {}  # a collective: every rank
    row = {
        "step": done,
        "tokens": tokens,
        "loss": loss_avg,
        "perplexity": math.exp(min(loss_avg, 50.0)),
        "lr": engine.get_lr()[0],
        "drop_fraction": sparse.controller.method.drop_fraction(sparse.controller.step) if sparse else 0.0,
        "itop_rate": explored.get("itop_rate", ""),
        "fan_in_cv_mean": explored.get("fan_in_cv_mean", ""),
        "active_params": active,
        "total_params": run.total_params,
        "training_flops": run.flops.spent.total,
        "training_flops_vs_dense": run.flops.spent.multiplier,
        "val_loss": val["loss"] if val else "",
        "val_perplexity": val["perplexity"] if val else "",
        "val_bits_per_char": val["bits_per_char"] if val else "",
        "seconds": round(time.time() - started, 2),
    }
    if run.rank == 0:
        writer.writerow(row)
        handle.flush()
        bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{row['lr']:.2e}", active=active)
        if val:
            bar.write(
                f"step {done}: train loss {loss_avg:.3f}, validation loss {val['loss']:.3f}, "
                f"perplexity {val['perplexity']:.2f}, {val['bits_per_char']:.3f} bits/char"
            )
    _monitor(engine, row, done)
    return row, val


def _save(run: _Run, done: int, tokens: int) -> None:
    client = {"step": done, "tokens": tokens, "training_flops": vars(run.flops.spent)}
    run.engine.save_checkpoint(str(run.ckpt_dir), tag=f"step{done}", client_state=client)
    if run.rank == 0:
        _prune_checkpoints(run.ckpt_dir, run.job.keep_checkpoints, run.sparse is not None)


def _finish(run: _Run, row: Dict[str, Any], val: Optional[Dict[str, float]], tokens: int) -> Dict[str, Any]:
    """``summary.json`` and ``layers.json`` (rank 0); the summary on every rank."""
    flops, sparse, job = run.flops, run.sparse, run.job
    summary = {
        "family": job.family,
        "method": run.method,
        "steps": job.steps,
        "world_size": run.world,
        "tokens": tokens,
        "final": row,
        "validation": val,
        "training_flops_vs_dense": flops.spent.multiplier,
        "inference_flops_vs_dense": (
            flops.report.inference_sparse / flops.report.inference_dense if flops.report.inference_dense else 1.0
        ),
        "total_params": run.total_params,
        "mask_updates": sparse.controller.updates if sparse else 0,
        "exploration": run.exploration.summary() if run.exploration is not None else None,
        "layers": run.layers or [],
    }
    if run.rank == 0:
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (run.out_dir / "layers.json").write_text(json.dumps(run.layers or [], indent=2))
        print(json.dumps({k: v for k, v in summary.items() if k != "layers"}, indent=2))
    return summary


def _all_reduce(t: torch.Tensor, device) -> torch.Tensor:
    """Sum over ranks on the engine's device (NCCL reduces only device tensors); the result on CPU."""
    out = t.to(device)
    dist.all_reduce(out)
    return out.cpu()


def _monitor(engine, row: Dict[str, Any], step: int) -> None:
    """Events through DeepSpeed's own monitors (TensorBoard, CSV, W&B), as its config enables them."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return
    events = [(f"Train/rigl_ds/{k}", float(v), step) for k, v in row.items() if k != "step" and v != ""]
    monitor.write_events(events)


def _drop_rows_after(metrics_path: Path, step: int) -> None:
    """Before a resume appends to ``metrics.csv``: drops the rows a killed run logged after the
    checkpoint it resumes from (and a row cut short by the kill), so each step is logged once, by the
    run whose state continues. Rewritten atomically: a second kill leaves the old file or the new."""
    with open(metrics_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if None not in r.values() and r["step"] and int(r["step"]) <= step]
    tmp = metrics_path.with_name(f".{metrics_path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, metrics_path)


def _resume_tag(ckpt_dir: Path, sparse: bool) -> Optional[str]:
    """The checkpoint to resume from: the newest complete one (rank 0 looks, every rank loads what
    it found), saying which newer ones it skipped and why. Dense runs save no rigl_ds state, hence no
    completeness record: they resume from DeepSpeed's ``latest``."""
    if not sparse:
        if not (ckpt_dir / "latest").is_file():
            raise FileNotFoundError(f"--resume: {ckpt_dir} holds no checkpoint ('latest' is missing)")
        return None
    found: List[Any] = [None, []]
    if dist.get_rank() == 0:
        found = list(checkpoint.newest_complete(str(ckpt_dir), pattern=CHECKPOINT_TAG))
    dist.broadcast_object_list(found, src=0)
    tag, skipped = found
    if dist.get_rank() == 0:
        for old, reason in skipped:
            logger.warning("--resume: skipping incomplete checkpoint %s: %s", old, reason)
    if tag is None:
        raise FileNotFoundError(f"--resume: {ckpt_dir} holds no complete checkpoint ({len(skipped)} incomplete)")
    if dist.get_rank() == 0:
        print(f"resuming from {ckpt_dir / tag}", flush=True)
    return tag


def _prune_checkpoints(ckpt_dir: Path, keep: int, sparse: bool = True) -> None:
    """Keeps the newest ``keep`` complete checkpoints. A checkpoint is deleted only once ``keep``
    newer complete ones exist, so the last complete one always outlives a newer incomplete one;
    incomplete ones older than the newest complete one are deleted, newer ones left to inspect.
    Dense runs have no completeness record: every tag counts as complete there."""
    tags = checkpoint.checkpoint_tags(str(ckpt_dir), CHECKPOINT_TAG)  # newest first
    if sparse:
        complete = [t for t in tags if checkpoint.is_complete(str(ckpt_dir / t), checksums=False)[0]]
    else:
        complete = tags
    if not complete:
        return
    newest = tags.index(complete[0])
    for i, old in enumerate(tags):
        if old in complete[:keep]:
            continue
        if i < newest:
            logger.warning("keeping incomplete checkpoint %s (newer than the newest complete, %s)", old, complete[0])
            continue
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
