"""bench/memory_profile.py: every phase has a peak for every mode (dense, masked and packed storage),
a mode rigl_ds refuses would be reported as not available rather than measured, and the JSON has the
documented structure. The peak meters themselves are checked in this process against an allocation
of known size."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory_profile  # noqa: E402

MiB = 2**20


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory_profile") / "profile.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "memory_profile.py"), "--layers", "2", "--embd", "64"]
    cmd += ["--world", "2", "--modes", "dense", "masked", "packed", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_every_phase_has_a_positive_peak_for_each_mode(tiny_run):
    stdout, data = tiny_run
    assert data["phases"] == list(memory_profile.PHASES)
    assert data["setting"]["layers"] == 2 and data["setting"]["world"] == 2
    for mode in ("dense", "masked", "packed"):
        r = data["modes"][mode]
        assert r["available"] is True
        assert r["meter"] == "VmHWM after clear_refs"  # writable on Linux for one's own process
        assert r["params"] > 0 and r["params_per_rank"] == r["params"] / 2
        for phase in memory_profile.PHASES:
            if mode == "dense" and phase == "mask update":
                assert r["peak_bytes"][phase] is None  # dense has no masks
                continue
            assert r["peak_bytes"][phase] > 0, (mode, phase)
            assert all(pr[phase] > 0 for pr in r["per_rank_peak_bytes"]), (mode, phase)
            assert r["held_after_bytes"][phase] is not None
        assert r["overall_peak_bytes"] == max(v for v in r["peak_bytes"].values() if v is not None)
        assert len(r["per_rank_peak_bytes"]) == len(r["baseline_bytes"]) == 2
        assert len(r["losses"]) == 4
    for mode in ("masked", "packed"):
        assert data["modes"][mode]["updates"] == 2  # steps 1 and 3: the mask update ran inside the profile
    for phase in memory_profile.PHASES:
        assert f"| {phase} |" in stdout
    header = "| phase | dense MiB | dense B/param | masked MiB | masked B/param | packed MiB | packed B/param |"
    assert header + " masked/dense | packed/dense |" in stdout


def test_a_refused_packed_setting_is_named_not_measured():
    import argparse

    args = argparse.Namespace(path="deepspeed", stage=3, steps=4, delta_t=2)
    assert memory_profile.packed_refused(args) is None  # ZeRO-3 packed runs
    config = memory_profile.ds_config("packed", 3, 4, 2)
    config["fp16"] = {"enabled": True}
    original = memory_profile.ds_config
    memory_profile.ds_config = lambda *a: config
    try:
        reason = memory_profile.packed_refused(args)
    finally:
        memory_profile.ds_config = original
    assert reason is not None and "rigl.storage" in reason and "fp16" in reason


def _touch(n: int) -> bytearray:
    buf = bytearray(n)
    for i in range(0, n, 4096):  # resident, page by page
        buf[i] = 1
    return buf


def test_high_water_mark_sees_a_freed_allocation_and_resets():
    meter = memory_profile.HighWaterMark()
    meter.reset()
    before = meter.current()
    buf = _touch(64 * MiB)
    del buf
    assert meter.peak() - before >= 60 * MiB
    meter.reset()
    assert meter.peak() - meter.current() < 8 * MiB


def test_rss_sampler_sees_an_allocation_and_resets():
    meter = memory_profile.RssSampler()
    try:
        meter.reset()
        before = meter.current()
        buf = _touch(64 * MiB)
        time.sleep(0.05)  # several sampling intervals with the buffer resident
        del buf
        assert meter.peak() - before >= 60 * MiB
        meter.reset()
        assert meter.peak() - meter.current() < 8 * MiB
    finally:
        meter.close()
