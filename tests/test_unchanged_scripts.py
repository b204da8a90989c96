"""Training scripts as users write them (tests/clients/, which never mention rigl_ds), run unchanged
under the launchers users type, with a "rigl" block in their DeepSpeed config: they train sparse
(exact per-layer counts, masks moving, rigl/* log entries), or stop at start-up saying how to
enable rigl_ds. Two gloo ranks each."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import rigl_ds
from rigl_ds.corpus import kjv_text
from rigl_ds.layers import find_sparse_weights
from rigl_ds.plan import build_plan

CLIENTS = Path(__file__).resolve().parent / "clients"
BIN = Path(sys.executable).parent
TIMEOUT = 480
RIGL = {"method": "rigl", "sparsity": 0.8, "delta_t": 2, "end_fraction": 0.75, "seed": 3}
STEPS = 8
# Updates at steps 0, 2, 4, 6: every delta_t = 2 steps up to 0.75 of the 8 steps the run states.
UPDATE_STEPS = [0, 2, 4, 6]
GPT2 = dict(vocab_size=256, n_positions=32, n_layer=2, n_embd=32, n_head=2)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "kjv_head.txt"
    path.write_text("\n".join(kjv_text().splitlines()[:400]))
    return path


def expected_active() -> Dict[str, int]:
    """Per masked layer of the clients' GPT-2, the active count the plan prescribes at RIGL's sparsity."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**GPT2))
    config = rigl_ds.load_config(RIGL)
    weights = find_sparse_weights(model, config.modules)
    plan = build_plan(config, {n: tuple(p.shape) for n, p in weights.items()})
    targets = plan.targets(config.sparsity)
    return {layer.name: int(sum(targets[p] for p in layer.pools)) for layer in plan.layers}


def launch(cmd: List[str], cwd: Path, env_extra: Dict[str, str] | None = None, ok: bool = True):
    env = {**os.environ, **(env_extra or {})}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0, out[-6000:]
    return proc.returncode, out


def ds_config(path: Path, **extra) -> Path:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
        "csv_monitor": {"enabled": True, "output_path": str(path.parent / "monitor"), "job_name": "job"},
        "rigl": RIGL,
    }
    cfg.update(extra)
    path.write_text(json.dumps(cfg))
    return path


SCHEDULER = {"type": "WarmupDecayLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": 1}}


def zeros_per_layer(state: Dict[str, torch.Tensor], names) -> Dict[str, int]:
    return {n: int((state[n] == 0).sum()) for n in names}


def assert_sparse(final: Dict[str, torch.Tensor], early: Dict[str, torch.Tensor]) -> None:
    """Exact per-layer counts in the final weights, and masks that moved after the early snapshot."""
    expected = expected_active()
    active = {n: final[n].numel() - z for n, z in zeros_per_layer(final, expected).items()}
    assert active == expected
    moved = sum(int(((final[n] == 0) != (early[n] == 0)).sum()) for n in expected)
    assert moved > 0
    dense = [n for n, t in final.items() if t.dim() == 2 and n not in expected]
    assert dense and all(int((final[n] == 0).sum()) == 0 for n in dense)  # embeddings stay dense


def monitor_rows(folder: Path, name: str) -> List[List[float]]:
    with open(folder / "monitor" / "job" / f"{name}.csv") as f:
        return [[float(x) for x in row] for row in list(csv.reader(f))[1:]]


def assert_monitor_shows_updates(folder: Path) -> None:
    assert monitor_rows(folder, "rigl_updates") == [[s, i + 1] for i, s in enumerate(UPDATE_STEPS)]
    total = sum(expected_active().values())
    assert {row[1] for row in monitor_rows(folder, "rigl_n_active")} == {total}


def run_plain(tmp_path: Path, text_file: Path, prefix: List[str], env=None, ok=True, **cfg):
    config = ds_config(tmp_path / "ds.json", **cfg)
    args = ["--deepspeed_config", str(config), "--train_file", str(text_file), "--out", str(tmp_path / "out")]
    args += ["--steps", str(STEPS), "--save_at", "2"]
    return launch([*prefix, *args], tmp_path, env, ok)


def _load(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_plain_deepspeed_script_under_rigl_ds_run_trains_sparse(tmp_path, text_file):
    prefix = ["deepspeed", "--num_gpus", "2", "--module", "rigl_ds.run", str(CLIENTS / "plain_ds.py")]
    run_plain(tmp_path, text_file, prefix, scheduler=SCHEDULER)
    out = tmp_path / "out"
    assert_sparse(_load(out / "weights_final.pt"), _load(out / "weights_step2.pt"))
    assert_monitor_shows_updates(tmp_path)
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert sorted(os.listdir(out / "checkpoints" / tag / "rigl_ds"))[:2] == ["complete.json", "rank00000.pt"]


@pytest.mark.slow
def test_plain_deepspeed_script_with_packed_storage_under_rigl_ds_run_trains_sparse(tmp_path, text_file):
    """"storage": "packed" in the config alone: the script's model holds active values only, and the
    dense weights they stand for keep the exact counts and move as with masked storage."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rigl_ds.export import _unpacked

    prefix = ["deepspeed", "--num_gpus", "2", "--module", "rigl_ds.run", str(CLIENTS / "plain_ds.py")]
    run_plain(tmp_path, text_file, prefix, scheduler=SCHEDULER, rigl={**RIGL, "storage": "packed"})
    out = tmp_path / "out"
    final, early = _load(out / "weights_final.pt"), _load(out / "weights_step2.pt")
    assert not any(n in final for n in expected_active())  # no dense masked weight in the model
    shapes = {n: p for n, p in GPT2LMHeadModel(GPT2Config(**GPT2)).state_dict().items() if n in expected_active()}
    assert_sparse(_unpacked(final, shapes), _unpacked(early, shapes))
    assert_monitor_shows_updates(tmp_path)


@pytest.mark.slow
def test_plain_deepspeed_script_launched_without_the_wrapper_trains_sparse(tmp_path, text_file):
    run_plain(tmp_path, text_file, ["deepspeed", "--num_gpus", "2", str(CLIENTS / "plain_ds.py")], scheduler=SCHEDULER)
    out = tmp_path / "out"
    assert_sparse(_load(out / "weights_final.pt"), _load(out / "weights_step2.pt"))
    assert_monitor_shows_updates(tmp_path)


@pytest.mark.slow
def test_with_the_autohook_off_an_unwrapped_script_stops_at_start_up_saying_how_to_enable_rigl_ds(tmp_path, text_file):
    prefix = ["deepspeed", "--num_gpus", "2", str(CLIENTS / "plain_ds.py")]
    rc, out = run_plain(tmp_path, text_file, prefix, env={"RIGL_DS_AUTOHOOK": "0"}, ok=False, scheduler=SCHEDULER)
    assert rc != 0
    assert "rigl_ds.run" in out and "RIGL_DS_AUTOHOOK" in out
    assert not (tmp_path / "out" / "weights_step2.pt").exists()  # not one step taken dense


@pytest.mark.slow
def test_without_a_step_count_the_run_stops_before_its_first_step_naming_rigl_end_step(tmp_path, text_file):
    prefix = ["deepspeed", "--num_gpus", "2", "--module", "rigl_ds.run", str(CLIENTS / "plain_ds.py")]
    rc, out = run_plain(tmp_path, text_file, prefix, ok=False)  # no scheduler block, no end_step
    assert rc != 0 and "rigl.end_step" in out
    assert not (tmp_path / "out" / "weights_step2.pt").exists()


def hf_config(path: Path) -> Path:
    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
        "rigl": RIGL,
    }
    path.write_text(json.dumps(cfg))
    return path


def run_trainer(tmp_path: Path, text_file: Path, prefix: List[str]) -> Path:
    out = tmp_path / "hf_out"
    args = ["--deepspeed", str(hf_config(tmp_path / "ds.json")), "--train_file", str(text_file)]
    args += ["--output_dir", str(out), "--max_steps", str(STEPS), "--per_device_train_batch_size", "2"]
    args += ["--use_cpu", "--logging_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    args += ["--report_to", "none", "--learning_rate", "3e-3"]
    launch([*prefix, *args], tmp_path)
    return out


def assert_trainer_trained_sparse(out: Path) -> None:
    from safetensors.torch import load_file

    final = load_file(str(out / "model.safetensors"))
    early = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    final.setdefault("lm_head.weight", final["transformer.wte.weight"])  # tied, saved once
    assert_sparse(final, early)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6, 8]
    # Updates at steps 0, 2, 4, 6 (end_fraction of the Trainer's max_steps = 8): logs after steps 2, 4, 6, 8.
    assert [h["rigl/updates"] for h in logged] == [1, 2, 3, 4]
    assert {h["rigl/n_active"] for h in logged} == {sum(expected_active().values())}
    assert all(abs(h["rigl/sparsity"] - 0.8) < 0.01 for h in logged)


@pytest.mark.slow
def test_trainer_script_with_deepspeed_flag_under_rigl_ds_run_trains_sparse(tmp_path, text_file):
    prefix = ["deepspeed", "--num_gpus", "2", "--module", "rigl_ds.run", str(CLIENTS / "hf_trainer_clm.py")]
    assert_trainer_trained_sparse(run_trainer(tmp_path, text_file, prefix))


@pytest.mark.slow
def test_trainer_script_under_torchrun_without_the_wrapper_trains_sparse(tmp_path, text_file):
    prefix = ["torchrun", "--nproc_per_node", "2", "--master_port", "29517", str(CLIENTS / "hf_trainer_clm.py")]
    assert_trainer_trained_sparse(run_trainer(tmp_path, text_file, prefix))


def accelerate_config(tmp_path: Path, **cfg) -> Path:
    ds = ds_config(tmp_path / "acc_ds.json", **cfg)
    path = tmp_path / "accelerate.yaml"
    path.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ds}\n  zero3_init_flag: false\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nuse_cpu: true\nmain_process_port: 29518\n"
    )
    return path


@pytest.mark.slow
def test_accelerate_script_with_a_deepspeed_plugin_under_rigl_ds_run_trains_sparse(tmp_path, text_file):
    auto = {k: "auto" for k in ("total_num_steps", "warmup_num_steps", "warmup_min_lr", "warmup_max_lr")}
    config = accelerate_config(tmp_path, scheduler={"type": "WarmupDecayLR", "params": auto})
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        str(config),
        "-m",
        "rigl_ds.run",
        str(CLIENTS / "accelerate_clm.py"),
    ]
    args = ["--train_file", str(text_file), "--out", str(tmp_path / "out"), "--steps", str(STEPS), "--save_at", "2"]
    launch([*cmd, *args], tmp_path)
    out = tmp_path / "out"
    assert_sparse(_load(out / "weights_final.pt"), _load(out / "weights_step2.pt"))
    # The step count came from accelerate's DummyScheduler, through the "auto" total_num_steps it filled in.
    assert_monitor_shows_updates(tmp_path)
