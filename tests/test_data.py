"""pipetrain.data: local text read, tokenized, cached, packed and batched; the document mask; bad input.
Offline: the tokenizer is a tiny BPE trained here on generated sentences (tests/text_data.py)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from text_data import model_folder, sentences, write_jsonl, write_parquet

import pipetrain as pt
from pipetrain.data import DataError, PackedRows, Tokens
from pipetrain.train.loader import BatchSource, share


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder (tiny Llama config + BPE tokenizer) and its documents."""
    root = tmp_path_factory.mktemp("model")
    docs = sentences(200)
    return model_folder(root / "model", docs), docs


def test_txt_jsonl_parquet_and_folders_tokenize_with_eos_between_documents(folder, tmp_path):
    model, docs = folder
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text(docs[0])
    (data / "sub" / "b.txt").write_text(docs[1])
    write_jsonl(data / "c.jsonl", docs[2:5], field="body")
    write_parquet(tmp_path / "d.parquet", docs[5:7], field="body")
    tokens = pt.data.tokenize([data, tmp_path / "d.parquet"], model, text_field="body", cache_dir=tmp_path / "c")
    # folders are read in path order: a.txt, c.jsonl, sub/b.txt; then the parquet file
    expected = [docs[0], *docs[2:5], docs[1], *docs[5:7]]
    assert tokens.documents == len(expected)
    tokenizer = pt.data.load_tokenizer(model)
    pieces = np.split(np.asarray(tokens.ids), np.flatnonzero(np.asarray(tokens.ids) == tokens.eos) + 1)[:-1]
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == expected
    assert all(p[-1] == tokens.eos for p in pieces)
    assert tokens.ids.dtype == np.uint16 and isinstance(tokens.ids, np.memmap)


def test_the_cache_is_read_again_and_keyed_by_files_and_settings(folder, tmp_path):
    model, docs = folder
    file = write_jsonl(tmp_path / "d.jsonl", docs[:50])
    first = pt.data.tokenize(file, model, cache_dir=tmp_path / "c")
    written = (first.path / "tokens.bin").stat().st_mtime_ns
    again = pt.data.tokenize(file, model, cache_dir=tmp_path / "c")
    assert again.path == first.path and (again.path / "tokens.bin").stat().st_mtime_ns == written
    assert np.array_equal(again.ids, first.ids)
    write_jsonl(file, docs[:51])  # the file changed: a new cache
    assert pt.data.tokenize(file, model, cache_dir=tmp_path / "c").path != first.path
    write_jsonl(tmp_path / "e.jsonl", docs[:50], field="body")
    assert pt.data.tokenize(tmp_path / "e.jsonl", model, text_field="body", cache_dir=tmp_path / "c").path not in \
        (first.path,)
    assert sorted(p.name.startswith(".tmp") for p in (tmp_path / "c").iterdir()) == [False] * 3


def test_a_progress_bar_while_tokenizing_and_held_out_files(folder, tmp_path, capsys):
    model, docs = folder
    data = pt.data.text_rows(write_jsonl(tmp_path / "d.jsonl", docs[:150]), model, seq_len=16,
                             eval_paths=[write_jsonl(tmp_path / "e.jsonl", docs[150:])], cache_dir=tmp_path / "c",
                             progress=True)
    assert "tokenizing" in capsys.readouterr().err  # tqdm's bar, on stderr
    assert data.held_out.tokens.documents == 50 and data.train.tokens.documents == 150
    assert len(data.held_out) == (len(data.held_out_tokens) - 1) // 16


def test_a_crash_while_tokenizing_leaves_no_cache(folder, tmp_path, monkeypatch):
    model, docs = folder
    file = write_jsonl(tmp_path / "d.jsonl", docs)

    def broken(*args, **kwargs):
        yield pt.data.Piece(file, docs[0])
        raise KeyboardInterrupt  # the process dies mid-way

    monkeypatch.setattr("pipetrain.data.tokens.read_documents", broken)
    with pytest.raises(KeyboardInterrupt):
        pt.data.tokenize(file, model, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []  # no half cache, no temporary left
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    place = pt.data.tokens.writer_place()
    killed = tmp_path / "c" / f".tmp-0123-{place}-{int(dead.stdout)}-1"  # a writer killed -9
    elsewhere = tmp_path / "c" / f".tmp-0123-other{place}-{int(dead.stdout)}-1"  # another host's: kept
    elsewhere.mkdir(parents=True)
    (killed / "tokens.bin").parent.mkdir(parents=True)
    (killed / "tokens.bin").write_bytes(b"half")
    monkeypatch.undo()
    assert pt.data.tokenize(file, model, cache_dir=tmp_path / "c").documents == len(docs)
    left = sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".tmp"))
    assert left == [elsewhere.name]  # the next writer removed its host's, not another's


def test_a_long_txt_file_streams_in_pieces_and_tokenizes_as_a_whole(folder, tmp_path, monkeypatch):
    model, docs = folder
    lines = "\n".join(docs[:60]) + "\n\n  indented line.\n" + " ".join(docs[60:90])  # the tail: one long line
    (tmp_path / "long.txt").write_text(lines)
    (tmp_path / "wordless.txt").write_text("x" * 700)
    monkeypatch.setattr("pipetrain.data.files.TEXT_PIECE", 40)
    pieces = list(pt.data.read_documents(pt.data.data_files([tmp_path / "long.txt", tmp_path / "wordless.txt"])))
    by_file = {f: [p for p in pieces if p.path.name == f] for f in ("long.txt", "wordless.txt")}
    assert "".join(p.text for p in by_file["long.txt"]) == lines and len(by_file["long.txt"]) > 60
    assert [p.ends_document for p in by_file["long.txt"]] == [False] * (len(by_file["long.txt"]) - 1) + [True]
    assert max(len(p.text) for p in by_file["long.txt"]) <= 2 * 40  # never much more than TEXT_PIECE in memory
    assert "".join(p.text for p in by_file["wordless.txt"]) == "x" * 700 and len(by_file["wordless.txt"]) == 2
    streamed = pt.data.tokenize(tmp_path / "long.txt", model, cache_dir=tmp_path / "pieces")
    assert streamed.documents == 1 and list(streamed.ids).count(streamed.eos) == 1
    tokenizer = pt.data.load_tokenizer(model)
    expected = tokenizer(lines, add_special_tokens=False)["input_ids"] + [streamed.eos]
    assert streamed.ids.tolist() == expected  # cut where the tokenizer splits anyway: the same ids as whole
    # paragraphs with blank lines only between them, and a tokenizer that has a "\n\n" token
    newlines = model_folder(tmp_path / "newlines", [d + "\n\n" for d in docs])
    paragraphs = "\n\n".join(docs[90:150]) + "\n\n\n" + docs[150]
    (tmp_path / "paragraphs.txt").write_text(paragraphs)
    streamed = pt.data.tokenize(tmp_path / "paragraphs.txt", newlines, cache_dir=tmp_path / "pieces")
    tokenizer = pt.data.load_tokenizer(newlines)
    assert tokenizer("\n\n", add_special_tokens=False)["input_ids"].__len__() == 1
    assert streamed.ids.tolist() == tokenizer(paragraphs, add_special_tokens=False)["input_ids"] + [streamed.eos]


def fake_tokens(ids: list[int], eos: int) -> Tokens:
    return Tokens(ids=np.asarray(ids, dtype=np.uint16), eos=eos, vocab_size=max(ids) + 1,
                  documents=ids.count(eos), path=Path("."))


def test_rows_overlap_by_one_token_and_positions_restart_after_eos():
    E = 9
    tokens = fake_tokens([1, 2, 3, E, 4, 5, E, 6, 7, 8, 1, 2, E], eos=E)  # 13 tokens
    rows = PackedRows(tokens, 4)
    assert len(rows) == 3  # (13 - 1) // 4
    assert rows[1][0]["input_ids"].tolist() == [4, 5, E, 6, 7] and rows[1][1].tolist() == [4, 5, E, 6, 7]
    masked = PackedRows(tokens, 4, document_mask=True)
    inputs, labels = masked[0]
    assert inputs["position_ids"].tolist() == [0, 1, 2, 3, 0] and labels.tolist() == [1, 2, 3, E, -100]
    x, y = PackedRows(tokens, 4, format="shifted", document_mask=True)[1]
    assert x["input_ids"].tolist() == [4, 5, E, 6] and x["position_ids"].tolist() == [0, 1, 2, 0]
    assert y.tolist() == [5, E, -100, 7]
    cut = pt.data.split_point(tokens, 0.5)  # after the first EOS past the middle
    assert cut == 7 and tokens.ids[cut - 1] == E


def test_a_replica_reads_only_its_rows_and_gets_its_share(folder, tmp_path):
    model, docs = folder
    rows = pt.data.text_rows(write_jsonl(tmp_path / "d.jsonl", docs), model, seq_len=16,
                             cache_dir=tmp_path / "c").train
    read = []

    class Counting:
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            read.append(i)
            return rows[i]

    whole, mine = BatchSource(rows, batch_size=8, seed=3), BatchSource(Counting(), batch_size=8, seed=3)
    for _ in range(3):
        expected = share(whole.next(), 2, 1)
        got = mine.next_share(2, 1)
        assert torch.equal(got[0]["input_ids"], expected[0]["input_ids"]) and torch.equal(got[1], expected[1])
    assert len(read) == 3 * 4  # 4 of the 8 rows of each global batch


def _documents_alone_vs_packed(layers_of, loss_sum, causal_lm: bool, vocab: int):
    """The loss sum and gradients of one packed row (document mask) and of its 3 documents run alone."""
    E = vocab - 1
    g = torch.Generator().manual_seed(0)
    docs = [torch.cat([torch.randint(0, E, (n,), generator=g), torch.tensor([E])]) for n in (5, 8, 4)]
    ids = torch.cat(docs).tolist()
    rows = PackedRows(fake_tokens(ids, E), len(ids) - 1, format="causal_lm" if causal_lm else "shifted",
                      document_mask=True)
    assert len(rows) == 1
    results = []
    for batches in ([rows[0]], [({"input_ids": d} if causal_lm else d[:-1], d if causal_lm else d[1:]) for d in docs]):
        layers = layers_of()
        total = 0.0
        for inputs, targets in batches:
            x = {k: v[None] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[None]
            for layer in layers:
                x = layer(x)
            total = total + loss_sum(x, targets[None])
        total.backward()
        grads = {f"{i}.{n}": p.grad for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
        results.append((total.item(), grads))
    (packed, packed_grads), (alone, alone_grads) = results
    assert packed == pytest.approx(alone, rel=1e-5)
    for name, grad in alone_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_packed_row_with_the_document_mask_equals_its_documents_alone(family):
    from pipetrain import models

    cfg = models.PRESETS["tiny" if family == "gpt" else "llama-tiny"]

    def layers():
        torch.manual_seed(0)
        return models.build(cfg)

    def loss_sum(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")

    _documents_alone_vs_packed(layers, loss_sum, causal_lm=False, vocab=cfg.vocab_size)


def test_a_packed_row_with_the_document_mask_equals_its_documents_alone_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipetrain.models.hf import from_hf

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    def layers():
        torch.manual_seed(0)
        return from_hf(LlamaForCausalLM(config).float())[0]

    def loss_sum(logits, labels):
        return from_hf.__globals__["causal_lm_loss"](logits, labels)[0]

    _documents_alone_vs_packed(layers, loss_sum, causal_lm=True, vocab=64)


# --- bad input: one clear line ---------------------------------------------------------------------------
def test_bad_input_says_what_is_wrong(folder, tmp_path):
    model, docs = folder
    cache = tmp_path / "c"
    with pytest.raises(DataError, match="nope.jsonl: no such file or folder"):
        pt.data.tokenize(tmp_path / "nope.jsonl", model, cache_dir=cache)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="the data is empty"):
        pt.data.tokenize(tmp_path / "empty.jsonl", model, cache_dir=cache)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n\n{"text": "two"}\n{"body": "three"}\n')  # blank lines are skipped
    with pytest.raises(DataError, match=r"bad.jsonl: line 4 has no 'text' field \(fields: \['body'\]\).*--text-field"):
        pt.data.tokenize(bad, model, cache_dir=cache)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not UTF-8 text"):
        pt.data.tokenize(tmp_path / "latin1.txt", model, cache_dir=cache)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="no tokenizer in .*bare.*save_pretrained"):
        pt.data.tokenize(write_jsonl(tmp_path / "d.jsonl", docs[:3]), tmp_path / "bare", cache_dir=cache)
    with pytest.raises(DataError, match="fewer than one batch of 64"):
        pt.data.text_rows(tmp_path / "d.jsonl", model, seq_len=32, cache_dir=cache, min_rows=64)
    assert not any(p.name.startswith(".tmp") for p in cache.iterdir())


def test_the_core_imports_without_the_data_extra(tmp_path):
    code = ("import sys; sys.modules['datasets'] = None\n"
            "import pipetrain as pt\n"
            "from pipetrain.data.files import need, DataError\n"
            "try:\n    need('datasets')\nexcept DataError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "pip install 'pipetrain[data]'" in done.stdout


def test_a_preset_trains_on_local_text_with_a_tokenizer_folder(folder, tmp_path):
    from workers import run_threads

    model, docs = folder
    file = write_jsonl(tmp_path / "d.jsonl", docs)
    config = dict(preset="llama-tiny", tokenizer=str(model), data=[str(file)], document_mask=True, steps=3,
                  microbatches=2, batch_size=4, eval_batches=1, log_every=100, progress=False,
                  data_cache=str(tmp_path / "c"))

    def body(rank, world, transport):
        trainer = pt.trainer_from_config(pt.TrainConfig(**config), transport=transport)
        return trainer.model_info["vocab_size"], trainer.fit()

    ((vocab, history),) = run_threads(1, body)  # (the multi-rank CLI run is in test_data_cli.py)
    assert vocab == len(pt.data.load_tokenizer(model)) and len(history) == 3 and math.isfinite(history[-1]["loss"])


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_packed_rows_with_the_document_mask_cross_stages_exactly(family):
    """The (hidden, positions) pair between a reference model's stages: a 2-rank pipeline's token-mean loss and
    gradients equal one process's on the same packed rows."""
    import copy

    from torch.utils.data import default_collate
    from workers import run_threads

    from pipetrain import models

    cfg = models.PRESETS["tiny" if family == "gpt" else "llama-tiny"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 255, (300,), generator=g)
    ids[torch.randint(0, 300, (12,), generator=g)] = 255  # EOS
    rows = PackedRows(fake_tokens(ids.tolist(), 255), 32, format="shifted", document_mask=True)
    x, y = default_collate([rows[i] for i in range(4)])

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"), (targets != -100).sum()

    torch.manual_seed(0)
    base = models.build(cfg)
    ref = copy.deepcopy(base)
    h = x
    for layer in ref:
        h = layer(h)
    total, count = loss_fn(h, y)
    (total / count).backward()

    def body(rank, world, transport):
        layers = copy.deepcopy(base)
        sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=2)
        pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=transport)
        loss = pipe.step(x, y)
        return loss, {(i, n): p.grad for i in pipe.layers for n, p in layers[i].named_parameters()}

    results = run_threads(2, body)
    assert results[0][0] == pytest.approx((total / count).item(), rel=1e-5)
    for (i, name), grad in {**results[0][1], **results[1][1]}.items():
        expected = dict(ref[i].named_parameters())[name].grad
        assert (grad - expected).norm() <= 1e-5 * expected.norm() + 1e-8, (i, name)
