"""Launching with torchrun: two "nodes" on loopback, and an elastic restart after a killed rank."""

import json
import os
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


def test_two_nodes_on_loopback_train_dp2_x_pp2_like_one_node(tmp_path):
    args = ["-m", "pipetrain", "train", *TRAIN, "--dp", "2", "--steps", "4"]
    port = _free_port()
    with ThreadPoolExecutor(2) as pool:  # two "nodes", each a torchrun of 2 ranks
        nodes = list(pool.map(lambda n: _torchrun(
            ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "two-nodes", *args, "--metrics-jsonl", str(tmp_path / f"node{n}.jsonl")],
            env=ENV, cwd=tmp_path, timeout=180), range(2)))
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    logs = "".join(node.stdout for node in nodes)
    assert logs.count("summary: 4 steps") == 1 and "on dp 2 x pp 2 ranks" in logs  # global rank 0 only
    (multi,) = [_records(p) for p in tmp_path.glob("node*.jsonl")]  # written by global rank 0 only
    one = _torchrun(["--standalone", "--nproc-per-node", "2", "-m", "pipetrain", "train", *TRAIN, "--steps", "4",
                     "--metrics-jsonl", str(tmp_path / "one.jsonl")], env=ENV, cwd=tmp_path, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    single = _records(tmp_path / "one.jsonl")
    assert [r["loss"] for r in multi] == pytest.approx([r["loss"] for r in single], rel=1e-5)


def test_elastic_restart_resumes_from_the_latest_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path):
    def run(name: str, *extra: str, env: dict) -> subprocess.CompletedProcess:
        return _torchrun(["--standalone", "--nproc-per-node", "2", *extra, str(HERE / "elastic_train.py"), *TRAIN,
                          "--steps", "8", "--checkpoint-dir", str(tmp_path / name), "--checkpoint-every", "2",
                          "--resume", "--metrics-jsonl", str(tmp_path / f"{name}.jsonl")], env=env, cwd=tmp_path)

    straight = run("straight", env={**ENV, "FAIL_RANK": "-1", "FAIL_AT_STEP": "0"})
    assert straight.returncode == 0, straight.stderr[-3000:]
    # rank 1 is SIGKILLed as step 5 begins; torchrun restarts both ranks, which resume from step 4
    failing = {**ENV, "FAIL_RANK": "1", "FAIL_AT_STEP": "5"}
    without_restarts = run("no-restart", env=failing)
    assert without_restarts.returncode != 0, "a killed rank must fail the job"
    restarted = run("elastic", "--max-restarts", "1", env=failing)
    assert restarted.returncode == 0, restarted.stdout[-2000:] + restarted.stderr[-6000:]
    assert "resumed from" in restarted.stdout and "step_00000004" in restarted.stdout
    elastic, reference = _records(tmp_path / "elastic.jsonl"), _records(tmp_path / "straight.jsonl")
    assert [r["step"] for r in elastic] == list(range(1, 9))
    assert [r["loss"] for r in elastic] == [r["loss"] for r in reference]  # bit for bit
    assert elastic[-1]["eval_loss"] == reference[-1]["eval_loss"]


def test_elastic_restart_across_two_nodes_with_data_parallelism(tmp_path):
    # dp 2 x pp 2 over two "nodes"; global rank 3 (second node, second replica) is SIGKILLed as step 5
    # begins; both nodes' torchruns restart their ranks, which resume from step 4 (the README's recipe:
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node)
    port = _free_port()
    env = {**ENV, "FAIL_RANK": "3", "FAIL_AT_STEP": "5", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    args = [str(HERE / "elastic_train.py"), *TRAIN, "--steps", "8", "--dp", "2", "--checkpoint-dir",
            str(tmp_path / "ck"), "--checkpoint-every", "2", "--resume", "--metrics-jsonl", str(tmp_path / "m.jsonl")]
    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(lambda n: _torchrun(
            ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "elastic-two-nodes", "--max-restarts", "1", *args],
            env=env, cwd=tmp_path), range(2)))
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    logs = "".join(node.stdout for node in nodes)
    assert "resumed from" in logs and "step_00000004" in logs
    records = _records(tmp_path / "m.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    one = _torchrun(["--standalone", "--nproc-per-node", "2", "-m", "pipetrain", "train", *TRAIN, "--steps", "8",
                     "--metrics-jsonl", str(tmp_path / "one.jsonl")], env=ENV, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in _records(tmp_path / "one.jsonl")],
                                                        rel=1e-5)
