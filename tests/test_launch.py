"""Launching with torchrun: two "nodes" on loopback, and an elastic restart after a killed rank."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TRAIN = ["--preset", "tiny", "--microbatches", "2", "--batch-size", "8", "--eval-batches", "1", "--log-every", "1",
         "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], *, env: dict, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run torchrun; on a timeout SIGTERM it, which it passes on to its workers (each in a session of its
    own, out of reach of a kill of torchrun's group), so a hung test leaves no orphaned ranks behind."""
    proc = subprocess.Popen([TORCHRUN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    """The metrics of 8 uninterrupted steps on one node (2 ranks), checkpointing as the elastic runs do."""
    path = tmp_path_factory.mktemp("straight")
    run = _elastic_train(path, "straight", env={**ENV, "FAIL_RANK": "-1", "FAIL_AT_STEP": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    return _records(path / "straight.jsonl")


def _elastic_train(path: Path, name: str, *extra: str, env: dict) -> subprocess.CompletedProcess:
    return _torchrun(["--standalone", "--nproc-per-node", "2", *extra, str(HERE / "elastic_train.py"), *TRAIN,
                      "--steps", "8", "--checkpoint-dir", str(path / name), "--checkpoint-every", "2", "--resume",
                      "--metrics-jsonl", str(path / f"{name}.jsonl")], env=env, cwd=path)


def test_elastic_restart_resumes_from_the_latest_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path, uninterrupted):
    # rank 1 is SIGKILLed as step 5 begins; torchrun restarts both ranks, which resume from step 4
    failing = {**ENV, "FAIL_RANK": "1", "FAIL_AT_STEP": "5"}
    restarted = _elastic_train(tmp_path, "elastic", "--max-restarts", "1", env=failing)
    assert restarted.returncode == 0, restarted.stdout[-2000:] + restarted.stderr[-6000:]
    assert "resumed from" in restarted.stdout and "step_00000004" in restarted.stdout
    elastic = _records(tmp_path / "elastic.jsonl")
    assert [r["step"] for r in elastic] == list(range(1, 9))
    assert [r["loss"] for r in elastic] == [r["loss"] for r in uninterrupted]  # bit for bit
    assert elastic[-1]["eval_loss"] == uninterrupted[-1]["eval_loss"]


def test_two_nodes_train_dp2_x_pp2_like_one_node_and_restart_elastically(tmp_path, uninterrupted):
    # dp 2 x pp 2 over two "nodes" on loopback, each a torchrun of 2 ranks; global rank 3 (second node,
    # second replica) is SIGKILLed as step 5 begins; both nodes' torchruns restart their ranks, which
    # resume from step 4 (the recipe of docs/launching.md: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node)
    port = _free_port()
    env = {**ENV, "FAIL_RANK": "3", "FAIL_AT_STEP": "5", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    args = [str(HERE / "elastic_train.py"), *TRAIN, "--steps", "8", "--dp", "2", "--checkpoint-dir",
            str(tmp_path / "ck"), "--checkpoint-every", "2", "--resume"]
    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(lambda n: _torchrun(
            ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "elastic-two-nodes", "--max-restarts", "1", *args,
             "--metrics-jsonl", str(tmp_path / f"node{n}.jsonl")], env=env, cwd=tmp_path), range(2)))
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    logs = "".join(node.stdout for node in nodes)
    assert "resumed from" in logs and "step_00000004" in logs
    assert len(re.findall(r"summary: \d+ steps", logs)) == 1 and "on dp 2 x pp 2 ranks" in logs  # global rank 0 only
    (records,) = [_records(p) for p in tmp_path.glob("node*.jsonl")]  # written by global rank 0 only
    assert [r["step"] for r in records] == list(range(1, 9))
    # the same global batches as one node's 2-rank pipeline: the same losses
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in uninterrupted], rel=1e-5)
