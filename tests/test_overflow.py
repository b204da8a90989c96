"""A step DeepSpeed skips for an overflow is a step rigl_ds skips too: no mask update on it, no
advance of the update schedule, the update retried on the next applied step. So a run with one
overflowed step ends bit-identical to the same run that never saw that step's batch.

DeepSpeed's ZeRO-2/3 optimizers skip a step whose reduced gradients are not finite in bf16 as in
fp16 (fp16 itself is GPU-only; bench/gpu_check.py's fp16_overflow section runs it there). The inf
is put into one rank's gradient only, so the ranks must agree through a collective.
"""

import pytest
import torch
from gloo import run_gloo
from helpers import make, task, train_step

pytestmark = pytest.mark.slow

RIGL = {"method": "rigl", "sparsity": 0.8, "delta_t": 2, "begin_step": 0, "end_step": 8, "seed": 3}
AT = 2  # an update step: updates at 0, 2, 4, 6
STEPS = 8
CASES = [
    (stage, where, method)
    for stage in (2, 3)
    for where in ("transformer.wte.weight", "first_masked")  # outside the masked layers, and inside
    for method in ("rigl",)
] + [(3, "transformer.wte.weight", "snfs"), (2, "transformer.wte.weight", "set")]


def _runs():
    runs = []
    for stage, where, method in CASES:
        rigl = {**RIGL, "method": method}
        common = dict(stage=stage, dtype="bf16", rigl=rigl)
        runs.append(dict(**common, steps=STEPS, inject_inf=(where, AT, 1)))
        # The reference never sees the overflowed step's batch.
        kept = [b for b in range(STEPS) if b != AT]
        runs.append(dict(**common, steps=len(kept), batches=kept))
    return runs


@pytest.fixture(scope="module")
def overflow_runs():
    per_rank = run_gloo(2, "ds_sim:train_many", _runs())
    return [(per_rank[0][2 * i], per_rank[0][2 * i + 1], per_rank) for i in range(len(CASES))]


@pytest.mark.parametrize("case", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_an_overflow_step_is_skipped_by_deepspeed_and_rigl_ds_alike(overflow_runs, case):
    run, reference, per_rank = overflow_runs[case]
    assert run["skipped_steps"] == 1, "DeepSpeed itself must have skipped the poisoned step"
    assert reference["skipped_steps"] == 0
    # No mask change on the skipped step; the schedule did not count it.
    assert all(torch.equal(run["masks"][AT][n], run["masks"][AT - 1][n]) for n in run["masks"][AT])
    assert run["controller_step"] == STEPS - 1 == reference["controller_step"]
    assert [h[0] for h in run["history"]] == [h[0] for h in reference["history"]]
    assert run["pool_counts"] == run["targets"]
    # Bit-identical to the run that never saw the batch: masks, weights, fp32 masters, Adam moments.
    assert all(torch.equal(run["masks"][-1][n], reference["masks"][-1][n]) for n in reference["masks"][-1])
    for name, copies in reference["final"].items():
        for key, tensor in copies.items():
            assert torch.equal(run["final"][name][key], tensor), (name, key)
    # Both ranks agree (only rank 1 saw the inf).
    i = 2 * case
    assert per_rank[1][i]["history"] == run["history"] and per_rank[1][i]["controller_step"] == STEPS - 1


def test_snfs_observes_unscaled_gradients():
    """SNFS's moving average is of the true gradient: a loss-scaled gradient with the scale told to
    the controller gives the same average, bit for bit (powers of two scale exactly)."""
    first = _snfs_ema(1.0)
    scaled = _snfs_ema(1024.0)
    assert first.keys() == scaled.keys() and first
    assert all(torch.equal(first[k], scaled[k]) for k in first)


def _snfs_ema(scale):
    """Three SNFS steps where the gradients SNFS observes carry ``scale`` and the controller is told it."""
    model, opt, sparse = make({"method": "snfs", "delta_t": 100, "end_step": 200}, seed=0)
    sparse.controller.gradient_scale = lambda: scale
    x, y = task()
    observed = sparse.controller.method.observe_gradients

    def observe_scaled(shards, step):
        for s in shards:  # what SNFS sees before a loss scaler unscales: scale * gradient
            s.grad().mul_(scale)
        observed(shards, step)
        for s in shards:
            s.grad().div_(scale)

    sparse.controller.method.observe_gradients = observe_scaled
    for _ in range(3):
        train_step(model, opt, sparse, x, y)
    return sparse.controller.method.state_dict(sparse.shards)
