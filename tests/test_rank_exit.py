"""A finished rank ends cleanly: rigl_ds.run ends a gloo rank before interpreter finalization, with the
script's exit code and atexit handlers kept, and DeepSpeed's leaked shm workspace removed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from rigl_ds import rank_exit

SCRIPT = """
import atexit, os, sys, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + sys.argv[1] + "/store", rank=0, world_size=1)
atexit.register(lambda: open(sys.argv[1] + "/atexit_ran", "w").close())
print("trained", flush=True)
if len(sys.argv) > 2:
    sys.exit(int(sys.argv[2]))
"""


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "RANK": "0"}
    cmd = [sys.executable, "-m", "rigl_ds.run", str(script), str(tmp_path), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_a_finished_gloo_rank_under_rigl_ds_run_exits_zero_with_its_atexit_handlers_run(tmp_path):
    shm = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_0")
    shm.write_bytes(b"x")  # what DeepSpeed leaves behind on a CPU node
    try:
        done = _run(tmp_path)
        assert done.returncode == 0, done.stderr
        assert "trained" in done.stdout and (tmp_path / "atexit_ran").exists()
        assert not shm.exists()
    finally:
        shm.unlink(missing_ok=True)


def test_a_script_that_exits_non_zero_keeps_its_code(tmp_path):
    done = _run(tmp_path, "3")
    assert done.returncode == 3 and "trained" in done.stdout
    assert (tmp_path / "atexit_ran").exists()


def test_the_exit_grace_is_installed_once_and_removes_the_shm_workspace(monkeypatch, tmp_path):
    registered = []
    monkeypatch.setattr(rank_exit.atexit, "register", registered.append)
    monkeypatch.setattr(rank_exit, "_grace_installed", False)
    rank_exit.install_exit_grace()
    rank_exit.install_exit_grace()
    assert registered == [rank_exit._exit_grace]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(rank_exit, "_GRACE_SECONDS", 0.0)
    shm = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_2_1")
    shm.write_bytes(b"x")
    try:
        rank_exit._exit_grace()
        assert not shm.exists()
    finally:
        shm.unlink(missing_ok=True)
