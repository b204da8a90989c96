"""A killed run loses nothing: launch/train_lm.py on 2 gloo ranks under the deepspeed launcher is
killed (SIGKILL, ``rigl_ds.faults``) mid-step, mid-mask-update and mid-save; the job ends non-zero
without hanging, ``--resume`` continues from the last complete checkpoint (naming the incomplete one
it skips), and the finished run equals an uninterrupted one bit for bit: masks, fp32 weights and every
logged loss."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rigl_ds import faults

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "train_lm.py"
LAUNCHER = Path(sys.executable).with_name("deepspeed")
JOB_TIMEOUT = 300  # seconds per launcher job; a healthy one takes 15-30 s here
STEPS, SAVE_EVERY = 10, 3  # checkpoints step3, step6, step9, step10
TINY_GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32, "resid_pdrop": 0.1}  # dropout: RNG replay


def _config(out: Path) -> dict:
    config = json.loads((ROOT / "configs" / "cpu_gpt2_rigl.json").read_text())  # ZeRO-3, fp32
    config["train_micro_batch_size_per_gpu"] = 2
    config["job"].update(
        steps=STEPS, save_every=SAVE_EVERY, log_every=1, eval_every=STEPS, eval_blocks=8, vocab_size=300, seq_len=16
    )
    config["job"].update(model=TINY_GPT2, keep_checkpoints=2, out_dir=str(out))
    config["rigl"].pop("end_fraction")
    config["rigl"].update(delta_t=2, end_step=8)  # mask updates at steps 0, 2, 4, 6, 8
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, name: str, *extra: str, fault: str = "", fault_rank: str = "") -> subprocess.CompletedProcess:
    """One 2-rank launcher job of the run ``tmp/name``; ended as a group if it outlives JOB_TIMEOUT
    (a hang is a failure: the test says so rather than waiting)."""
    config = tmp / f"{name}.json"
    if not config.exists():
        config.write_text(json.dumps(_config(tmp / name)))
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf"), "PYTHONUNBUFFERED": "1"}
    env.pop(faults.ENV, None)
    env.pop(faults.ENV_RANK, None)
    if fault:
        env[faults.ENV] = fault
    if fault_rank:
        env[faults.ENV_RANK] = fault_rank
    port = _free_port()
    cmd = [str(LAUNCHER), "--num_gpus", "2", "--master_port", str(port), str(SCRIPT)]
    cmd += ["--deepspeed_config", str(config), *extra]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{name} (fault {fault!r}) hung: still running after {JOB_TIMEOUT}s\n{out[-4000:]}")
    finally:
        # DeepSpeed never unlinks its shm all-reduce workspaces (69 MB a rank, in RAM): drop this job's.
        for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            segment.unlink(missing_ok=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _losses(run: Path):
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def _final_state(run: Path, rank: int):
    tag = run / "checkpoints" / f"step{STEPS}"
    rigl = torch.load(tag / "rigl_ds" / f"rank{rank:05d}.pt", weights_only=False)
    optim = torch.load(tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
    return rigl["masks"], optim["optimizer_state_dict"]["fp32_flat_groups"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    done = _launch(tmp, "straight")
    assert done.returncode == 0, done.stdout[-4000:]
    return tmp / "straight"


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault,rank,resumes_from,skipped",
    [
        ("mid-step@7", "", 6, None),  # every rank dies inside the 8th step, after step6 was saved
        ("mid-update@4", "0", 3, None),  # rank 0 dies with one layer's mask changed (its peer is ended)
        ("mid-save@6", "1", 3, 6),  # rank 1 dies with DeepSpeed's files of step6 written, not ours
    ],
)
def test_a_killed_run_resumes_from_the_last_complete_checkpoint_bit_identical(
    uninterrupted, tmp_path, fault, rank, resumes_from, skipped
):
    killed = _launch(tmp_path, "run", fault=fault, fault_rank=rank)
    assert killed.returncode != 0, killed.stdout[-4000:]
    assert f"rigl_ds.faults: {faults.ENV}={fault}: killing rank" in killed.stdout, killed.stdout[-4000:]
    run = tmp_path / "run"
    assert not (run / "summary.json").exists()
    assert (run / "checkpoints" / "latest").read_text() == f"step{resumes_from}"  # never an incomplete one

    resumed = _launch(tmp_path, "run", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"resuming from {run / 'checkpoints' / f'step{resumes_from}'}" in resumed.stdout, resumed.stdout[-4000:]
    if skipped is None:
        assert "skipping incomplete checkpoint" not in resumed.stdout
    else:
        assert f"skipping incomplete checkpoint step{skipped}: " in resumed.stdout, resumed.stdout[-4000:]

    # Every step logged once; the losses after the resume point are the uninterrupted run's, bit for bit.
    reference, losses = _losses(uninterrupted), _losses(run)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert losses == reference
    for r in (0, 1):
        masks, weights = _final_state(run, r)
        ref_masks, ref_weights = _final_state(uninterrupted, r)
        assert masks.keys() == ref_masks.keys()
        for name in masks:
            assert torch.equal(masks[name], ref_masks[name]), name
        assert len(weights) == len(ref_weights)
        for w, ref in zip(weights, ref_weights):
            assert torch.equal(w, ref)
    summary, ref_summary = (json.loads((p / "summary.json").read_text()) for p in (run, uninterrupted))
    assert summary["layers"] == ref_summary["layers"] and summary["mask_updates"] == ref_summary["mask_updates"] == 5


def test_maybe_fail_fires_only_at_the_named_point_step_and_rank(monkeypatch):
    kills = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setenv("RANK", "0")

    def fires(spec: str, point: str, step: int, rank: str = "") -> bool:
        monkeypatch.setenv(faults.ENV, spec)
        monkeypatch.setenv(faults.ENV_RANK, rank)
        kills.clear()
        faults.maybe_fail(point, step)
        return kills == [signal.SIGKILL]

    assert fires("mid-step", "mid-step", 3) and fires("mid-step@3", "mid-step", 3)
    assert not fires("mid-step", "mid-save", 3) and not fires("mid-step@4", "mid-step", 3)
    assert fires("mid-save", "mid-save", 3, rank="0") and not fires("mid-save", "mid-save", 3, rank="1")
    monkeypatch.delenv(faults.ENV)
    faults.maybe_fail("mid-step", 3)
    assert not kills


def test_a_misspelled_fault_point_is_an_error_naming_the_allowed_ones(monkeypatch):
    monkeypatch.setenv(faults.ENV, "mid-stpe@3")
    with pytest.raises(ValueError, match="mid-step, mid-update, mid-save"):
        faults.maybe_fail("mid-step", 3)


def test_an_armed_point_ends_the_process_by_sigkill():
    env = {**{k: v for k, v in os.environ.items() if k != faults.ENV_RANK}, faults.ENV: "mid-update@2"}
    code = "from rigl_ds.faults import maybe_fail as f; f('mid-update', 1); f('mid-update', 2); print('alive')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and "alive" not in done.stdout
    assert "RIGL_DS_FAULT=mid-update@2: killing rank 0" in done.stderr
