"""``SparseController.update_listeners``: ("start", step) just before each mask update and ("end",
step) just after it, once per update, in order, never on a step without an update."""

import pytest
import torch
from helpers import make, task, train_step

BLOCK = {"sparsity": 0.8, "delta_t": 3, "begin_step": 2, "end_step": 12}


def _run(block, steps=15):
    model, opt, sparse = make(block, total_steps=steps)
    controller = sparse.controller
    events, seen_masks = [], []

    def listener(event, step):
        events.append((event, step, controller.step, controller.updates))
        seen_masks.append({n: m.clone() for n, m in sparse.masks.items()})

    controller.update_listeners.append(listener)
    x, y = task()
    for _ in range(steps):
        train_step(model, opt, sparse, x, y)
    return controller, events, seen_masks


@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])  # rigl updates before the optimizer step, the others after
def test_start_and_end_fire_once_per_update_with_its_step_in_order(method):
    controller, events, seen_masks = _run({**BLOCK, "method": method})
    assert [h.step for h in controller.history] == [2, 5, 8, 11]
    expected = [s for t in (2, 5, 8, 11) for s in (("start", t), ("end", t))]
    assert [(e, t) for e, t, _, _ in events] == expected
    for start, end in zip(events[0::2], events[1::2]):
        # "start" before the update counted it, "end" after; the controller is at the update's step.
        assert start[3] + 1 == end[3] and start[2] == end[2] == start[1]
    # The masks moved between "start" and "end" of at least one update, and never between an "end"
    # and the next "start" (no update outside the brackets).
    changed = [any(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(seen_masks[0::2], seen_masks[1::2])]
    assert any(changed)
    for end, start in zip(seen_masks[1::2], seen_masks[2::2]):
        assert all(torch.equal(end[n], start[n]) for n in end)


def test_no_events_on_steps_without_updates():
    controller, events, _ = _run({**BLOCK, "method": "rigl", "begin_step": 20, "end_step": 30}, steps=10)
    assert controller.updates == 0 and events == []


def test_the_adapters_part_of_an_update_after_the_optimizer_step_runs_before_end():
    """DeepSpeed's low-precision refresh after an update that follows the optimizer step (SET) is
    handed to ``after_step`` and runs inside the update's "start"/"end"; not at all without an update."""
    model, opt, sparse = make({**BLOCK, "method": "set"}, total_steps=15)
    controller, events = sparse.controller, []
    controller.update_listeners.append(lambda event, step: events.append((event, step)))
    x, y = task()
    for _step in range(4):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        run = controller.before_step()
        if run:
            opt.step()
        controller.after_step(run, after_update=lambda: events.append(("after_update", controller.step)))
        opt.zero_grad(set_to_none=True)
    assert events == [("start", 2), ("after_update", 2), ("end", 2)]


def test_end_fires_when_the_update_raises():
    model, opt, sparse = make({**BLOCK, "method": "rigl"}, total_steps=15)
    controller, events = sparse.controller, []
    controller.update_listeners.append(lambda event, step: events.append((event, step)))

    def broken(*args, **kwargs):
        raise RuntimeError("update failed")

    controller.method.update = broken
    x, y = task()
    with pytest.raises(RuntimeError, match="update failed"):
        for _ in range(5):
            train_step(model, opt, sparse, x, y)
    assert events == [("start", 2), ("end", 2)]
