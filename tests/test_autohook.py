"""The start-up hook and the wrapper that make an unmodified script honour a "rigl" block: installed
with the package, cheap for processes that never import DeepSpeed, never silently dense."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import make, task, train_step

import rigl_ds_autohook
from rigl_ds.config import RigLConfigError
from rigl_ds.integrations import autopatch
from rigl_ds.integrations.autopatch import total_steps_from


def _python(code: str, **env) -> str:
    import os

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_hook_is_installed_with_the_package_and_imports_nothing_heavy_at_start_up():
    out = _python(
        "import sys; print(any(type(f).__name__ == '_Finder' for f in sys.meta_path), 'torch' in sys.modules)"
    )
    assert out == "True False"


def test_importing_deepspeed_makes_its_initialize_rigl_aware():
    out = _python("import deepspeed; print(deepspeed.initialize._rigl_ds_original is not deepspeed.initialize)")
    assert out.splitlines()[-1] == "True"


def fake_deepspeed():
    calls = []
    engine = types.SimpleNamespace(optimizer=object(), step=lambda: "stepped", train_batch=lambda: "batch")

    def initialize(*args, **kwargs):
        calls.append((args, kwargs))
        return engine, None, None, None

    return types.SimpleNamespace(initialize=initialize), calls, engine


def test_a_config_without_a_rigl_block_goes_to_deepspeed_untouched():
    ds, calls, engine = fake_deepspeed()
    autopatch._patch_deepspeed(ds)
    config = {"train_batch_size": 2}
    out = ds.initialize(model="m", config=config)
    assert out[0] is engine and calls == [((), {"model": "m", "config": config})]
    assert engine.step() == "stepped"


def test_in_guard_mode_an_engine_with_a_rigl_block_but_no_rigl_ds_refuses_its_first_step(monkeypatch):
    monkeypatch.setenv(rigl_ds_autohook.ENV, "0")
    monkeypatch.setattr(rigl_ds_autohook, "_forced_mode", None, raising=False)
    ds, calls, engine = fake_deepspeed()
    autopatch._patch_deepspeed(ds)
    ds.initialize(model="m", config={"rigl": {"sparsity": 0.5}})
    for take_step in (engine.step, engine.train_batch):
        with pytest.raises(RigLConfigError, match="rigl_ds.run.*RIGL_DS_AUTOHOOK|RIGL_DS_AUTOHOOK.*rigl_ds.run"):
            take_step()
    engine.rigl = object()  # attached explicitly (rigl_ds.integrations.accelerate.sparsify): steps run
    assert engine.step() == "stepped"


def test_patching_twice_wraps_once():
    ds, _, _ = fake_deepspeed()
    autopatch._patch_deepspeed(ds)
    first = ds.initialize
    autopatch._patch_deepspeed(ds)
    assert ds.initialize is first


def test_the_step_count_comes_from_the_scheduler_block_or_the_scheduler_object():
    block = {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 500}}}
    assert total_steps_from(block) == 500
    assert total_steps_from({"scheduler": {"params": {"total_num_steps": "auto"}}}) is None
    assert total_steps_from({}, types.SimpleNamespace(total_num_steps=300)) == 300
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), max_lr=0.1, total_steps=40
    )
    assert total_steps_from({}, one_cycle) == 40
    assert total_steps_from({}, torch.optim.lr_scheduler.ConstantLR(one_cycle.optimizer)) is None


def test_a_deferred_step_count_fails_the_first_step_naming_rigl_end_step_unless_it_arrives():
    from rigl_ds.controller import SparseController

    model, opt, sparse = make({"method": "rigl", "sparsity": 0.8, "delta_t": 2, "begin_step": 2}, total_steps=10)
    deferred = SparseController(
        sparse.config, sparse.plan, sparse.shards, sparse.controller.comm, defer_total_steps=True
    )
    assert deferred.end_step_pending
    with pytest.raises(RigLConfigError, match="rigl.end_step"):
        deferred.before_step()
    deferred.set_total_steps(10)
    assert deferred.end_step == deferred.method.end_step == 7 and not deferred.end_step_pending
    deferred.before_step()
    deferred.after_step(False)
    with pytest.raises(RuntimeError, match="would move the end"):
        deferred.set_total_steps(20)
    deferred.set_total_steps(10)  # the same end: accepted


def test_logged_counters_survive_a_resume():
    block = {"method": "rigl", "sparsity": 0.8, "delta_t": 3, "end_step": 30}
    model, opt, sparse = make(block, total_steps=40)
    x, y = task()
    for _ in range(10):
        train_step(model, opt, sparse, x, y)
    before = sparse.controller.metrics()
    assert before["rigl/updates"] == 4 and before["rigl/drop_fraction"] > 0
    _, _, fresh = make(block, total_steps=40)
    fresh.controller.load_state_dict(sparse.controller.state_dict())
    assert fresh.controller.metrics() == before and not fresh.controller.history


def test_run_hands_the_launchers_local_rank_to_the_script(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(
        "import sys, os; print(sys.argv[1:], sys.path[0] == os.path.dirname(os.path.abspath(__file__)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "rigl_ds.run", "--local_rank=1", str(script), "--x", "2"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['--local_rank=1', '--x', '2'] True"
    missing = subprocess.run(
        [sys.executable, "-m", "rigl_ds.run", str(tmp_path / "nope.py")], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "no such script" in missing.stderr
