"""Over real torch.distributed (gloo, CPU), 1-4 ranks: the sharded selection and whole training
runs with mask updates reproduce the single-process reference bit for bit."""

import pytest
import sharded_sim
import torch
from gloo import run_gloo

from rigl_ds.topk import select_topk

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_selection_over_gloo_equals_the_whole_tensor_reference(world):
    cases = sharded_sim.random_selection_cases(seed=world, count=60, world=world)
    per_rank = run_gloo(world, "sharded_sim:rank_selections", cases)
    for c, case in enumerate(cases):
        layers = case["layers"]
        want = select_topk(
            [x["scores"] for x in layers], [x["pools"] for x in layers], case["k"], [x["eligible"] for x in layers]
        )
        for i, layer in enumerate(layers):
            got = torch.zeros(layer["scores"].numel(), dtype=torch.bool)
            for r, (a, b) in enumerate(layer["ranges"]):
                got[a:b] = per_rank[r][c][i]
            assert torch.equal(got, want[i]), f"case {c}, layer {i}"


@pytest.fixture(scope="module")
def references():
    return {run: sharded_sim.reference(run) for run in sharded_sim.RUNS}


@pytest.mark.parametrize(
    "world,scheme",
    [(1, "per_layer_even"), (2, "flat_even"), (2, "reversed"), (3, "random"), (3, "flat_even"), (4, "per_layer_even")],
)
def test_training_on_shards_matches_one_process_bit_for_bit(world, scheme, references):
    per_rank = run_gloo(world, "sharded_sim:rank_runs", scheme)
    parts = sharded_sim.partition(scheme, world)
    for run, want in references.items():
        assert bool(want["history"]) == (run != "static_er"), run  # every other run updates its masks
        for r, got in enumerate(per_rank):
            got = got[run]
            assert got["history"] == want["history"], run  # dropped/grown/regrown/active per update
            assert got["report"] == want["report"], run
            assert got["exploration"] == want["exploration"], run
            for name, (a, b) in ((n, parts[n][r]) for n in sharded_sim.SHAPES):
                assert torch.equal(got["masks"][name], want["masks"][name][a:b]), (run, name, r)
                assert torch.equal(got["weights"][name], want["weights"][name][a:b]), (run, name, r)
                for g_state, w_state in zip(got["states"][name], want["states"][name], strict=True):
                    assert torch.equal(g_state, w_state[a:b]), (run, name, r)
            if world > 1 and got["collectives"]:
                assert min(got["collectives"]) > 0 and min(got["bytes_sent"]) > 0
