"""Streamed tokenisation into shards (`minimoe tokenize`) and training from them.

Invariants: the shards hold exactly the documents' tokens (each + eos, domain after domain);
reading across shard boundaries equals one array; a vocabulary over 65,536 is stored as uint32
without loss; the batches drawn from shards are pure functions of (seed, step)."""

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from minimoe import data as corpus_data, shards
from minimoe.cli import main
from minimoe.data import MIN_DOC_CHARS, clean_text
from minimoe.shards import ConcatTokens, load_shards, tokenize
from minimoe.tokens import EOS

SENTENCES = ["the quick brown fox jumps over the lazy dog number {i} again and again",
             "a stitch in time saves nine said the tailor to apprentice {i} every morning"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two domains: a folder of .txt paragraphs and a .jsonl whose lines name their domain."""
    root = tmp_path_factory.mktemp("text")
    (root / "books").mkdir()
    paragraphs = [" ".join(SENTENCES[0].format(i=i * 10 + j) for j in range(3)) for i in range(30)]
    (root / "books" / "a.txt").write_text("\n\n".join(paragraphs[:15]) + "\n")
    (root / "books" / "b.txt").write_text("\n\n".join(paragraphs[15:]) + "\n")
    lines = [json.dumps({"text": " ".join(SENTENCES[1].format(i=i * 10 + j) for j in range(3)),
                         "domain": "sayings"}) for i in range(30)]
    (root / "sayings.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenized(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "shards"
    manifest = tokenize([str(corpus)], out, vocab_size=300, val_fraction=0.2, shard_tokens=500,
                        progress=False)
    return out, manifest


def test_shards_hold_exactly_the_documents_tokens(corpus, tokenized):
    out, manifest = tokenized
    data, tok = load_shards(out)
    assert manifest["dtype"] == "uint16" and manifest["domains"] == ["books", "sayings"]
    assert sum(len(e) for e in manifest["shards"]["train"]["books"]) > 1  # several shards
    # what the shards must hold: every kept document's ids + eos, in stream order, per split
    expected = {"train": {"books": [], "sayings": []}, "val": {"books": [], "sayings": []}}
    docs = list(corpus_data.documents(corpus_data.user_sources([str(corpus)])))
    split = corpus_data.Split(docs, val_fraction=0.2, seed=0)
    for domain, lang, text in docs:
        name = "val" if split.is_val(domain, lang, text) else "train"
        expected[name][domain] += tok.encode(text) + [tok.eos_id]
    train = expected["train"]["books"] + expected["train"]["sayings"]
    assert np.array_equal(data.arrays["train"][0:len(train)], train)
    assert data.n_tokens() == len(train) == manifest["tokens"]["train"]
    assert data.domain_ranges["books"] == (0, len(expected["train"]["books"]))
    for domain in ("books", "sayings"):
        assert np.array_equal(data.arrays[f"val_{domain}"][0:10**9], expected["val"][domain])
    assert manifest["tokens"]["val"] == sum(len(v) for v in expected["val"].values())
    assert data.langs == ["en"] and data.val_domains == ["books", "sayings"]


def test_reading_across_shards_equals_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 100, n).astype(np.uint16) for n in (5, 1, 7, 3)]
    whole = np.concatenate(parts)
    tokens = ConcatTokens(parts)
    assert len(tokens) == len(whole)
    for a in range(len(whole)):
        for b in range(a, len(whole) + 1):
            assert np.array_equal(tokens[a:b], whole[a:b]), (a, b)


def test_shards_are_opened_when_read_and_few_stay_open(tokenized, monkeypatch):
    """However many shards a corpus has, at most OPEN_SHARDS memory maps (each a file
    descriptor) are open at once, and reading through them still gives every token."""
    out, manifest = tokenized
    assert sum(len(e) for e in manifest["shards"]["train"].values()) > 3
    shards._memmap.cache_clear()  # closes the maps earlier tests opened
    monkeypatch.setattr(shards, "_memmap", functools.lru_cache(2)(shards._memmap.__wrapped__))
    data, _ = load_shards(out)
    assert shards._memmap.cache_info().currsize == 0  # nothing opened until read
    whole = np.concatenate([np.fromfile(out / e["file"], dtype=manifest["dtype"])
                            for entries in manifest["shards"]["train"].values() for e in entries])
    train = data.arrays["train"]
    assert np.array_equal(np.concatenate([train[i:i + 97] for i in range(0, len(train), 97)]), whole)
    open_bins = [p for p in Path("/proc/self/fd").iterdir() if str(os.path.realpath(p)).endswith(".bin")]
    assert shards._memmap.cache_info().currsize == 2 and len(open_bins) <= 2


def test_batches_from_shards_are_pure_functions_of_seed_and_step(tokenized):
    out, _ = tokenized
    a, _ = load_shards(out)
    b, _ = load_shards(out)
    for step in (0, 7):
        for weights in (None, {"books": 0.5, "sayings": 0.5}):
            xa, ya = a.train_batch(step, 4, 16, seed=3, weights=weights)
            xb, yb = b.train_batch(step, 4, 16, seed=3, weights=weights)
            assert (xa == xb).all() and (ya == yb).all() and (xa[:, 1:] == ya[:, :-1]).all()
    assert not (a.train_batch(0, 4, 16)[0] == a.train_batch(1, 4, 16)[0]).all()


def test_a_large_vocabulary_is_stored_as_uint32(corpus, tmp_path):
    """A word-level tokenizer of 151,851 entries (the paper's vocabulary size) whose words sit
    above 65,535: uint16 would wrap them."""
    words = sorted({w for s in SENTENCES for w in s.replace("{i}", "").split()}
                   | {str(i) for i in range(400)})
    vocab = {f"filler{i}": i for i in range(151_851 - len(words) - 2)}
    vocab.update({w: len(vocab) + i for i, w in enumerate(words)})
    vocab.update({"[UNK]": len(vocab), EOS: len(vocab) + 1})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    manifest = tokenize([str(corpus)], tmp_path / "big", tokenizer=str(tmp_path / "tokenizer.json"),
                        val_fraction=0.2, progress=False)
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 151_851
    data, tok = load_shards(tmp_path / "big")
    ids = data.arrays["train"][0:len(data.arrays["train"])]
    assert ids.min() > 65_535 and ids.max() == tok.eos_id
    assert tok.decode(ids[:5].tolist()).split()[:2] == ["the", "quick"]


def test_a_finished_folder_is_kept_an_interrupted_one_redone(corpus, tokenized, tmp_path):
    out, manifest = tokenized
    again = tokenize([str(corpus)], out, vocab_size=300, val_fraction=0.2, shard_tokens=500)
    assert again == manifest
    with pytest.raises(ValueError, match="holds shards of another request"):
        tokenize([str(corpus)], out, vocab_size=300, val_fraction=0.1, shard_tokens=500)
    # an interrupted run leaves its request and partial shards, no manifest: redone from scratch
    partial = tmp_path / "partial"
    tokenize([str(corpus)], partial, vocab_size=300, val_fraction=0.2, shard_tokens=500,
             progress=False)
    (partial / "manifest.json").unlink()
    (partial / "tokenize.json").write_text(json.dumps(manifest["request"]))
    (partial / "train" / "books" / "00000.bin").write_bytes(b"\x00" * 6)
    redone = tokenize([str(corpus)], partial, vocab_size=300, val_fraction=0.2, shard_tokens=500,
                      progress=False)
    assert redone["tokens"] == manifest["tokens"]
    assert not (partial / "tokenize.json").exists()


def test_a_long_paragraph_is_cut_at_a_line(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_data, "MAX_DOC_CHARS", 3 * MIN_DOC_CHARS)
    line = "x" * MIN_DOC_CHARS + "\n"
    (tmp_path / "one.txt").write_text(line * 7)  # no blank line: one paragraph of 7 lines
    docs = list(corpus_data._txt_documents(tmp_path / "one.txt"))
    assert [len(d) for d in docs] == [3 * len(line), 3 * len(line), len(line)]
    assert clean_text("".join(docs)) == clean_text(line * 7)


def test_tokenize_and_pretrain_from_shards_on_the_command_line(corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["tokenize", "--data", str(corpus), "--out", str(out), "--vocab-size", "300",
                 "--val-fraction", "0.2", "--no-progress"]) == 0
    assert "uint16 shards" in capsys.readouterr().out
    assert main(["pretrain", "--preset", "tiny", "--data", str(out), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"]["paths"] == [str(out.resolve())]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"] == 300
    assert main(["tokenize", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
