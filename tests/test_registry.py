"""The method registry: a method is one class registered by name, from the package or from user
code; config validation and FLOPs accounting ask that class, never the name."""

from typing import List, Sequence

import pytest
import torch
from helpers import make, task, train_step

import rigl_ds
from rigl_ds import keyed_random
from rigl_ds.flops import expected_training_flops, training_flops_per_step
from rigl_ds.methods import DropGrowMethod, SparseMethod
from rigl_ds.shards import Shard

MASKED = ("fc1.weight", "fc2.weight")
BUILT_INS = ["static", "set", "rigl", "snfs", "gmp"]


@pytest.fixture
def random_growth():
    """What a user writes in their own code: one subclass saying how to score growth, one decorator."""

    @rigl_ds.methods.register("random_growth")
    class RandomGrowth(DropGrowMethod):
        def grow_scores(self, shards: Sequence[Shard], step: int) -> List[torch.Tensor]:
            seed = self.config.seed
            return [
                keyed_random.uniform(keyed_random.derive_key(seed, "random", s.layer.name, step), s.global_indices())
                for s in shards
            ]

    yield RandomGrowth
    del rigl_ds.METHODS["random_growth"]


@pytest.fixture
def user_method():
    """Registers classes under throwaway names and unregisters them afterwards."""
    names = []

    def register(name: str, cls: type) -> type:
        registered = rigl_ds.methods.register(name)(cls)
        names.append(name)
        return registered

    yield register
    for name in names:
        rigl_ds.METHODS.pop(name, None)


def test_the_built_ins_are_registered_in_the_papers_order():
    assert list(rigl_ds.METHODS)[:5] == BUILT_INS
    assert all(rigl_ds.METHODS[name].name == name for name in BUILT_INS)


def test_a_method_registered_in_user_code_trains_by_name_and_keeps_exact_counts(random_growth):
    assert rigl_ds.METHODS["random_growth"] is random_growth
    model, opt, sparse = make({"method": "random_growth", "sparsity": 0.9, "delta_t": 10, "end_step": 100})
    assert type(sparse.controller.method) is random_growth
    x, y = task()
    first = {n: m.clone() for n, m in sparse.masks.items()}
    losses = [train_step(model, opt, sparse, x, y) for _ in range(120)]
    params = dict(model.named_parameters())
    moved = sum(int((first[n] != sparse.masks[n]).sum()) for n in MASKED)
    assert moved > 0
    assert {n: int(m.sum()) for n, m in sparse.masks.items()} == {n: int(m.sum()) for n, m in first.items()}
    assert all(torch.all(params[n][~sparse.masks[n]] == 0) for n in MASKED)
    assert len(sparse.controller.history) == len(range(0, 101, 10))
    assert sum(losses[-10:]) < sum(losses[:10])


def test_an_unknown_method_is_a_start_up_error_that_lists_the_registered_ones(random_growth):
    with pytest.raises(rigl_ds.RigLConfigError) as err:
        rigl_ds.load_config({"method": "rigl2"})
    assert "rigl.method: allowed values: static, set, rigl, snfs, gmp, random_growth (got 'rigl2')" in str(err.value)
    with pytest.raises(rigl_ds.RigLConfigError, match="rigl.method"):
        make({"method": "random-growth"})


def test_a_name_is_registered_once_and_only_to_a_sparse_method(user_method):
    with pytest.raises(ValueError, match="'rigl' is already registered"):
        user_method("rigl", type("MyRigL", (DropGrowMethod,), {}))
    with pytest.raises(TypeError, match="SparseMethod subclass"):
        user_method("not_a_method", object)
    with pytest.raises(ValueError, match="other than 'dense'"):  # the name FLOPs accounting gives dense training
        user_method("dense", type("Dense", (SparseMethod,), {"updates_masks": False}))
    assert "not_a_method" not in rigl_ds.METHODS and rigl_ds.METHODS["rigl"] is rigl_ds.methods.RigLMethod


def test_config_defaults_and_checks_come_from_the_method_class(user_method):
    class Frozen(SparseMethod):
        updates_masks = False
        skip_optimizer_step_on_update = True
        own_keys = ("initial_sparsity",)

        @classmethod
        def check_config(cls, config: rigl_ds.RigLConfig) -> None:
            if config.sparsity < 0.5:
                raise ValueError(f"sparsity ({config.sparsity}) must be at least 0.5 for method {cls.name}")

    user_method("frozen", Frozen)
    c = rigl_ds.load_config({"method": "frozen", "end_step": 0})  # masks never change: any end_step will do
    assert c.method_class is Frozen and c.skip_step_on_update is True and c.resolve_end_step(None) == 0
    assert rigl_ds.load_config({"method": "frozen"}).resolve_end_step(None) is None
    with pytest.raises(rigl_ds.RigLConfigError, match="must be at least 0.5 for method frozen"):
        rigl_ds.load_config({"method": "frozen", "sparsity": 0.3})
    assert rigl_ds.load_config({"method": "frozen", "initial_sparsity": 0.2}).initial_sparsity == 0.2
    with pytest.raises(rigl_ds.RigLConfigError, match="initial_sparsity is a setting of method 'gmp' or 'frozen' only"):
        rigl_ds.load_config({"method": "snfs", "initial_sparsity": 0.2})


def test_the_flops_accounting_of_the_built_ins_is_unchanged():
    fs, fd = 1.0, 10.0  # the numbers tests/test_flops.py checks
    assert expected_training_flops("dense", fs, fd) == 30.0
    assert [expected_training_flops(m, fs, fd) for m in ("static", "set", "gmp")] == [3.0, 3.0, 3.0]
    assert expected_training_flops("snfs", fs, fd) == 12.0
    assert expected_training_flops("rigl", fs, fd, delta_t=100) == (300 + 2 + 10) / 101
    assert [training_flops_per_step("rigl", fs, fd, update) for update in (False, True)] == [3.0, 12.0]
    assert [training_flops_per_step("snfs", fs, fd, update) for update in (False, True)] == [12.0, 12.0]
    assert [training_flops_per_step("set", fs, fd, update) for update in (False, True)] == [3.0, 3.0]
    with pytest.raises(ValueError, match="registered methods: static, set, rigl, snfs, gmp"):
        training_flops_per_step("rigl2", fs, fd, False)


def test_a_method_that_reads_dense_gradients_at_updates_pays_the_dense_backward_then(user_method):
    class GradientGrowth(DropGrowMethod):
        update_before_step = True
        uses_gradients = True

    user_method("gradient_growth", GradientGrowth)
    fs, fd = 1.0, 10.0
    assert training_flops_per_step("gradient_growth", fs, fd, False) == 3.0
    assert training_flops_per_step("gradient_growth", fs, fd, True) == 12.0
    assert expected_training_flops("gradient_growth", fs, fd, delta_t=100) == pytest.approx((300 + 12) / 101)


def test_user_flops_accounting_counts_a_sparse_step_for_random_growth(random_growth):
    model, opt, sparse = make({"method": "random_growth", "sparsity": 0.9, "delta_t": 5, "end_step": 50})
    x, y = task()
    report = sparse.measure_flops(x, examples=x.numel())
    fs = report.inference_sparse
    assert report.training_per_example == 3.0 * fs  # grows without reading gradients: never a dense backward
    for _ in range(11):
        train_step(model, opt, sparse, x, y)  # counts stay exact, so f_S is the same at every step
    assert sparse.training_flops.total == pytest.approx(11 * 3.0 * fs * x.numel())
