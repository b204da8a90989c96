"""Compact optimizer state (rigl_ds.compact): Adam/AdamW moments only for active entries. With every
position stateful it is torch's Adam bit for bit; under masks it gives bit-identical weights to the
dense-state optimizer, in the plain path and under ZeRO 1, 2 and 3 on gloo ranks, and resumes."""

import pytest
import torch
from torch import nn

import rigl_ds
from rigl_ds.compact import CompactAdam, CompactAdamW, CompactSGD


def _pair(cls, seed=0, **kw):
    torch.manual_seed(seed)
    a = [torch.randn(37, 13, requires_grad=True), torch.randn(1001, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    return a, b, cls(a, lr=1e-2, **kw), CompactAdam.from_torch(cls(b, lr=1e-2, **kw))


def _step_both_with_the_same_gradients(a, b, oa, ob, steps):
    for _ in range(steps):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "cls,kw",
    [(torch.optim.Adam, {}), (torch.optim.Adam, {"weight_decay": 0.1}), (torch.optim.AdamW, {"weight_decay": 0.1})],
)
def test_with_every_position_stateful_it_is_torch_adam_bit_for_bit(cls, kw):
    a, b, oa, ob = _pair(cls, **kw)
    _step_both_with_the_same_gradients(a, b, oa, ob, steps=25)
    for x, y in zip(a, b):  # the same state layout as torch's
        assert set(ob.state[y]) == set(oa.state[x])
        assert all(torch.equal(ob.state[y][k], oa.state[x][k]) for k in oa.state[x])


@pytest.mark.parametrize(
    "kw",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        {"momentum": 0.5, "dampening": 0.2, "maximize": True},
        {},
    ],
)
def test_compact_sgd_with_every_position_stateful_is_torch_sgd_bit_for_bit(kw):
    torch.manual_seed(0)
    a = [torch.randn(37, 13, requires_grad=True), torch.randn(1001, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    oa, ob = torch.optim.SGD(a, lr=0.05, foreach=False, **kw), CompactSGD.from_torch(torch.optim.SGD(b, lr=0.05, **kw))
    _step_both_with_the_same_gradients(a, b, oa, ob, steps=10)
    assert all(set(ob.state[y]) == set(oa.state[x]) for x, y in zip(a, b))


def test_set_stateful_keeps_kept_positions_zeroes_new_ones_and_frees_dropped():
    p = torch.zeros(1000, requires_grad=True)  # 3 of 1000 stateful: int32 positions beat a bitmap
    opt = CompactAdam([p], lr=0.1)
    opt.set_stateful(p, torch.tensor([1, 3, 5]))
    p.grad = torch.arange(1000.0)
    opt.step()
    before = opt.state[p]["exp_avg"].clone()
    assert before.numel() == 3 and opt.state[p]["positions"].dtype == torch.int32
    assert bool((p.detach()[[0, 2, 4, 6, 7, 8, 9]] == 0).all())  # never stepped
    opt.set_stateful(p, torch.tensor([3, 5, 8]))  # 1 dropped, 8 grown
    m = opt.state[p]["exp_avg"]
    assert torch.equal(m[:2], before[1:]) and m[2] == 0
    assert opt.state[p]["exp_avg_sq"][2] == 0
    opt.set_stateful(p, None)  # back to torch's dense layout
    dense = opt.state[p]["exp_avg"]
    assert dense.shape == p.shape and "positions" not in opt.state[p]
    assert torch.equal(dense[[3, 5]], before[1:]) and int((dense != 0).sum()) == 2
    with pytest.raises(ValueError):
        opt.set_stateful(p, torch.tensor([5, 3]))


def test_the_stateful_set_is_a_bitmap_when_that_is_smaller_than_int32_positions_and_steps_the_same():
    torch.manual_seed(0)
    for density, layout in ((0.10, "bitmap"), (0.02, "positions")):
        mask = torch.rand(4096) < density
        p = torch.randn(4096).masked_fill_(~mask, 0).requires_grad_()
        q = p.detach().clone().requires_grad_()
        a, b = CompactAdam([p], lr=0.1), CompactAdam([q], lr=0.1)
        a.set_stateful(p, mask)  # chooses the layout
        b.set_stateful(q, mask.nonzero().view(-1))
        assert layout in a.state[p] and set(a.state[p]) == set(b.state[q])
        a.state[p], b.state[q] = {}, {}  # force the other layout on b: positions stored as given
        a.set_stateful(p, mask)
        b.state[q]["positions"] = mask.nonzero().view(-1).to(torch.int32)
        for step in range(5):
            g = torch.randn(4096, generator=torch.Generator().manual_seed(step))
            p.grad, q.grad = g.clone(), g.clone()
            a.step()
            b.step()
            assert torch.equal(p, q)
            assert torch.equal(a.state[p]["exp_avg"], b.state[q]["exp_avg"])
        assert bool((p.detach()[~mask] == 0).all())
        assert a.state_bytes() - 8 * int(mask.sum()) <= min(4096 // 8, 4 * int(mask.sum())) + 4


def _bf16_pair(mask, n=4096):
    torch.manual_seed(0)
    reference = torch.randn(n).bfloat16().float().masked_fill_(~mask, 0).requires_grad_()  # the fp32 master
    low = reference.detach().bfloat16().requires_grad_()
    ref_opt = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1, foreach=False)
    opt = CompactAdam.from_torch(
        torch.optim.AdamW([low], lr=1e-2, weight_decay=0.1, foreach=False), master_weights=True
    )
    return reference, low, ref_opt, opt


def _bf16_grads(step, mask):
    return torch.randn(mask.numel(), generator=torch.Generator().manual_seed(step)).bfloat16().masked_fill_(~mask, 0)


@pytest.mark.parametrize("density", [1.0, 0.1, 0.02])  # dense layout, bitmap, positions
def test_master_weights_step_in_fp32_and_round_into_the_low_precision_weight_as_zero_does(density):
    mask = torch.rand(4096, generator=torch.Generator().manual_seed(1)) < density
    reference, low, ref_opt, opt = _bf16_pair(mask)
    opt.set_stateful(low, mask)
    for step in range(20):
        g = _bf16_grads(step, mask)
        reference.grad, low.grad = g.float(), g.clone()
        ref_opt.step()
        opt.step()
        assert torch.equal(reference.detach().bfloat16(), low.detach()), step  # ZeRO copies bf16(master)
    state = opt.state[low]
    assert state["master"].dtype == state["exp_avg"].dtype == torch.float32
    assert torch.equal(state["master"].view(-1), reference.detach()[mask])
    assert torch.equal(opt.master_range(low, 100, 900), torch.where(mask, reference.detach(), 0)[100:1000])
    again = CompactAdam([low.detach().clone().requires_grad_()], lr=1e-2, master_weights=True)
    again.load_state_dict(opt.state_dict())  # torch would cast the state to bf16
    restored = next(iter(again.state.values()))
    assert all(restored[k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    assert torch.equal(restored["master"], state["master"])


def test_master_weights_of_grown_entries_start_from_the_weight_and_kept_ones_keep_their_master():
    mask = torch.arange(64) % 4 == 0
    reference, low, ref_opt, opt = _bf16_pair(mask, n=64)
    opt.set_stateful(low, mask)
    low.grad = _bf16_grads(0, mask)
    opt.step()
    kept_master = opt.state[low]["master"].clone()
    grown = torch.arange(64) % 4 == 1
    with torch.no_grad():
        low[grown] = torch.linspace(-1, 1, 16).bfloat16()  # a grow init written into the bf16 weight
    opt.set_stateful(low, mask | grown)
    full = opt.master_range(low, 0, 64)
    assert torch.equal(full[mask], kept_master)
    assert torch.equal(full[grown], low.detach()[grown].float())


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _plain_run(optimizer_cls, method, steps=60, save_at=None, state=None):
    torch.manual_seed(0)
    model = _MLP()
    opt = optimizer_cls(model.parameters(), lr=1e-2, weight_decay=0.01)
    cfg = {"method": method, "sparsity": 0.9, "delta_t": 5, "end_step": 45, "distribution": "uniform"}
    cfg["modules"] = ["fc1", "fc2"]
    sparse = rigl_ds.sparsify(model, opt, cfg)
    start, saved = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sparse.load_state_dict(state["sparse"])
        start = sparse.step_count
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        sparse.step()
        opt.zero_grad()
        if save_at is not None and step + 1 == save_at:
            saved = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sparse": sparse.state_dict()}
            saved = {k: _deep_clone(v) for k, v in saved.items()}
    return model, opt, sparse, saved


def _deep_clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _deep_clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_clone(v) for v in obj]
    return obj


def test_under_masks_compact_sgd_momentum_gives_bit_identical_weights_to_torch_sgd():
    def sgd(params, lr, weight_decay):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, foreach=False)

    def compact(params, lr, weight_decay):
        return CompactSGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)

    dense_model, _, dense_sparse, _ = _plain_run(sgd, "rigl")
    model, opt, sparse, _ = _plain_run(compact, "rigl")
    assert [h.grown for h in sparse.controller.history] == [h.grown for h in dense_sparse.controller.history]
    for (n, p), (_, q) in zip(model.named_parameters(), dense_model.named_parameters()):
        assert torch.equal(p, q), n
    for name, mask in sparse.masks.items():
        p = dict(model.named_parameters())[name]
        assert opt.state[p]["momentum_buffer"].numel() == int(mask.sum())


@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_under_masks_compact_state_gives_bit_identical_weights_to_dense_state(method):
    dense_model, dense_opt, dense_sparse, _ = _plain_run(torch.optim.AdamW, method)
    model, opt, sparse, _ = _plain_run(CompactAdamW, method)
    assert len(sparse.controller.history) >= 8  # updates at 0, 5, ..., 45
    assert [h.grown for h in sparse.controller.history] == [h.grown for h in dense_sparse.controller.history]
    assert all(h.grown > 0 and h.regrown >= 0 for h in sparse.controller.history[:-1])
    for (n, p), (_, q) in zip(model.named_parameters(), dense_model.named_parameters()):
        assert torch.equal(p, q), n
    for name, mask in sparse.masks.items():
        assert torch.equal(mask, dense_sparse.masks[name])
        p = dict(model.named_parameters())[name]
        st, dense_st = opt.state[p], dense_opt.state[dict(dense_model.named_parameters())[name]]
        assert "bitmap" in st and st["bitmap"].numel() == (mask.numel() + 7) // 8  # 10% active: bits beat int32
        assert torch.equal(opt.stateful_positions(p).long(), mask.view(-1).nonzero().view(-1))
        for key in ("exp_avg", "exp_avg_sq"):  # packed moments are the dense moments' active entries
            assert torch.equal(st[key], dense_st[key].view(-1)[mask.view(-1)])
            assert not bool(dense_st[key].view(-1)[~mask.view(-1)].any())
    assert opt.state_bytes() < 0.35 * sum(
        v.numel() * v.element_size() for s in dense_opt.state.values() for v in s.values()
    )


def test_a_checkpoint_round_trips_the_stateful_set_and_resumes_bit_identically():
    model, opt, sparse, saved = _plain_run(CompactAdamW, "rigl", save_at=23)
    assert any(v["bitmap"].dtype == torch.uint8 for v in saved["optimizer"]["state"].values() if "bitmap" in v)
    resumed, ropt, rsparse, _ = _plain_run(CompactAdamW, "rigl", state=saved)
    assert all(v.get("bitmap", torch.zeros(1, dtype=torch.uint8)).dtype == torch.uint8 for v in ropt.state.values())
    sets = [(opt.stateful_positions(p), ropt.stateful_positions(q)) for p, q in zip(opt.state, ropt.state)]
    assert sum(a is not None for a, _ in sets) == 2  # fc1 and fc2
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in sets)
    for (n, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    assert all(torch.equal(m, rsparse.masks[n]) for n, m in sparse.masks.items())


def test_the_flag_is_validated_and_other_optimizers_are_refused_before_deepspeed_starts():
    import ds_sim

    with pytest.raises(rigl_ds.RigLConfigError, match=r"rigl\.compact_optimizer_state"):
        rigl_ds.load_config({"compact_optimizer_state": "sometimes"})
    model = ds_sim.tiny_model("gpt2")
    block = {**ds_sim.RIGL, "compact_optimizer_state": True}
    with pytest.raises(rigl_ds.RigLConfigError, match=r"rigl\.compact_optimizer_state"):
        rigl_ds.initialize(
            model=model,
            optimizer=torch.optim.RMSprop(model.parameters(), lr=0.1),
            config=ds_sim.ds_config(2, "fp32", block),
        )
    with pytest.raises(rigl_ds.RigLConfigError, match=r"compact_master_weights needs compact_optimizer_state: true"):
        rigl_ds.load_config({"compact_master_weights": True})
    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    with pytest.raises(rigl_ds.RigLConfigError, match=r"rigl\.compact_master_weights: not with .*offload_optimizer"):
        rigl_ds.initialize(
            model=model,
            optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
            config=ds_sim.ds_config(2, "bf16", {**block, "compact_master_weights": True}, zero_optimization=offload),
        )
    with pytest.raises(rigl_ds.RigLConfigError, match=r"rigl\.compact_master_weights: needs bf16"):
        rigl_ds.initialize(
            model=model,
            optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
            config=ds_sim.ds_config(2, "fp32", {**block, "compact_master_weights": True}),
        )


# -- DeepSpeed on 2 gloo ranks ------------------------------------------------------------------------

DS_CASES = [(1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]
MASTER_STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    from gloo import run_gloo

    folder = str(tmp_path_factory.mktemp("compact_ckpt"))
    runs = []
    for stage, dtype in DS_CASES:
        runs += [dict(stage=stage, dtype=dtype, compact=False), dict(stage=stage, dtype=dtype, compact=True)]
    runs.append(dict(stage=1, dtype="fp32", compact=True, pass_compact=True))
    runs += [dict(stage=2, dtype="bf16", compact=compact, sgd=True) for compact in (False, True)]
    for stage in (2, 3):  # ZeRO-Offload: the torch optimizer steps the partitions on the CPU
        zero = {"stage": stage, "stage3_param_persistence_threshold": 0, "offload_optimizer": {"device": "cpu"}}
        runs += [
            dict(stage=stage, dtype="fp32", compact=c, zero_optimization=zero, zero_force_ds_cpu_optimizer=False)
            for c in (False, True)
        ]
    for stage in (2, 3):
        runs.append(dict(stage=stage, dtype="fp32", compact=True, save_at=5, save_dir=f"{folder}/s{stage}"))
        runs.append(dict(stage=stage, dtype="fp32", compact=True, load_dir=f"{folder}/s{stage}"))
    for stage in MASTER_STAGES:  # DeepSpeed scales bf16 gradients in bf16 when it clips: compare unclipped
        runs += [
            dict(stage=stage, dtype="bf16", compact=True, master=master, gradient_clipping=0.0) for master in (0, 1)
        ]
    runs.append(
        dict(stage=3, dtype="bf16", compact=True, master=1, gradient_clipping=0.0, save_at=5, save_dir=f"{folder}/m3")
    )
    runs.append(dict(stage=3, dtype="bf16", compact=True, master=1, gradient_clipping=0.0, load_dir=f"{folder}/m3"))
    per_rank = run_gloo(2, "compact_sim:train_many", runs, timeout=900)
    return runs, per_rank


@pytest.mark.slow
@pytest.mark.parametrize("stage,dtype", DS_CASES)
def test_zero_compact_state_gives_bit_identical_weights_and_exact_counts(ds_runs, stage, dtype):
    runs, per_rank = ds_runs
    i = runs.index(dict(stage=stage, dtype=dtype, compact=False))
    for rank in per_rank:
        dense, compact = rank[i], rank[i + 1]
        assert dense["optimizer"] == "AdamW" and compact["optimizer"] == "CompactAdam" and compact["packed"]
        assert len(compact["history"]) == 6 and compact["history"] == dense["history"]
        assert compact["pool_counts"] == compact["targets"] == dense["pool_counts"]
        for name, w in dense["weights"].items():
            assert torch.equal(compact["weights"][name], w), name
        for name, m in dense["masks"].items():
            assert torch.equal(compact["masks"][name], m), name
        assert compact["losses"] == dense["losses"]
        assert compact["state_bytes"] < 0.7 * dense["state_bytes"]


@pytest.mark.slow
def test_zero_accepts_a_compact_adamw_passed_directly(ds_runs):
    runs, per_rank = ds_runs
    i = runs.index(dict(stage=1, dtype="fp32", compact=True, pass_compact=True))
    j = runs.index(dict(stage=1, dtype="fp32", compact=True))
    for rank in per_rank:
        assert all(torch.equal(rank[i]["weights"][n], w) for n, w in rank[j]["weights"].items())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_compact_checkpoint_round_trips_and_continues_identically(ds_runs, stage):
    runs, per_rank = ds_runs
    straight = runs.index(dict(stage=stage, dtype="fp32", compact=True))
    resumed = [k for k, r in enumerate(runs) if r.get("load_dir", "").endswith(f"s{stage}")][0]
    for rank in per_rank:
        a, b = rank[straight], rank[resumed]
        assert len(b["losses"]) == 7 and b["losses"] == a["losses"][5:]
        assert b["history"] == a["history"][3:]  # updates at steps 6, 8, 10
        assert b["pool_counts"] == b["targets"] and b["packed"]
        for name, w in a["weights"].items():
            assert torch.equal(b["weights"][name], w), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", MASTER_STAGES)
def test_zero_compact_master_weights_give_the_fp32_master_runs_bf16_weights_masks_and_counts(ds_runs, stage):
    runs, per_rank = ds_runs
    i = runs.index(dict(stage=stage, dtype="bf16", compact=True, master=0, gradient_clipping=0.0))
    for rank in per_rank:
        fp32_master, compact = rank[i], rank[i + 1]
        assert compact["bf16_flags"] and not fp32_master["bf16_flags"]  # DeepSpeed's own master is bf16
        assert compact["masters"] > 0 and compact["packed"]
        assert compact["master_is_partition"] == (stage == 3) and not fp32_master["master_is_partition"]
        assert len(compact["history"]) == 6 and compact["history"] == fp32_master["history"]
        assert compact["pool_counts"] == compact["targets"]
        for name, m in fp32_master["masks"].items():
            assert torch.equal(compact["masks"][name], m), name
        for name, w in fp32_master["weights"].items():  # the bf16 weights ZeRO trains with
            assert torch.equal(compact["weights"][name], w.bfloat16().float()), name
        assert compact["losses"] == fp32_master["losses"]


@pytest.mark.slow
def test_zero3_compact_master_weights_checkpoint_round_trips_and_continues_identically(ds_runs):
    runs, per_rank = ds_runs
    straight = runs.index(dict(stage=3, dtype="bf16", compact=True, master=1, gradient_clipping=0.0))
    resumed = [k for k, r in enumerate(runs) if r.get("load_dir", "").endswith("m3")][0]
    for rank in per_rank:
        a, b = rank[straight], rank[resumed]
        assert len(b["losses"]) == 7 and b["losses"] == a["losses"][5:]
        assert b["history"] == a["history"][3:] and b["masters"] == a["masters"]
        for name, w in a["weights"].items():
            assert torch.equal(b["weights"][name], w), name


@pytest.mark.slow
def test_zero_compact_sgd_momentum_gives_bit_identical_weights(ds_runs):
    runs, per_rank = ds_runs
    i = runs.index(dict(stage=2, dtype="bf16", compact=False, sgd=True))
    for rank in per_rank:
        dense, compact = rank[i], rank[i + 1]
        assert dense["optimizer"] == "SGD" and compact["optimizer"] == "CompactSGD" and compact["packed"]
        assert compact["history"] == dense["history"] and compact["losses"] == dense["losses"]
        for name, w in dense["weights"].items():
            assert torch.equal(compact["weights"][name], w), name
        assert compact["state_bytes"] < 0.7 * dense["state_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_with_compact_state_gives_bit_identical_weights(ds_runs, stage):
    runs, per_rank = ds_runs
    i = next(
        k for k, r in enumerate(runs) if r["stage"] == stage and "offload_optimizer" in r.get("zero_optimization", {})
    )
    for rank in per_rank:
        dense, compact = rank[i], rank[i + 1]
        assert compact["optimizer"] == "CompactAdam" and compact["packed"] and not dense["packed"]
        assert compact["history"] == dense["history"] and compact["losses"] == dense["losses"]
        for name, w in dense["weights"].items():
            assert torch.equal(compact["weights"][name], w), name
        assert compact["state_bytes"] < 0.5 * dense["state_bytes"]
