"""The ``deepspeed`` launcher across two nodes, emulated with two Linux network namespaces.

Each namespace is one "node": its own network stack (``lo`` plus one end of a veth pair, 10.213.0.1
and 10.213.0.2), in which one launcher runs with ``--no_ssh --node_rank R`` and starts one CPU rank.
The two ranks meet over the veth link (TCP store and gloo), exactly as two hosts would over their
network. The namespaces are created by the test and removed after it, also on failure; they need
root, so elsewhere the test is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import ds_sim
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "ds_launch_job.py")
LAUNCHER = os.path.join(os.path.dirname(sys.executable), "deepspeed")
SUBNET = "10.213.0"  # only inside the test's own namespaces: nothing is routed to or from the host
JOB_TIMEOUT = 480  # seconds, per launcher job (a cold JIT build of DeepSpeed's shm op under load takes minutes)
IP_TIMEOUT = 20  # seconds, per `ip` command


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)


def _ip_ok(*args: str) -> None:
    done = _ip(*args)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Node:
    def __init__(self, rank: int, netns: str, dev: str) -> None:
        self.rank, self.netns, self.dev = rank, netns, dev
        self.addr = f"{SUBNET}.{rank + 1}"


@pytest.fixture
def two_nodes():
    """Two network namespaces joined by a veth pair, ``lo`` up in each; removed at teardown."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` (iproute2) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = f"{os.getpid()}{uuid.uuid4().hex[:3]}"  # unique per run; veth names have at most 15 characters
    nodes = [Node(r, f"rigl-mn-{tag}-{r}", f"rv{tag}{'ab'[r]}") for r in range(2)]
    created = []
    try:
        for n in nodes:
            done = _ip("netns", "add", n.netns)
            if done.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {done.stderr.strip()}")
            created.append(n.netns)
        a, b = nodes
        done = _ip("link", "add", a.dev, "type", "veth", "peer", "name", b.dev)
        if done.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {done.stderr.strip()}")
        for n in nodes:
            _ip_ok("link", "set", n.dev, "netns", n.netns)
            _ip_ok("-n", n.netns, "addr", "add", f"{n.addr}/24", "dev", n.dev)
            _ip_ok("-n", n.netns, "link", "set", n.dev, "up")
            _ip_ok("-n", n.netns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for name in created:  # deleting a namespace also deletes the veth end inside it
            _ip("netns", "del", name)
        for n in nodes:  # a veth pair not yet moved into a namespace (setup failed half-way)
            if _ip("link", "show", n.dev).returncode == 0:
                _ip("link", "del", n.dev)


def _job_env(**extra: str) -> dict:
    """The launchers' environment (conftest.py gives it a per-venv TORCH_EXTENSIONS_DIR)."""
    return {**os.environ, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, log_path, env=None) -> subprocess.Popen:
    log = open(log_path, "w")
    try:
        # Its own session: on a timeout the launcher, its launch.py and the rank are ended as one group.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _wait_all(procs, logs, timeout: float) -> None:
    """Waits for every launcher; the first to fail (or the deadline) ends the others at once, so a
    node left waiting for a dead peer does not hold the test until the deadline."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"launcher job ran past {timeout}s:\n" + "\n".join(_tail(p) for p in logs))
            time.sleep(0.5)
    finally:
        for proc in procs:
            _stop(proc)
    for proc in procs:
        assert proc.returncode == 0, f"exit {proc.returncode}:\n" + "\n".join(_tail(p) for p in logs)


def _tail(path, n: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f"--- {path}\n" + f.read()[-n:]


def _job_args(tmp_path, name: str):
    return [
        SCRIPT,
        "--deepspeed_config",
        str(tmp_path / "ds.json"),
        "--out",
        str(tmp_path / f"{name}.json"),
        "--masks",
        str(tmp_path / f"{name}.pt"),
    ]


def _result(tmp_path, name: str):
    report = json.loads((tmp_path / f"{name}.json").read_text())
    masks = torch.load(tmp_path / f"{name}.pt")
    return report, masks


@pytest.mark.slow
def test_two_nodes_in_network_namespaces_reach_the_single_node_masks(tmp_path, two_nodes):
    (tmp_path / "ds.json").write_text(json.dumps(ds_sim.ds_config(2, "fp32", ds_sim.RIGL)))

    # The reference: one node, two local ranks, on the host's loopback.
    single_log = tmp_path / "single.log"
    single = _start(
        [LAUNCHER, "--num_gpus", "2", "--master_port", str(_free_port()), *_job_args(tmp_path, "single")],
        single_log,
        _job_env(),
    )
    _wait_all([single], [single_log], JOB_TIMEOUT)

    # Two nodes: one launcher in each namespace, no ssh, the same hostfile, one rank per node.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{n.addr} slots=1\n" for n in two_nodes))
    master = two_nodes[0].addr
    procs, logs = [], []
    try:
        for n in two_nodes:
            # Gloo advertises the address its host name resolves to: 127.0.0.1 here (/etc/hosts), so the
            # peer would dial its own loopback ("connectFullMesh failed ... Connection refused"). Name
            # the node's link instead.
            env = _job_env(GLOO_SOCKET_IFNAME=n.dev)
            log = tmp_path / f"node{n.rank}.log"
            cmd = ["ip", "netns", "exec", n.netns, LAUNCHER, "--hostfile", str(hostfile)]
            cmd += ["--num_nodes", "2", "--num_gpus", "1", "--no_ssh", "--node_rank", str(n.rank)]
            cmd += ["--master_addr", master, "--master_port", "29500"]  # a fresh namespace: any port is free
            procs.append(_start(cmd + _job_args(tmp_path, "nodes"), log, env))
            logs.append(log)
        _wait_all(procs, logs, JOB_TIMEOUT)
    finally:
        for proc in procs:
            _stop(proc)

    for n, log in zip(two_nodes, logs):  # each node's launcher started exactly one local rank
        assert f"nnodes=2, num_local_procs=1, node_rank={n.rank}" in log.read_text(), _tail(log)

    ref_report, ref_masks = _result(tmp_path, "single")
    report, masks = _result(tmp_path, "nodes")
    assert report["world"] == ref_report["world"] == 2
    assert report["layout"] == ref_report["layout"] == "fragments"
    assert report["updates"] == ref_report["updates"] == 2
    assert sorted(masks) == sorted(ref_masks) and len(masks) == len(report["report"])
    for name, mask in ref_masks.items():  # bit-identical whole masks
        assert masks[name].dtype == torch.bool and torch.equal(masks[name], mask), name
    assert report["report"] == ref_report["report"]  # exact per-layer counts, reduced over the ranks
    for layer in report["report"]:
        assert int(masks[layer["name"]].sum()) == layer["active"]
        assert masks[layer["name"]].numel() == layer["numel"]
    active, total = (sum(layer[k] for layer in report["report"]) for k in ("active", "numel"))
    assert abs(1 - active / total - 0.8) < 0.001
