"""Device correctness by construction (issue 15.3): collectives take their payloads on the backend's
device, and a mask meets every tensor on that tensor's device, whatever layout put it there.

No GPU runs here, so the checks run on fake_device's pretend accelerator: tensors that say they live
on another device and fail, as on a GPU, when an op mixes devices; and collectives that record every
payload's device and refuse one off the backend's device, as NCCL refuses a host tensor. The gloo
runs put the fp32 masters on the host and the low-precision copies and the backend on the
accelerator (``offload_optimizer`` under NCCL, review finding A1), and the converse, and must
reproduce the single-process reference bit for bit.
"""

import device_sim
import pytest
import sharded_sim
import torch
from fake_device import ACCEL, CPU, DeviceMismatch, FakeAccelerator, RecordedCollectives
from gloo import run_gloo
from helpers import TinyLM

import rigl_ds
from rigl_ds.config import load_config
from rigl_ds.masks import apply_masks, drop_and_grow, init_masks, mask_gradients
from rigl_ds.plan import build_plan
from rigl_ds.select.collectives import backend_device
from rigl_ds.shards import LocalCollectives, ParamRangeShard
from rigl_ds.topk import select_topk


def test_collectives_carry_the_current_accelerator_under_nccl_and_the_host_under_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert backend_device("nccl") == torch.device("cuda", 1)
    assert backend_device("cpu:gloo,cuda:nccl") == torch.device("cuda", 1)  # the accelerator's backend wins
    assert backend_device("gloo") == backend_device("mpi") == CPU  # host backends, even beside a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend_device("gloo") == CPU


def test_the_pretend_accelerator_refuses_what_a_gpu_refuses():
    with FakeAccelerator():
        weight = torch.ones(4, device=ACCEL)
        host_mask = torch.tensor([True, False, True, False])
        with pytest.raises(DeviceMismatch):
            torch.where(host_mask, weight, weight.new_zeros(()), out=weight)
        with pytest.raises(DeviceMismatch):
            weight.masked_fill_(host_mask, 0)
        weight.masked_fill_(~host_mask.to(ACCEL), 0)  # crossing explicitly is fine
        assert weight.tolist() == [1.0, 0.0, 1.0, 0.0] and weight.device == ACCEL
    nccl_like = RecordedCollectives(ACCEL)._wrap("all_reduce", lambda *args, **kwargs: None)
    with pytest.raises(DeviceMismatch, match="device type cpu"):
        nccl_like(torch.zeros(3))


class _OffloadedShard(ParamRangeShard):
    """A whole fp32 parameter on the host with a bf16 copy on the accelerator: offload in one process."""

    def __init__(self, layer, param, optimizer, low):
        super().__init__(layer, param, optimizer)
        self.low = low

    def extra_copies(self):
        return [self.low.view(-1)]


def test_masks_meet_the_low_precision_copy_on_its_own_device():
    config = load_config({"method": "rigl", "sparsity": 0.75, "grow_init": "random_normal"})
    plan = build_plan(config, {"fc.weight": (24, 10), "out.weight": (6, 24)})
    g = torch.Generator().manual_seed(0)
    params = {layer.name: torch.nn.Parameter(torch.randn(layer.shape, generator=g)) for layer in plan.layers}
    optimizer = torch.optim.Adam(params.values(), lr=0.01)
    with FakeAccelerator():
        shards = [
            _OffloadedShard(layer, params[layer.name], optimizer, params[layer.name].detach().to(ACCEL, torch.bfloat16))
            for layer in plan.layers
        ]
        comm = LocalCollectives()
        init_masks(shards, comm, plan.n_pools, plan.targets(0.75), seed=1, by_magnitude=False)
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        mask_gradients(shards)
        optimizer.step()
        apply_masks(shards)
        for p in params.values():  # the next step's dense gradients rank the growth
            p.grad = torch.randn(p.shape, generator=g)
        scores = [s.grad().abs() for s in shards]
        stats = drop_and_grow(shards, comm, plan.n_pools, 1, 0.3, scores, "random_normal", lambda s: 7)
        mask_gradients(shards)
        assert stats.grown > 0
        for s in shards:
            mask, low = s.mask, s.low.view(-1).to(CPU)
            assert s.mask_bits.device == CPU and s.low.device == ACCEL
            assert torch.equal(low, torch.where(mask, s.weight.to(torch.bfloat16), 0))  # zeros where masked
            assert not bool((s.grad() * ~mask).any())


@pytest.fixture(scope="module")
def story_runs():
    return run_gloo(2, "device_sim:rank_stories", device_sim.STORY_RUNS)


@pytest.fixture(scope="module")
def references():
    return {run: sharded_sim.reference(run) for run in device_sim.RUNS}


@pytest.mark.slow
@pytest.mark.parametrize("story", list(device_sim.STORIES))
def test_training_with_masters_and_copies_on_different_devices_matches_one_process(story, story_runs, references):
    _, master, _, comm_device = device_sim.STORIES[story]
    for run in device_sim.STORY_RUNS[story]:
        want = references[run]
        for r, per_rank in enumerate(story_runs):
            got = per_rank[f"{story}/{run}"]
            assert got["shard_devices"] == [str(master)], (story, run)  # empty fragments included
            assert got["calls"] and all(d == str(comm_device) for call in got["calls"] for d in call["devices"]), (
                story,
                run,
                got["calls"],
            )
            assert got["history"] == want["history"], (story, run)
            assert got["report"] == want["report"], (story, run)
            for name, (a, b) in got["ranges"].items():
                key = (story, run, name, r)
                assert torch.equal(got["masks"][name], want["masks"][name][a:b]), key
                assert torch.equal(got["weights"][name], want["weights"][name][a:b]), key
                if a == b:  # a ZeRO-1/2 rank holding none of the layer: no state, no copy to keep
                    assert got["states"][name] == [] and got["low"][name] == [], key
                    continue
                for g_state, w_state in zip(got["states"][name], want["states"][name], strict=True):
                    assert torch.equal(g_state, w_state[a:b]), key
                (low,) = got["low"][name]
                assert torch.equal(low, want["weights"][name][a:b].to(torch.bfloat16).float()), key


COMBOS = [("accel", "accel"), ("accel", "cpu"), ("cpu", "accel")]


@pytest.mark.slow
def test_selection_with_scores_and_backend_on_different_devices_equals_the_reference():
    cases = sharded_sim.random_selection_cases(seed=5, count=30, world=2)
    per_rank = run_gloo(2, "device_sim:rank_selections", cases, COMBOS)
    for score_device, comm_device in COMBOS:
        combo = f"{score_device}/{comm_device}"
        want_device = str(ACCEL if score_device == "accel" else CPU)
        for r in range(2):
            calls = per_rank[r][combo]["calls"]
            assert calls and all(
                d == str(ACCEL if comm_device == "accel" else CPU) for c in calls for d in c["devices"]
            )
        for c, case in enumerate(cases):
            layers = case["layers"]
            want = select_topk(
                [x["scores"] for x in layers], [x["pools"] for x in layers], case["k"], [x["eligible"] for x in layers]
            )
            for i, layer in enumerate(layers):
                got = torch.zeros(layer["scores"].numel(), dtype=torch.bool)
                for r, (a, b) in enumerate(layer["ranges"]):
                    result = per_rank[r][combo]["cases"][c]
                    assert result["devices"][i] == want_device, (combo, c, i)  # beside the scores
                    got[a:b] = result["chosen"][i]
                assert torch.equal(got, want[i]), (combo, c, i)


@pytest.mark.slow
def test_deepspeed_offload_views_meet_each_copy_on_its_device_and_choose_what_one_process_chooses():
    per_rank = run_gloo(2, "device_sim:rank_deepspeed_offload", [2, 3])
    for stage in (2, 3):
        for r, got in enumerate(rank[stage] for rank in per_rank):
            key = (stage, r)
            assert got["product_comm_device"] == "cpu", key  # gloo carries the host
            assert got["shard_devices"] == got["fragment_devices"] == ["cpu"], key  # offloaded masters
            assert got["copy_devices"] == [str(ACCEL)], key
            assert got["calls"] and all(d == str(ACCEL) for c in got["calls"] for d in c["devices"]), key
            assert got["grown"] > 0, key
            for name, (a, b) in got["ranges"].items():
                mask = got["masks"][name]
                assert torch.equal(mask, got["reference"][name][a:b]), (key, name)
                assert not bool((got["weights"][name] * ~mask).any()), (key, name)
                assert not bool((got["grads"][name] * ~mask).any()), (key, name)
                for low in got["low"][name]:
                    assert torch.equal(low, torch.where(mask, got["weights"][name].to(low.dtype), 0)), (key, name)


def _train_packed(device, block):
    """Eight steps of TinyLM under ``"storage": "packed"`` with the model on ``device``: losses,
    masks and the packed state (values and positions), on the host."""
    torch.manual_seed(0)
    model = TinyLM().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    block = {"sparsity": 0.8, "delta_t": 2, "end_step": 7, "storage": "packed", **block}
    sparse = rigl_ds.sparsify(model, optimizer, block)
    g = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(8):
        x = torch.randint(0, 40, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), ((x * 7 + 3) % 40).to(device))
        loss.backward()
        sparse.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach().to(CPU)))
    assert sparse.controller.updates == 4  # steps 0, 2, 4 and 6: slots written four times
    state = {k: v.detach().to(CPU) for k, v in model.state_dict().items()}
    return losses, {k: v.to(CPU) for k, v in sparse.masks.items()}, state


@pytest.mark.parametrize(
    "block",
    [
        {"method": "rigl", "skip_optimizer_step_on_update": False, "grow_candidate_fraction": 0.5},
        {"method": "set", "grow_init": "random_normal"},
        {"method": "snfs"},
    ],
    ids=["rigl-plus", "set-random-normal", "snfs"],
)
def test_packed_storage_trains_on_the_accelerator_as_on_the_host(monkeypatch, block):
    """Slots written on a new mask meet the values on their device (a grown entry's zero or drawn
    value was built on the host: CUDA's index_put_ refuses that)."""
    # Two limits of the pretend accelerator, not of the code: activation checkpointing looks up
    # torch.<device type> for its RNG state, and a wrapper tensor cannot follow parametrize's
    # in-place ``set_`` of the dense weight to the values (``swap_tensors`` instead).
    monkeypatch.setattr(torch, "lazy", type("NoRng", (), {"_initialized": False}), raising=False)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        want = _train_packed(CPU, block)
        with FakeAccelerator():
            got = _train_packed(ACCEL, block)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert got[0] == want[0]
    assert want[1].keys() == got[1].keys() and all(torch.equal(want[1][k], got[1][k]) for k in want[1])
    assert want[2].keys() == got[2].keys() and all(torch.equal(want[2][k], got[2][k]) for k in want[2])
    assert any("positions" in k for k in got[2])  # packed: the model holds values and positions

