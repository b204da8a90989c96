"""One mask update and the steps between updates, as rigl-spec.md states them."""

import copy
import math

import pytest
import torch
from helpers import TinyLM, layer_states, make, task, train_step
from torch import nn

import rigl_ds
from rigl_ds.masks import drop_and_grow
from rigl_ds.plan import LayerPlan
from rigl_ds.shards import LocalCollectives, WholeTensorShard

MASKED = ("fc1.weight", "fc2.weight")


def counts(sparse):
    return {name: int(m.sum()) for name, m in sparse.masks.items()}


def test_masks_start_with_exactly_floor_s_n_zeros_per_layer():
    model, opt, sparse = make({"sparsity": 0.8, "distribution": "erk", "end_step": 100})
    targets = sparse.plan.unit_sparsities(0.8)
    for name, mask in sparse.masks.items():
        assert int((~mask).sum()) == math.floor(targets[name] * mask.numel())
    params = dict(model.named_parameters())
    for name, mask in sparse.masks.items():
        assert torch.all(params[name][~mask] == 0)


def test_masks_are_identical_for_the_same_seed_and_differ_for_another():
    _, _, a = make({"seed": 3, "end_step": 100}, seed=0)
    _, _, b = make({"seed": 3, "end_step": 100}, seed=1)  # other weights: the random mask does not depend on them
    _, _, c = make({"seed": 4, "end_step": 100}, seed=0)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in MASKED)
    assert not all(torch.equal(a.masks[n], c.masks[n]) for n in MASKED)


@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_active_counts_never_drift_over_hundreds_of_updates(method, distribution):
    model, opt, sparse = make(
        {
            "method": method,
            "distribution": distribution,
            "sparsity": 0.9,
            "delta_t": 1,
            "end_step": 400,
            "drop_fraction_schedule": "constant",
        }
    )
    x, y = task()
    start = counts(sparse)
    changed = 0
    for _ in range(300):
        before = {n: m.clone() for n, m in sparse.masks.items()}
        train_step(model, opt, sparse, x, y)
        assert counts(sparse) == start
        changed += sum(int((before[n] != sparse.masks[n]).sum()) for n in MASKED)
    assert len(sparse.controller.history) == 300
    assert changed > 0


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_grown_entries_start_at_zero_weight_and_zero_optimizer_state(optimizer):
    model, opt, sparse = make({"method": "rigl", "delta_t": 50, "begin_step": 5, "end_step": 200}, optimizer=optimizer)
    x, y = task()
    for _ in range(5):
        train_step(model, opt, sparse, x, y)
    params = dict(model.named_parameters())
    old = {n: m.clone() for n, m in sparse.masks.items()}
    w_before = {n: params[n].detach().clone() for n in MASKED}
    s_before = {n: layer_states(opt, params[n]) for n in MASKED}
    assert all(s_before[n] for n in MASKED)
    train_step(model, opt, sparse, x, y)  # step 5: the update; the optimizer step is skipped
    assert sparse.controller.history[-1].step == 5
    grown_total = 0
    for n in MASKED:
        new = sparse.masks[n]
        grown, kept, dropped = new & ~old[n], new & old[n], old[n] & ~new
        grown_total += int(grown.sum())
        w = params[n].detach()
        assert torch.all(w[grown] == 0)
        assert torch.equal(w[kept], w_before[n][kept])  # untouched: the step was skipped
        assert torch.all(w[dropped] == 0)
        for key, state in layer_states(opt, params[n]).items():
            assert torch.all(state[grown] == 0), key
            assert torch.all(state[dropped] == 0), key
            assert torch.equal(state[kept], s_before[n][key][kept]), key
    assert grown_total > 0


def test_dropped_and_regrown_entries_keep_their_weight_and_state():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(20, 10))
    opt = torch.optim.Adam([weight], lr=0.1)
    weight.grad = torch.randn_like(weight)
    opt.step()  # non-zero Adam state everywhere
    layer = LayerPlan("w", (20, 10))
    shard = WholeTensorShard(layer, weight, opt)
    shard.mask = torch.arange(200) % 2 == 0
    weight.data.view(-1)[~shard.mask] = 0
    weight.grad = torch.where(shard.mask.view(20, 10), 1.0, 0.0)  # dropped entries have the largest gradients
    w_before, s_before = weight.detach().clone(), layer_states(opt, weight)
    mask_before = shard.mask.clone()
    stats = drop_and_grow(
        [shard], LocalCollectives(), 1, step=0, drop_fraction=0.3, grow_scores=[weight.grad.view(-1).abs()]
    )
    assert stats.regrown == int(0.3 * 100) and stats.grown == 0 and stats.dropped == 0
    assert torch.equal(shard.mask, mask_before)
    assert torch.equal(weight.detach(), w_before)
    for key, state in layer_states(opt, weight).items():
        assert torch.equal(state, s_before[key]), key


def test_drop_never_keeps_an_inactive_entry_and_k_is_truncated():
    weight = nn.Parameter(torch.zeros(7, 9))  # every |w| ties at 0, active and inactive alike
    layer = LayerPlan("w", (7, 9))
    shard = WholeTensorShard(layer, weight, None)
    shard.mask = torch.arange(63) >= 40  # the active entries have the highest indices
    before = shard.mask.clone()
    weight.grad = torch.zeros_like(weight)
    stats = drop_and_grow([shard], LocalCollectives(), 1, step=0, drop_fraction=0.37, grow_scores=[torch.zeros(63)])
    k = 8  # int(0.37 * 23 = 8.51): truncation, not rounding
    assert stats.dropped + stats.regrown == k
    # Ties go to the lowest index: the drop keeps the first 15 active entries (indices 40..54); growth
    # takes the k lowest-index entries not kept (0..7), all of them previously inactive.
    expected = torch.zeros(63, dtype=torch.bool)
    expected[40:55] = True
    expected[:k] = True
    assert torch.equal(shard.mask, expected)
    assert int(shard.mask.sum()) == int(before.sum())


def test_updates_are_deterministic():
    runs = []
    for _ in range(2):
        model, opt, sparse = make({"method": "set", "delta_t": 3, "end_step": 60})
        x, y = task()
        for _ in range(30):
            train_step(model, opt, sparse, x, y)
        runs.append((sparse.masks, dict(model.named_parameters())))
    for n in MASKED:
        assert torch.equal(runs[0][0][n], runs[1][0][n])
        assert torch.equal(runs[0][1][n], runs[1][1][n])


def test_rigl_grows_where_the_dense_gradient_is_largest():
    model, opt, sparse = make({"method": "rigl", "delta_t": 10, "end_step": 100})
    x, y = task()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    params = dict(model.named_parameters())
    grad = {n: params[n].grad.detach().abs().clone() for n in MASKED}
    old = {n: m.clone() for n, m in sparse.masks.items()}
    sparse.step()
    for n in MASKED:
        grown = sparse.masks[n] & ~old[n]
        not_chosen = ~sparse.masks[n] & ~old[n]
        assert grown.any()
        assert float(grad[n][grown].min()) >= float(grad[n][not_chosen].max())


def test_rigl_skips_the_optimizer_step_on_update_steps_by_default_and_not_when_told():
    for skip in (True, False):
        model, opt, sparse = make(
            {"method": "rigl", "delta_t": 100, "end_step": 200, "skip_optimizer_step_on_update": skip}
        )
        x, y = task()
        before = copy.deepcopy(model.state_dict())
        train_step(model, opt, sparse, x, y)  # step 0 is an update step
        assert len(sparse.controller.history) == 1
        moved = not torch.equal(before["fc2.bias"], model.state_dict()["fc2.bias"])  # a dense parameter
        assert moved is (not skip)
        assert (len(opt.state) > 0) is (not skip)


def test_set_and_snfs_step_first_then_update():
    for method in ("set", "snfs"):
        model, opt, sparse = make({"method": method, "delta_t": 100, "end_step": 200})
        x, y = task()
        train_step(model, opt, sparse, x, y)
        assert len(sparse.controller.history) == 1 and len(opt.state) > 0


def test_non_finite_gradients_skip_the_update_and_change_nothing():
    model, opt, sparse = make({"method": "rigl", "delta_t": 10, "begin_step": 2, "end_step": 100})
    x, y = task()
    for _ in range(2):
        train_step(model, opt, sparse, x, y)
    params = dict(model.named_parameters())
    masks = {n: m.clone() for n, m in sparse.masks.items()}
    weights = copy.deepcopy(model.state_dict())
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    params["fc1.weight"].grad[0, 0] = float("inf")
    sparse.step()
    opt.zero_grad()
    assert sparse.controller.skipped_updates == 1 and not sparse.controller.history
    assert all(torch.equal(masks[n], sparse.masks[n]) for n in MASKED)
    assert all(torch.equal(weights[n], params[n].detach()) for n in MASKED)
    train_step(model, opt, sparse, x, y)  # retried on the next step
    assert [h.step for h in sparse.controller.history] == [3]


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_between_updates_masked_gradients_are_zeroed_and_masked_weights_stay_exactly_zero(optimizer):
    model, opt, sparse = make({"method": "static", "sparsity": 0.9}, optimizer=optimizer)
    params = dict(model.named_parameters())
    x, y = task()
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sparse.step()
        for n in MASKED:
            off = ~sparse.masks[n]
            assert torch.all(params[n].grad[off] == 0)
            assert torch.all(params[n].detach()[off] == 0)
            for key, state in layer_states(opt, params[n]).items():
                assert torch.all(state[off] == 0), key
        opt.zero_grad()


class DriftingSGD(torch.optim.Optimizer):
    """Moves every entry, gradient or not (as noise injection or a stale dense state would)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"]).add_(1e-3)


def test_masked_weights_are_zero_after_the_step_even_if_the_optimizer_moves_them():
    torch.manual_seed(0)
    model = TinyLM()
    opt = DriftingSGD(model.parameters())
    sparse = rigl_ds.sparsify(model, opt, {"method": "static", "sparsity": 0.9})
    params = dict(model.named_parameters())
    x, y = task()
    for _ in range(3):
        train_step(model, opt, sparse, x, y)
        for n in MASKED:
            assert torch.all(params[n].detach()[~sparse.masks[n]] == 0)
        assert torch.all(params["head.weight"] != 0)  # dense layers are left alone


def test_snfs_grows_by_the_moving_average_of_dense_gradients():
    model, opt, sparse = make(
        {"method": "snfs", "delta_t": 100, "begin_step": 3, "end_step": 200, "grad_ema_decay": 0.9}
    )
    params = dict(model.named_parameters())
    x, y = task()
    ema = {n: torch.zeros(params[n].numel()) for n in MASKED}
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for n in MASKED:
            ema[n] = 0.9 * ema[n] + 0.1 * params[n].grad.detach().view(-1)
        sparse.step()
        opt.zero_grad()
    for n in MASKED:
        assert torch.allclose(sparse.controller.method._ema[n], ema[n], atol=1e-7)


def test_mask_groups_keep_exact_counts_per_block():
    model, opt, sparse = make(
        {
            "method": "rigl",
            "sparsity": 0.8,
            "delta_t": 2,
            "end_step": 200,
            "distribution": "uniform",
            "mask_groups": {"fc1": {"axis": 0, "blocks": 3}},
        }
    )
    x, y = task()
    for _ in range(40):
        train_step(model, opt, sparse, x, y)
        blocks = sparse.masks["fc1.weight"].view(3, 32, 48)  # fc1: (96, 48), 3 blocks of 32 rows
        assert [int(b.sum()) for b in blocks] == [32 * 48 - math.floor(0.8 * 32 * 48)] * 3
    assert len(sparse.controller.history) == 20


def test_global_distribution_fixes_the_total_and_lets_layers_trade():
    model, opt, sparse = make(
        {
            "method": "rigl",
            "distribution": "global",
            "sparsity": 0.8,
            "delta_t": 1,
            "end_step": 200,
            "drop_fraction_schedule": "constant",
        }
    )
    x, y = task()
    total = sum(counts(sparse).values())
    assert total == sum(48 * 96 - math.floor(0.8 * 48 * 96) for _ in MASKED)
    per_layer = []
    for _ in range(50):
        train_step(model, opt, sparse, x, y)
        assert sum(counts(sparse).values()) == total
        per_layer.append(tuple(counts(sparse).values()))
    assert len(set(per_layer)) > 1


def test_gmp_shrinks_masks_on_its_cubic_schedule():
    model, opt, sparse = make(
        {"method": "gmp", "sparsity": 0.9, "delta_t": 10, "begin_step": 10, "end_step": 110, "distribution": "uniform"}
    )
    x, y = task()
    n = 48 * 96
    assert counts(sparse) == {m: n for m in MASKED}  # dense at the start
    seen = []
    for t in range(130):
        train_step(model, opt, sparse, x, y)
        seen.append(counts(sparse)["fc1.weight"])
        if t >= 10 and (t - 10) % 10 == 0 and t <= 110:
            s = rigl_ds.gmp_sparsity(t, 0.9, 0.0, 10, 110)
            assert seen[-1] == n - math.floor(s * n), t
    assert seen[-1] == n - math.floor(0.9 * n)
    assert all(b <= a for a, b in zip(seen, seen[1:]))


def test_random_normal_grow_init_draws_with_the_layer_std():
    model, opt, sparse = make(
        {"method": "set", "delta_t": 5, "begin_step": 1, "end_step": 100, "grow_init": "random_normal"}
    )
    x, y = task()
    train_step(model, opt, sparse, x, y)
    params = dict(model.named_parameters())
    old = sparse.masks["fc1.weight"].clone()
    w = params["fc1.weight"].detach()
    std = float(w.std(unbiased=False))
    train_step(model, opt, sparse, x, y)
    grown = sparse.masks["fc1.weight"] & ~old
    values = params["fc1.weight"].detach()[grown]
    assert grown.sum() > 50 and torch.all(values != 0)
    assert 0.5 * std < float(values.std()) < 1.5 * std


@pytest.mark.parametrize("method", ["rigl", "set", "static", "gmp"])
def test_between_updates_backward_leaves_masked_gradients_zero_so_clipping_sees_the_sparse_model(method):
    block = {"method": method, "delta_t": 5, "begin_step": 1, "end_step": 100}
    if method == "static":
        block = {"method": "static"}
    if method == "gmp":
        block["initial_sparsity"] = 0.5  # GMP starts dense by default: nothing would be masked yet
    model, opt, sparse = make(block)
    assert all((~m).any() for m in sparse.masks.values())
    params = dict(model.named_parameters())
    x, y = task()
    for step in range(7):
        nn.functional.cross_entropy(model(x), y).backward()
        update = method == "rigl" and step in (1, 6)
        for n in MASKED:
            masked_grads = params[n].grad[~sparse.masks[n]]
            if update:  # RigL reads the dense gradient on its update steps
                assert masked_grads.abs().sum() > 0
            else:
                assert torch.all(masked_grads == 0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        sparse.step()
        opt.zero_grad()


def test_snfs_reads_dense_gradients_on_every_step():
    model, opt, sparse = make({"method": "snfs", "delta_t": 5, "end_step": 100})
    params = dict(model.named_parameters())
    x, y = task()
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        assert params["fc1.weight"].grad[~sparse.masks["fc1.weight"]].abs().sum() > 0
        sparse.step()
        opt.zero_grad()


def test_a_skipped_optimizer_step_does_not_upset_lr_schedulers(recwarn):
    model, opt, sparse = make({"method": "rigl", "delta_t": 10, "end_step": 100}, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = task()
    for _ in range(4):
        train_step(model, opt, sparse, x, y)
        sched.step()
    assert not [w for w in recwarn.list if "lr_scheduler.step()" in str(w.message)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_gradients_set_without_backward_are_still_masked_before_the_step():
    model, opt, sparse = make({"method": "static"})
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # no backward: the gradient hooks never ran
    sparse.step()
    for n in MASKED:
        assert torch.all(params[n].grad[~sparse.masks[n]] == 0)
        assert torch.all(params[n].detach()[~sparse.masks[n]] == 0)


def test_an_update_before_a_real_step_masks_gradients_under_the_new_mask():
    model, opt, sparse = make(
        {"method": "rigl", "delta_t": 3, "begin_step": 2, "end_step": 50, "skip_optimizer_step_on_update": False}
    )
    params = dict(model.named_parameters())
    x, y = task()
    for _ in range(2):
        train_step(model, opt, sparse, x, y)
    old = {n: m.clone() for n, m in sparse.masks.items()}
    nn.functional.cross_entropy(model(x), y).backward()
    sparse.step()  # step 2: update first (dense gradients), then the optimizer step under the new masks
    assert sparse.controller.history[-1].step == 2
    for n in MASKED:
        assert not torch.equal(old[n], sparse.masks[n])
        off = ~sparse.masks[n]
        assert torch.all(params[n].grad[off] == 0)
        assert torch.all(params[n].detach()[off] == 0)
        for key, state in layer_states(opt, params[n]).items():
            assert torch.all(state[off] == 0), key


def test_controller_remasks_gradients_after_an_update_even_if_the_adapter_masked_them():
    # Contract for adapters: grads_already_masked refers to the masks before this step's update.
    model, opt, sparse = make({"method": "rigl", "delta_t": 5, "end_step": 50, "skip_optimizer_step_on_update": False})
    params = dict(model.named_parameters())
    x, y = task()
    nn.functional.cross_entropy(model(x), y).backward()
    ctrl = sparse.controller
    assert ctrl.before_step(grads_already_masked=True)  # step 0: update, then the optimizer may step
    assert ctrl.was_update_step
    for n in MASKED:
        assert torch.all(params[n].grad[~sparse.masks[n]] == 0)


def test_dense_layers_get_no_mask_and_custom_layers_keep_their_exact_sparsity():
    model, opt, sparse = make({"sparsity": 0.3, "distribution": "erk", "dense_layers": ["fc2"], "end_step": 50})
    assert list(sparse.masks) == ["fc1.weight"]  # fc2 is dense: no mask at all
    n = 48 * 96
    # fc1 pays for fc2's share: (n - floor(0.3 n)) - floor(0.3 n) = 1844 active, up to the floor rounding
    assert abs(int(sparse.masks["fc1.weight"].sum()) - 1844) <= 1
    with pytest.raises(rigl_ds.RigLConfigError, match="whole parameter budget"):
        make({"sparsity": 0.5, "dense_layers": ["fc2"], "end_step": 50})  # fc1 would get nothing
    model, opt, sparse = make({"sparsity": 0.9, "custom_sparsity": {"fc2": 0.5}, "end_step": 50, "delta_t": 1})
    x, y = task()
    for _ in range(5):
        train_step(model, opt, sparse, x, y)
        assert int((~sparse.masks["fc2.weight"]).sum()) == math.floor(0.5 * n)
        assert int((~sparse.masks["fc1.weight"]).sum()) == math.floor(0.9 * n)  # alone in the budget


def test_gmp_under_the_global_distribution_prunes_one_pool_to_the_overall_target():
    model, opt, sparse = make(
        {"method": "gmp", "distribution": "global", "sparsity": 0.8, "delta_t": 5, "end_step": 30}
    )
    x, y = task()
    for _ in range(35):
        train_step(model, opt, sparse, x, y)
    n = 48 * 96
    assert sum(counts(sparse).values()) == 2 * (n - math.floor(0.8 * n))


@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "gmp"])
def test_a_bf16_model_keeps_exact_counts_and_exact_zeros(method):
    block = {"method": method, "sparsity": 0.8, "delta_t": 3, "end_step": 30}
    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparse = rigl_ds.sparsify(model, opt, block, total_steps=40)
    params = dict(model.named_parameters())
    x, y = task()
    start = counts(sparse)
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        sparse.step()
        opt.zero_grad()
        for n in MASKED:
            assert torch.all(params[n].detach()[~sparse.masks[n]] == 0)
            for key, state in layer_states(opt, params[n]).items():
                assert torch.all(state[~sparse.masks[n]] == 0), key
        if method != "gmp":
            assert counts(sparse) == start
    assert len(sparse.controller.history) == 7


def test_with_gradient_accumulation_rigl_grows_by_the_accumulated_dense_gradient():
    model, opt, sparse = make({"method": "rigl", "delta_t": 10, "end_step": 100})
    params = dict(model.named_parameters())
    x, y = task(n=128)
    for half in (slice(0, 64), slice(64, 128)):  # two micro-batches, one optimizer step
        (nn.functional.cross_entropy(model(x[half]), y[half]) / 2).backward()
    grad = {n: params[n].grad.detach().abs().clone() for n in MASKED}
    full = {n: torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params[n])[0].abs() for n in MASKED}
    old = {n: m.clone() for n, m in sparse.masks.items()}
    sparse.step()
    for n in MASKED:
        assert torch.allclose(grad[n], full[n], atol=1e-6)  # dense: nothing masked it during backward
        grown = sparse.masks[n] & ~old[n]
        not_chosen = ~sparse.masks[n] & ~old[n]
        assert float(grad[n][grown].min()) >= float(grad[n][not_chosen].max())
    assert sparse.step_count == 1


def test_snfs_state_loads_beside_the_shards_it_scores():
    """A checkpoint is read to the CPU; the moving average must go where the shard lives (a GPU in
    real runs; the meta device stands in for "not the CPU" here)."""
    from types import SimpleNamespace

    from rigl_ds.methods import METHODS

    model, opt, sparse = make({"method": "snfs", "delta_t": 5, "end_step": 100})
    method = METHODS["snfs"](sparse.config, sparse.plan, 100)
    shard = SimpleNamespace(layer=SimpleNamespace(name="fc1.weight"), numel=6, device=torch.device("meta"))
    method.load_state_dict({"grad_ema.fc1.weight": torch.ones(6, dtype=torch.bfloat16)}, [shard])
    ema = method.state_dict([shard])["grad_ema.fc1.weight"]
    assert ema.device.type == "meta" and ema.dtype == torch.float32 and ema.numel() == 6
