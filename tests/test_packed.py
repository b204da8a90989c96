"""``"storage": "packed"``: a masked weight is held as its active values only, and training is the
masked run's bit for bit: same masks, losses, weights and optimizer state, over many updates, for
every count-keeping method and every layer type (GPT-2 Conv1D, LLaMA Linear, GRU/LSTM gates, conv)."""

import pytest
import torch
from helpers import TinyLM, task
from torch import nn

import rigl_ds
from rigl_ds.config import RigLConfigError
from rigl_ds.lm import build_model


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def _model(kind: str) -> nn.Module:
    if kind == "mlp":
        return TinyLM()
    if kind == "conv":
        return TinyConv()
    sizes = {
        "gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=16),
        "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16),
        "char_gru": dict(embed=16, hidden=32, readout=(24,)),
        "word_lstm": dict(hidden=32, layers=2),
    }[kind]
    return build_model(kind, 40, **sizes)


def _batches(kind: str, n: int):
    g = torch.Generator().manual_seed(5)
    for _ in range(n):
        if kind == "conv":
            yield torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        elif kind == "mlp":
            x = torch.randint(0, 40, (32,), generator=g)
            yield x, (x * 7 + 3) % 40
        else:
            ids = torch.randint(0, 40, (2, 12), generator=g)
            yield ids, None


def _loss(model, kind, x, y):
    out = model(x)
    if kind in ("conv", "mlp"):
        return nn.functional.cross_entropy(out, y)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _run(kind, block, storage, steps, accumulate=1):
    torch.manual_seed(0)
    model = _model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sparse = rigl_ds.sparsify(model, opt, {**block, "storage": storage}, total_steps=steps)
    losses, masks = [], []
    batches = _batches(kind, steps * accumulate)
    for _ in range(steps):
        for _ in range(accumulate):
            x, y = next(batches)
            loss = _loss(model, kind, x, y)
            (loss / accumulate).backward()
            losses.append(loss.detach())
        sparse.step()
        opt.zero_grad(set_to_none=True)
        masks.append({n: m.clone() for n, m in sparse.masks.items()})
    return model, opt, sparse, torch.stack(losses), masks


def _dense_states(opt, sparse):
    """Per masked layer, each optimizer state as a dense tensor in the weight's shape."""
    out = {}
    for s in sparse.shards:
        if sparse.packed:
            state = opt.state[s.values]
            pos = s.scatter.positions.long()
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == s.values.shape:
                    out[(s.layer.name, k)] = torch.zeros(s.numel, dtype=v.dtype).index_put_((pos,), v)
        else:
            for k, v in opt.state[s.param].items():
                if isinstance(v, torch.Tensor) and v.shape == s.param.shape:
                    out[(s.layer.name, k)] = v.reshape(-1).clone()
    return out


METHODS = {
    "rigl": {"method": "rigl", "sparsity": 0.8, "delta_t": 3, "end_step": 24},
    "set": {"method": "set", "sparsity": 0.8, "delta_t": 3, "end_step": 24},
    "snfs": {"method": "snfs", "sparsity": 0.8, "delta_t": 3, "end_step": 24},
    "static": {"method": "static", "sparsity": 0.8},
}


def _assert_same_training(kind, block, steps=30, accumulate=1):
    m1, o1, s1, l1, k1 = _run(kind, block, "masked", steps, accumulate)
    m2, o2, s2, l2, k2 = _run(kind, block, "packed", steps, accumulate)
    assert torch.equal(l1, l2), (l1 - l2).abs().max()
    for a, b in zip(k1, k2):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    dense1, dense2 = s1.dense_state_dict(), s2.dense_state_dict()
    assert dense1.keys() == dense2.keys()
    for key in dense1:
        assert torch.equal(dense1[key], dense2[key]), key
    st1, st2 = _dense_states(o1, s1), _dense_states(o2, s2)
    assert st1.keys() == st2.keys() and st1
    for key in st1:
        assert torch.equal(st1[key], st2[key]), key
    return s1, s2


@pytest.mark.parametrize("method", sorted(METHODS))
def test_packed_training_is_the_masked_run_bit_for_bit(method):
    s1, s2 = _assert_same_training("mlp", METHODS[method])
    if method != "static":
        assert len(s2.controller.history) == len(s1.controller.history) >= 8
        assert sum(h.dropped for h in s2.controller.history) > 0


@pytest.mark.parametrize("kind", ["gpt2", "llama", "char_gru", "word_lstm", "conv"])
def test_every_layer_type_trains_packed_as_it_trains_masked(kind):
    _assert_same_training(kind, METHODS["rigl"], steps=12)


def test_gradient_accumulation_sums_the_dense_gradient_as_the_masked_run_does():
    _assert_same_training("mlp", METHODS["rigl"], steps=12, accumulate=3)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_rigl_stepping_on_update_steps_steps_grown_entries_with_their_own_gradient(accumulate):
    """``skip_optimizer_step_on_update: false`` (RigL-plus): the step after an update moves each
    grown entry by its own gradient, in the slot it took from a dropped entry, as the masked run does."""
    block = {**METHODS["rigl"], "skip_optimizer_step_on_update": False}
    _assert_same_training("mlp", block, steps=12, accumulate=accumulate)


def test_random_normal_grow_init_gives_the_same_grown_values():
    _assert_same_training("mlp", {**METHODS["rigl"], "grow_init": "random_normal"}, steps=12)


def test_packed_weights_hold_only_active_values_and_the_optimizer_steps_them():
    model, opt, sparse, _, _ = _run("mlp", METHODS["rigl"], "packed", 4)
    for s in sparse.shards:
        assert s.values.dim() == 1 and s.values.numel() == int(s.mask.sum()) < s.layer.numel // 4
        assert s.values in opt.state and all(
            v.shape == s.values.shape for v in opt.state[s.values].values() if v.dim() > 0
        )
    names = {n for n, _ in model.named_parameters()}
    assert "fc1.weight" not in names and "fc1.parametrizations.weight.original" in names
    assert model.fc1.weight.shape == (96, 48)  # reading the weight still gives the dense tensor
    assert not ((model.fc1.weight != 0) & ~sparse.masks["fc1.weight"]).any()


def test_no_dense_weight_is_kept_for_backward():
    """What autograd saves between forward and backward holds no tensor of a packed layer's dense size."""
    torch.manual_seed(0)
    model = TinyLM(width=48, hidden=96)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sparse = rigl_ds.sparsify(model, opt, {**METHODS["set"], "storage": "packed"}, total_steps=30)
    dense_sizes = {s.layer.numel for s in sparse.shards}
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x, y = task()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    assert saved and not (set(saved) & dense_sizes), sorted(set(saved))
    loss.backward()


def test_dense_gradients_exist_only_on_steps_that_read_them():
    model, opt, sparse, _, _ = _run("mlp", METHODS["rigl"], "packed", 1)  # the update at step 0 is done
    x, y = task()
    nn.functional.cross_entropy(model(x), y).backward()  # step 1: no update, no dense gradient
    assert all(s.grad() is None for s in sparse.shards)
    sparse.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # step 2
    sparse.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # step 3: an update step reads them
    assert all(s.grad() is not None and s.grad().numel() == s.layer.numel for s in sparse.shards)
    sparse.step()
    assert all(s.grad() is None for s in sparse.shards)


def test_resume_from_a_packed_checkpoint_is_bit_identical(tmp_path):
    block = METHODS["rigl"]
    model, opt, sparse, _, _ = _run("mlp", block, "packed", 10)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rigl": sparse.state_dict()}, path)
    x, y = task()

    def more(model, opt, sparse):
        out = []
        for _ in range(10):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            sparse.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.detach())
        return torch.stack(out)

    want = more(model, opt, sparse)
    torch.manual_seed(7)
    model2 = TinyLM()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3, weight_decay=0.05)
    sparse2 = rigl_ds.sparsify(model2, opt2, {**block, "storage": "packed", "seed": 3}, total_steps=10)
    ckpt = torch.load(path, weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sparse2.load_state_dict(ckpt["rigl"])
    assert torch.equal(more(model2, opt2, sparse2), want)
    for n, m in sparse.masks.items():
        assert torch.equal(sparse2.masks[n], m)


def test_loading_masks_that_disagree_with_the_packed_positions_is_refused(tmp_path):
    block = METHODS["rigl"]
    _, _, sparse, _, _ = _run("mlp", block, "packed", 4)
    state = sparse.state_dict()
    torch.manual_seed(7)
    model2 = TinyLM()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3)
    sparse2 = rigl_ds.sparsify(model2, opt2, {**block, "storage": "packed", "seed": 3}, total_steps=10)
    with pytest.raises(ValueError, match="load the model's state dict"):
        sparse2.load_state_dict(state)  # the model still holds other positions


def test_the_dense_state_dict_loads_into_a_plain_model():
    model, _, sparse, _, _ = _run("mlp", METHODS["set"], "packed", 6)
    plain = TinyLM()
    plain.load_state_dict(sparse.dense_state_dict())
    x, _ = task()
    assert torch.equal(plain(x), model(x))


@pytest.mark.parametrize(
    "block, key",
    [
        ({"method": "gmp", "sparsity": 0.8}, "changes counts"),
        ({"method": "rigl", "distribution": "global"}, "distribution \"global\""),
        ({"method": "rigl", "compact_optimizer_state": True}, "compact_optimizer_state"),
    ],
)
def test_settings_packed_storage_cannot_honour_are_refused_by_name(block, key):
    with pytest.raises(RigLConfigError, match="storage"):
        rigl_ds.load_config({**block, "storage": "packed"})
    with pytest.raises(RigLConfigError, match=key):
        rigl_ds.load_config({**block, "storage": "packed"})


@pytest.mark.parametrize("groups", [{}, {"0": {"axis": 0, "blocks": 4}}])
def test_zero3_packing_draws_the_initial_masks_of_mask_initialisation_in_chunks(groups):
    """A model built under ``zero.Init`` is packed from keyed scores drawn a chunk at a time and
    selected by the one-process radix select: the same entries as the sort reference on the whole
    layer, per mask group too."""
    from rigl_ds import keyed_random
    from rigl_ds.adapter import plan_for_model
    from rigl_ds.config import load_config
    from rigl_ds.topk import select_topk
    from rigl_ds.zero.packed import _initial_positions

    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    config = load_config({"method": "rigl", "sparsity": 0.9, "delta_t": 3, "end_step": 10, "mask_groups": groups})
    _, plan = plan_for_model(model, config)
    targets = plan.targets(config.sparsity)
    for layer in plan.layers:
        index = torch.arange(layer.numel)
        scores = keyed_random.uniform(keyed_random.derive_key(config.seed, "init", layer.name), index)
        pools = sorted(set(layer.pools))
        k = torch.zeros_like(targets)
        k[pools] = targets[pools]
        ids = pools[0] if len(pools) == 1 else layer.pool_ids(index)
        want = select_topk([scores], [ids], k)[0].nonzero().flatten()
        got = _initial_positions(layer, plan, config, targets, chunk=1000)
        assert torch.equal(got, want), layer.name
        assert got.numel() == int(k.sum())
