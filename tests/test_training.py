"""A tiny model trained a few hundred steps with each method: masks move (RigL, SET, SNFS), stay
(static) or shrink on schedule (GMP), and the loss falls. Plus resume from a checkpoint."""

import copy

import pytest
import torch
from helpers import make, task, train_step

from rigl_ds import bits, checkpoint

MASKED = ("fc1.weight", "fc2.weight")


@pytest.mark.parametrize("method", ["static", "set", "rigl", "snfs", "gmp"])
def test_each_method_trains_and_its_masks_behave(method):
    block = {"method": method, "sparsity": 0.9, "delta_t": 20, "end_step": 225}
    if method == "static":
        block = {"method": "static", "sparsity": 0.9}
    model, opt, sparse = make(block, total_steps=300, lr=5e-3)
    x, y = task(n=256)
    first = {n: m.clone() for n, m in sparse.masks.items()}
    first_counts = {n: int(m.sum()) for n, m in first.items()}
    losses = [train_step(model, opt, sparse, x, y) for _ in range(300)]
    moved = sum(int((first[n] != sparse.masks[n]).sum()) for n in MASKED)
    now = {n: int(m.sum()) for n, m in sparse.masks.items()}
    if method == "static":
        assert moved == 0 and not sparse.controller.history
    elif method == "gmp":
        assert all(now[n] < first_counts[n] for n in MASKED)
        assert sum(now.values()) <= 0.1 * sum(first_counts.values()) + len(MASKED)
    else:
        assert moved > 0 and now == first_counts
        assert len(sparse.controller.history) == len(range(0, 226, 20))
    early, late = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert late < 0.5 * early, (early, late)


@pytest.mark.parametrize("method", ["rigl", "snfs"])
def test_resume_from_a_checkpoint_is_bit_identical(method, tmp_path):
    block = {"method": method, "sparsity": 0.8, "delta_t": 7, "end_step": 60}
    x, y = task()
    model, opt, sparse = make(block, total_steps=80)
    for _ in range(25):
        train_step(model, opt, sparse, x, y)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rigl": sparse.state_dict()}, path)
    for _ in range(30):
        train_step(model, opt, sparse, x, y)

    model2, opt2, sparse2 = make(
        {**block, "seed": 99}, seed=123, total_steps=80
    )  # other masks and weights until loaded
    ckpt = torch.load(path, weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sparse2.load_state_dict(ckpt["rigl"])
    assert sparse2.step_count == 25
    for _ in range(30):
        train_step(model2, opt2, sparse2, x, y)
    for n in MASKED:
        assert torch.equal(sparse.masks[n], sparse2.masks[n])
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_a_checkpoint_with_drifted_counts_is_refused():
    model, opt, sparse = make({"end_step": 50})
    state = copy.deepcopy(sparse.state_dict())
    mask = checkpoint.saved_mask(state, "fc1.weight")
    mask[:5] = True
    mask[5:10] = ~mask[5:10]
    state["masks"]["fc1.weight"] = bits.pack(mask)
    with pytest.raises(RuntimeError, match="drifted"):
        sparse.load_state_dict(state)
