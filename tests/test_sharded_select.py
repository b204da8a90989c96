"""The sharded selection (radix select with collectives) chooses exactly what the single-process
reference chooses on whole tensors, for any world size and any partition of every layer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from thread_world import run_threads

from rigl_ds import bits
from rigl_ds.select import order_keys, radix_select_topk
from rigl_ds.topk import select_topk


def cut(n: int, world: int, draw_points) -> list:
    """Contiguous ranges [a, b) of 0..n, one per rank, in rank order (empty ones allowed)."""
    points = sorted(draw_points(world - 1, n))
    bounds = [0, *points, n]
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


def sharded(world, scores, pools, k, eligible, layer_pools, parts, digits=(12, 10, 10), lazy=False):
    """Runs the radix selection on `world` thread ranks; returns whole-layer results. ``lazy``:
    scores, eligibility and per-entry pools handed over as callables that build a new copy at each
    call (which the selection may overwrite), and the results asked for packed."""

    def rank_fn(comm):
        r = comm.rank
        mine = [parts[i][r] for i in range(len(scores))]
        my_scores = [s[a:b] for s, (a, b) in zip(scores, mine)]
        my_pools = [p if isinstance(p, int) else p[a:b] for p, (a, b) in zip(pools, mine)]
        my_eligible = None if eligible is None else [e[a:b] for e, (a, b) in zip(eligible, mine)]
        if lazy:
            my_scores = [lambda t=t: t.clone() for t in my_scores]
            my_pools = [p if isinstance(p, int) else (lambda t=p: t.clone()) for p in my_pools]
            my_eligible = None if my_eligible is None else [lambda t=t: t.clone() for t in my_eligible]
        got = radix_select_topk(
            comm,
            my_scores,
            my_pools,
            k,
            my_eligible,
            [a for a, _ in mine],
            layer_pools=layer_pools,
            digits=digits,
            packed=lazy,
        )
        if lazy:
            got = [bits.unpack(g, b - a) for g, (a, b) in zip(got, mine)]
        return got

    per_rank = run_threads(world, rank_fn)
    return [torch.cat([per_rank[r][i] for r in range(world)]) for i in range(len(scores))]


@st.composite
def selection_cases(draw):
    n_layers = draw(st.integers(1, 4))
    n_pools = draw(st.integers(1, 3))
    levels = draw(st.sampled_from([1, 3, 1000]))  # few distinct values (heavy ties) or many
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    signed = draw(st.booleans())
    scores, pools, eligible, layer_pools = [], [], [], []
    for _ in range(n_layers):
        n = draw(st.integers(0, 40))
        values = draw(st.lists(st.integers(-levels if signed else 0, levels), min_size=n, max_size=n))
        s = torch.tensor(values, dtype=torch.float32) / 7
        if draw(st.booleans()):
            s = torch.where(torch.arange(n) % 3 == 0, -s, s)  # -0.0 beside +0.0
        if draw(st.booleans()):
            s = torch.where(torch.arange(n) % 5 == 1, float(draw(st.sampled_from(["inf", "-inf"]))), s)
        scores.append(s.to(dtype))
        if draw(st.booleans()):
            pools.append(draw(st.integers(0, n_pools - 1)))
            layer_pools.append([pools[-1]])
        else:
            pools.append(torch.tensor(draw(st.lists(st.integers(0, n_pools - 1), min_size=n, max_size=n))).long())
            layer_pools.append(list(range(n_pools)))
        eligible.append(torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool))
    n_eligible = torch.zeros(n_pools, dtype=torch.long)
    for p, e in zip(pools, eligible):
        n_eligible += torch.bincount(
            torch.full_like(e, p, dtype=torch.long)[e] if isinstance(p, int) else p[e], minlength=n_pools
        )
    k = torch.tensor([draw(st.sampled_from([0, int(c), draw(st.integers(0, int(c)))])) for c in n_eligible])
    world = draw(st.integers(1, 4))

    def points(count, n):
        return draw(st.lists(st.integers(0, n), min_size=count, max_size=count))

    parts = [cut(s.numel(), world, points) for s in scores]
    return world, scores, pools, k, eligible, layer_pools, parts


@settings(max_examples=150, deadline=None)
@given(
    case=selection_cases(),
    digits=st.sampled_from([(12, 10, 10), (8, 8, 8, 8), (16, 16), (3,) * 10 + (2,)]),
    lazy=st.booleans(),
)
def test_every_partition_selects_what_one_process_selects(case, digits, lazy):
    world, scores, pools, k, eligible, layer_pools, parts = case
    inputs = [t.clone() for t in scores + eligible + [p for p in pools if not isinstance(p, int)]]
    want = select_topk(scores, pools, k, eligible)
    got = sharded(world, scores, pools, k, eligible, layer_pools, parts, digits, lazy)
    for g, w in zip(got, want):
        assert torch.equal(g.view(-1), w.view(-1))
    after = scores + eligible + [p for p in pools if not isinstance(p, int)]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after))  # nothing handed over was written to


def test_ties_at_the_threshold_go_by_layer_then_global_index_across_ranks():
    # Seven equal scores spread over three ranks; k = 4 takes layer 0's three, then layer 1's first.
    scores = [torch.ones(3), torch.ones(4)]
    parts = [[(0, 1), (1, 1), (1, 3)], [(0, 2), (2, 3), (3, 4)]]
    got = sharded(3, scores, [0, 0], torch.tensor([4]), None, [[0], [0]], parts)
    assert got[0].tolist() == [True, True, True] and got[1].tolist() == [True, False, False, False]


def test_plus_and_minus_zero_are_one_value():
    scores = [torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0])]
    got = sharded(2, scores, [0], torch.tensor([3]), None, [[0]], [[(0, 2), (2, 5)]])
    assert got[0].tolist() == [True, True, False, False, True]


def test_keys_order_like_the_floats():
    x = torch.tensor([float("-inf"), -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 0.5, 1.0, 3e38, float("inf")])
    keys = order_keys(x)
    assert torch.equal(torch.argsort(keys, stable=True), torch.argsort(x, stable=True))
    assert keys[4] == keys[5]
    assert (keys[1:] >= keys[:-1]).all() and (keys[6:] > keys[5:-1]).all()


@pytest.mark.parametrize("digits", [(12, 10, 10), (8, 8, 8, 8), (3,) * 10 + (2,)])
@pytest.mark.parametrize("k", [1, 2])
def test_eligible_minus_infinity_is_chosen_before_any_ineligible_entry(digits, k):
    scores = [torch.tensor([float("-inf"), 5.0, float("-inf"), float("-inf"), 7.0, float("-inf")])]
    eligible = [torch.tensor([False, False, True, True, False, False])]
    got = sharded(2, scores, [0], torch.tensor([k]), eligible, [[0]], [[(0, 3), (3, 6)]], digits)
    assert got[0].tolist() == [False, False, True, k == 2, False, False]


def test_nan_in_one_ranks_shard_is_refused_on_every_rank():
    scores = [torch.tensor([1.0, 2.0, float("nan"), 4.0])]
    with pytest.raises(ValueError, match="NaN"):
        sharded(2, scores, [0], torch.tensor([1]), None, [[0]], [[(0, 2), (2, 4)]])


def test_k_above_the_eligible_count_is_refused():
    scores = [torch.arange(6.0)]
    eligible = [torch.tensor([True, False, True, False, False, False])]
    with pytest.raises(ValueError, match="fewer eligible entries"):
        sharded(2, scores, [0], torch.tensor([3]), eligible, [[0]], [[(0, 3), (3, 6)]])


def test_float64_scores_are_refused_rather_than_rounded():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sharded(1, [torch.arange(4.0, dtype=torch.float64)], [0], torch.tensor([1]), None, [[0]], [[(0, 4)]])


def test_payload_does_not_grow_with_the_number_of_entries():
    def account(n):
        g = torch.Generator().manual_seed(0)
        scores = [torch.randn(n, generator=g), torch.randn(n // 2, generator=g)]
        parts = [[(0, len(s) // 3), (len(s) // 3, len(s))] for s in scores]
        k = torch.tensor([n // 10, n // 20])

        def rank_fn(comm):
            mine = [p[comm.rank] for p in parts]
            radix_select_topk(comm, [s[a:b] for s, (a, b) in zip(scores, mine)], [0, 1], k, None, [a for a, _ in mine])
            return comm.stats

        return run_threads(2, rank_fn)[0]

    bound = (2 * 4096 + 2 + 2 * 1024 * 2) * 8  # three passes of int64 counts for 2 pools, whatever the size
    for stats in account(1_000), account(1_000_000):
        assert 1 <= stats.collectives <= 3 and stats.bytes_sent <= bound


@pytest.mark.parametrize("world", [1, 2])
def test_lazy_layers_are_built_one_at_a_time_so_the_transient_is_one_layers(world):
    """Scores and eligibility given as callables: when any layer's tensor is built, no tensor built
    for another layer is still alive (the update's transient is one layer's, whatever the depth)."""
    from torch.multiprocessing.reductions import StorageWeakRef  # the memory itself, not the Python object

    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(n, generator=g) for n in (300, 50, 700, 10)]
    eligible = [torch.rand(s.numel(), generator=g) < 0.6 for s in scores]
    k = torch.tensor([60, 200])
    pools = [0, 1, 1, 0]
    parts = [
        [(0, s.numel() // 2), (s.numel() // 2, s.numel())][:world] if world == 2 else [(0, s.numel())] for s in scores
    ]
    want = select_topk(scores, pools, k, eligible)

    def rank_fn(comm):
        alive = []  # (layer, weakref) of everything built so far on this rank

        def built(i, t):
            others = [j for j, ref in alive if j != i and not ref.expired()]
            assert not others, f"layer {i} built while layers {others} are still alive"
            alive.append((i, StorageWeakRef(t.untyped_storage())))
            return t

        mine = [p[comm.rank] for p in parts]
        got = radix_select_topk(
            comm,
            [lambda i=i, a=a, b=b: built(i, scores[i][a:b].clone()) for i, (a, b) in enumerate(mine)],
            pools,
            k,
            [lambda i=i, a=a, b=b: built(i, eligible[i][a:b].clone()) for i, (a, b) in enumerate(mine)],
            [a for a, _ in mine],
            layer_pools=[[p] for p in pools],
            packed=True,
        )
        return [bits.unpack(x, b - a) for x, (a, b) in zip(got, mine)]

    per_rank = run_threads(world, rank_fn)
    for i, w in enumerate(want):
        assert torch.equal(torch.cat([per_rank[r][i] for r in range(world)]), w)


def test_first_true_keeps_the_first_n_across_blocks():
    from rigl_ds.select.radix import _first_true

    mask = torch.rand(1000, generator=torch.Generator().manual_seed(2)) < 0.5
    for n in (0, 1, 7, 64, int(mask.sum())):
        want = mask & (torch.cumsum(mask, 0) <= n)
        assert torch.equal(_first_true(mask.clone(), n, block=16), want)
