"""`pipetrain train --hf DIR --data PATH...` under torchrun on 2 gloo ranks: local text tokenized and cached
(the second run reads the cache), a held-out split, the document mask, resume equal to an uninterrupted run;
and bad data as one line on every rank."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from text_data import model_folder, sentences, write_jsonl

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "pipetrain", "train", "--hf",
           str(tmp_path / "model"), "--data-cache", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "8",
           "--microbatches", "4", "--eval-batches", "1", "--log-every", "1", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV, cwd=tmp_path)


def test_train_on_local_text_caches_holds_out_and_resumes_exactly(tmp_path):
    docs = sentences(1500)
    model_folder(tmp_path / "model", docs)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", docs[:1000])
    for i, doc in enumerate(docs[1000:1010]):
        (tmp_path / "data" / f"t{i}.txt").write_text(doc)
    data = ["--data", str(tmp_path / "data"), str(tmp_path / "more.jsonl"), "--eval-fraction", "0.1", "--document-mask"]
    write_jsonl(tmp_path / "more.jsonl", docs[1010:])
    whole = _train(tmp_path, *data, "--steps", "4", "--checkpoint-dir", "a", "--checkpoint-every", "2",
                   "--metrics-jsonl", "a.jsonl")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert re.search(r"data: 1,500 documents, [\d,]+ tokens \(tokenized into .*cache", whole.stdout), whole.stdout
    before, after = (float(x) for x in (re.search(r"held-out loss before training (\S+)", whole.stdout).group(1),
                                         re.search(r"held-out loss (\S+) \(perplexity", whole.stdout.split(
                                             "summary")[1]).group(1)))
    assert after < before
    (cache,) = (tmp_path / "cache").iterdir()
    written = (cache / "tokens.bin").stat().st_mtime_ns
    # a second launch resumes the first one's step-2 checkpoint: the cache is read, the data goes on
    again = _train(tmp_path, *data, "--steps", "4", "--resume", str(tmp_path / "a" / "step_00000002"),
                   "--checkpoint-dir", "b", "--metrics-jsonl", "b.jsonl", "--sample-tokens", "8")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "read from the cache" in again.stdout and (cache / "tokens.bin").stat().st_mtime_ns == written
    assert re.search(r"prompt: +'[A-Z][a-z]+ .*'\n  generated: '.+'", again.stdout), again.stdout  # decoded text
    losses = {name: [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / name).read_text().splitlines())]
              for name in ("a.jsonl", "b.jsonl")}
    assert losses["b.jsonl"] == losses["a.jsonl"][2:] and len(losses["a.jsonl"]) == 4  # resumed at the next batch


def test_bad_data_is_one_line_on_every_rank(tmp_path):
    model_folder(tmp_path / "model", sentences(50))
    (tmp_path / "bad.jsonl").write_text('{"text": "one two"}\n{"body": "three"}\n')
    start = time.monotonic()
    done = _train(tmp_path, "--data", str(tmp_path / "bad.jsonl"), "--steps", "2")
    assert done.returncode != 0 and time.monotonic() - start < 90
    lines = [line for line in done.stderr.splitlines() if line.startswith("pipetrain train (rank")]
    assert sorted(line[:24] for line in lines) == ["pipetrain train (rank 0)", "pipetrain train (rank 1)"], done.stderr
    assert all("bad.jsonl: line 2 has no 'text' field" in line for line in lines), lines
    assert "exitcode  : 2" in done.stderr  # pipetrain's exit status for bad input (torchrun's own is 1)


def test_missing_data_or_tokenizer_fails_before_any_process_group_work(tmp_path, capsys):
    from pipetrain.cli import main

    model_folder(tmp_path / "model", sentences(50))
    assert main(["train", "--hf", str(tmp_path / "model"), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "bad configuration: " in (err := capsys.readouterr().err) and "nope.jsonl: no such file or folder" in err
    (tmp_path / "model" / "tokenizer.json").unlink()
    (tmp_path / "model" / "tokenizer_config.json").unlink()
    write_jsonl(tmp_path / "d.jsonl", sentences(5))
    assert main(["train", "--hf", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no tokenizer in" in err and "save_pretrained" in err
