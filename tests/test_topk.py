"""The exact selection every mask update uses, against an independent brute-force reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rigl_ds.topk import select_topk


def brute_force(scores, pools, k, eligible):
    """Per pool, the k eligible entries ordered by (score descending, layer, index)."""
    entries = []
    for layer, (s, p, e) in enumerate(zip(scores, pools, eligible)):
        for i in range(s.numel()):
            if e[i]:
                entries.append((int(p[i]), -float(s[i]), layer, i))
    chosen = [torch.zeros(s.numel(), dtype=torch.bool) for s in scores]
    taken = {}
    for pool, _, layer, i in sorted(entries):
        if taken.get(pool, 0) < int(k[pool]):
            chosen[layer][i] = True
            taken[pool] = taken.get(pool, 0) + 1
    return chosen


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_selection_equals_brute_force_with_heavy_ties(data):
    n_layers = data.draw(st.integers(1, 4))
    n_pools = data.draw(st.integers(1, 3))
    levels = data.draw(st.integers(1, 5))  # few distinct values: heavy ties
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    scores, pools, eligible = [], [], []
    for _ in range(n_layers):
        n = data.draw(st.integers(0, 30))
        scores.append(
            torch.tensor(data.draw(st.lists(st.integers(0, levels), min_size=n, max_size=n)), dtype=dtype) / 3
        )
        pools.append(
            torch.tensor(data.draw(st.lists(st.integers(0, n_pools - 1), min_size=n, max_size=n)), dtype=torch.long)
        )
        eligible.append(torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool))
    n_eligible = torch.zeros(n_pools, dtype=torch.long)
    for p, e in zip(pools, eligible):
        n_eligible += torch.bincount(p[e], minlength=n_pools)
    k = torch.tensor([data.draw(st.integers(0, int(c))) for c in n_eligible])
    got = select_topk(scores, pools, k, eligible)
    want = brute_force(scores, pools, k, eligible)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_ties_go_to_the_lowest_index_then_the_earlier_layer():
    s = [torch.ones(4), torch.ones(3)]
    p = [torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long)]
    got = select_topk(s, p, torch.tensor([5]))
    assert got[0].tolist() == [True] * 4 and got[1].tolist() == [True, False, False]


def test_positive_and_negative_zero_tie():
    got = select_topk([torch.tensor([0.0, -0.0, 0.0, -0.0])], [torch.zeros(4, dtype=torch.long)], torch.tensor([2]))
    assert got[0].tolist() == [True, True, False, False]


def test_k_zero_and_k_all():
    s, p = [torch.rand(10)], [torch.zeros(10, dtype=torch.long)]
    assert not select_topk(s, p, torch.tensor([0]))[0].any()
    assert select_topk(s, p, torch.tensor([10]))[0].all()


def test_ineligible_entries_are_never_chosen_even_with_the_best_scores():
    s = [torch.tensor([9.0, 8.0, 1.0, 2.0])]
    e = [torch.tensor([False, False, True, True])]
    assert select_topk(s, [torch.zeros(4, dtype=torch.long)], torch.tensor([2]), e)[0].tolist() == [
        False,
        False,
        True,
        True,
    ]


def test_nan_scores_and_impossible_k_are_rejected():
    p = [torch.zeros(3, dtype=torch.long)]
    with pytest.raises(ValueError, match="NaN"):
        select_topk([torch.tensor([1.0, float("nan"), 0.0])], p, torch.tensor([1]))
    with pytest.raises(ValueError, match="fewer eligible entries"):
        select_topk([torch.rand(3)], p, torch.tensor([2]), [torch.tensor([True, False, False])])
    with pytest.raises(ValueError, match="non-negative"):
        select_topk([torch.rand(3)], p, torch.tensor([-1]))


def test_a_layer_in_one_pool_may_be_named_by_an_int():
    s = [torch.tensor([3.0, 1.0, 2.0]), torch.tensor([5.0, 0.0])]
    as_int = select_topk(s, [0, 0], torch.tensor([2]))
    as_tensor = select_topk(s, [torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)], torch.tensor([2]))
    assert [t.tolist() for t in as_int] == [t.tolist() for t in as_tensor] == [[True, False, False], [True, False]]
    mixed = select_topk(s, [torch.tensor([0, 1, 1]), 1], torch.tensor([1, 1]))
    assert [t.tolist() for t in mixed] == [[True, False, False], [True, False]]
