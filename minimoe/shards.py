"""Pre-tokenised shards for text of any size: `minimoe tokenize --data PATH --out shards/`.

Streamed, unlike the demo pipeline (data.py, tokens.py): each document (a .txt paragraph, a
.jsonl line) is cleaned by the corpus rules, given its domain and language, put in train or val
by its own hash, and tokenised in batches into flat shards of uint16 ids (uint32 past 65,536
entries), each document followed by <|endoftext|>: shards/manifest.json (written last),
tokenizer.json, train/<domain>/00000.bin ..., val/<domain>/<lang>/00000.bin. Not done at this
scale: exact deduplication, and a validation document for every domain (the hash decides).

`load_shards` returns the same TokenData as tokens.py over the shards, each opened when read and
at most OPEN_SHARDS at once (a 3.6T-token corpus is ~27k shards, past a common `ulimit -n`), so
`--data shards/` trains by the same batch rule, each domain one range of the stream.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minimoe import files
from minimoe.data import (MIN_DOC_CHARS, clean_text, detect_lang, jsonl_record, unit_hash,
                          user_sources)
from minimoe.tokens import BPETokenizer, ByteTokenizer, TokenData, train_bpe

FORMAT = "minimoe-shards"
SHARD_TOKENS = 1 << 27  # 134M tokens: 256 MB of uint16 per shard
MAX_DOC_CHARS = 1_000_000  # a longer paragraph is cut at a line boundary
BATCH_DOCS = 512  # documents tokenised at once (the tokenizers library's threads)
FLUSH_TOKENS = 1 << 20  # a writer's buffer
OPEN_SHARDS = 64  # memory maps open at once, the most recently read


class Shard:
    """One shard file of n tokens, read through a memory map opened on demand (`_open`)."""

    def __init__(self, path: Path, dtype, n: int):
        self.path, self.dtype, self.n = str(path), np.dtype(dtype), n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> np.ndarray:
        return _open(self.path, self.dtype)[key]


_maps: OrderedDict = OrderedDict()


def _open(path: str, dtype) -> np.ndarray:
    """A shard's memory map, kept among the OPEN_SHARDS most recently read (a slice of an
    evicted one stays readable: it holds its own reference)."""
    if path in _maps:
        _maps.move_to_end(path)
    else:
        _maps[path] = np.memmap(path, dtype=dtype, mode="r")
        while len(_maps) > OPEN_SHARDS:
            _maps.popitem(last=False)
    return _maps[path]


class ConcatTokens:
    """Several memory-mapped shards read as one array: len() and slices [a:b] (what the batch
    and validation windows of TokenData take)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ConcatTokens takes slices with step 1")
        start, stop, _ = key.indices(len(self))
        pieces = []
        part = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            begin = int(self.ends[part]) - len(self.parts[part])
            end = min(stop, int(self.ends[part]))
            pieces.append(self.parts[part][start - begin:end - begin])
            start, part = end, part + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [np.zeros(0, np.int64)])


# --- reading documents one at a time -------------------------------------------------------
def _txt_documents(path: Path):
    """Paragraphs (a blank line ends one), a paragraph over MAX_DOC_CHARS cut at a line."""
    lines, size = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    lines.append(line)
                    size += len(line)
                    if size < MAX_DOC_CHARS:
                        continue
                if lines:
                    yield None, "".join(lines)
                    lines, size = [], 0
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if lines:
        yield None, "".join(lines)


def _jsonl_documents(path: Path):
    try:
        yield from _jsonl_records(path)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def _jsonl_records(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield jsonl_record(line, f"{path}:{n}")


def documents(sources: list[dict], stats: dict | None = None, bar=None):
    """(domain, lang, text) of every clean document long enough to keep, in source order."""
    for source in sources:
        path = Path(source["path"])
        reader = _jsonl_documents if path.suffix == ".jsonl" else _txt_documents
        for domain, raw in reader(path):
            if bar is not None:
                bar.update(len(raw.encode("utf-8")))
            text = clean_text(raw)
            if len(text) < MIN_DOC_CHARS:
                if stats is not None:
                    stats["too_short"] = stats.get("too_short", 0) + 1
                continue
            yield domain or source["domain"], detect_lang(text), text


# --- writing shards ---------------------------------------------------------------------------
class ShardWriter:
    """Token ids appended to <folder>/00000.bin, 00001.bin ... of at most shard_tokens each;
    a shard gets its name once complete."""

    def __init__(self, root: Path, folder: str, dtype, shard_tokens: int):
        self.root, self.folder, self.dtype, self.limit = root, folder, dtype, shard_tokens
        self.shards: list[dict] = []
        self.buffer: list[int] = []
        self.in_shard, self.file = 0, None

    def add(self, ids: list[int]):
        self.buffer += ids
        if len(self.buffer) >= FLUSH_TOKENS:
            self.flush()

    def flush(self):
        data = np.asarray(self.buffer, dtype=self.dtype)
        self.buffer = []
        while len(data):
            if self.file is None:
                name = f"{self.folder}/{len(self.shards):05d}.bin"
                (self.root / name).parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.root / (name + ".tmp"), "wb")
                self.shards.append({"file": name, "tokens": 0})
            take = data[:self.limit - self.in_shard]
            take.tofile(self.file)
            self.in_shard += len(take)
            self.shards[-1]["tokens"] = self.in_shard
            data = data[len(take):]
            if self.in_shard == self.limit:
                self._seal()

    def close(self) -> list[dict]:
        self.flush()
        if self.file is not None:
            self._seal()
        return self.shards

    def _seal(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        name = self.shards[-1]["file"]
        os.replace(self.root / (name + ".tmp"), self.root / name)
        self.file, self.in_shard = None, 0


# --- the tokenizer ----------------------------------------------------------------------------
def _sample_texts(sources: list[dict], val_fraction: float, seed: int, sample_chars: int):
    """A uniform sample of the training documents within a character budget: those with the
    smallest hash (a bottom-k sketch), so one pass in bounded memory sees the whole corpus."""
    heap, size = [], 0  # max-heap on the hash: (-u, text)
    for _, _, text in documents(sources):
        if unit_hash(seed, text) < val_fraction:
            continue
        heapq.heappush(heap, (-unit_hash(seed + 1, text), text))
        size += len(text)
        while size > sample_chars and len(heap) > 1:
            size -= len(heapq.heappop(heap)[1])
    return [text for _, text in sorted(heap, reverse=True)]


def _tokenizer(kind: str, vocab_size: int, sources, out: Path, val_fraction, seed, sample_chars):
    """("byte" | trained "bpe" | a tokenizers JSON file) -> (tokenizer, its manifest entry)."""
    if kind == "byte":
        return ByteTokenizer(), "byte"
    if kind == "bpe":
        if vocab_size <= 257:
            raise ValueError(f"vocab_size={vocab_size}: must exceed 257 (256 bytes + eos)")
        texts = _sample_texts(sources, val_fraction, seed, sample_chars)
        if not texts:
            raise ValueError("--data: no training document to train the tokenizer on")
        files.write_text(out / "tokenizer.json", train_bpe(texts, vocab_size))
    else:
        path = Path(kind)
        if not path.is_file():
            raise ValueError(f"tokenizer={kind!r}: must be bpe, byte or a tokenizer.json file")
        shutil.copyfile(path, out / "tokenizer.json")
    digest = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()[:8]
    stem = f"bpe{vocab_size}" if kind == "bpe" else Path(kind).stem
    tok = BPETokenizer(out / "tokenizer.json", name=f"{stem}-{digest}")
    if tok.eos_id is None:
        raise ValueError(f"tokenizer={kind!r}: has no <|endoftext|> token to end documents with")
    return tok, "file"


def tokenize(paths: list[str], out, tokenizer: str = "bpe", vocab_size: int = 2048,
             val_fraction: float = 0.03, seed: int = 0, shard_tokens: int = SHARD_TOKENS,
             sample_chars: int = 200_000_000, progress: bool = True) -> dict:
    """Stream `paths` (.txt/.jsonl files or folders) into shards in `out`; returns the manifest.
    A finished folder of the same request is returned as it is; an interrupted one is redone."""
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction={val_fraction}: must be between 0 and 0.5")
    if not isinstance(shard_tokens, int) or shard_tokens <= 0:
        raise ValueError(f"shard_tokens={shard_tokens!r}: must be a positive integer")
    sources = user_sources([str(p) for p in paths])
    request = {"sources": sources, "tokenizer": tokenizer, "vocab_size": vocab_size,
               "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
               "sample_chars": sample_chars, "min_doc_chars": MIN_DOC_CHARS}
    out = Path(out)
    if is_shard_folder(out):
        manifest = files.read_json(out / "manifest.json")
        if manifest["request"] != request:
            raise ValueError(f"out={out}: holds shards of another request; choose another --out")
        return manifest
    _claim(out, request)
    tok, kind = _tokenizer(tokenizer, vocab_size, sources, out, val_fraction, seed, sample_chars)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    writers: dict[tuple, ShardWriter] = {}
    counts = {"documents": {}, "dropped": {}}
    total = sum(s["bytes"] for s in sources)
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
              delay=3, leave=False) as bar:
        batch = []
        for doc in documents(sources, counts["dropped"], bar):
            batch.append(doc)
            if len(batch) == BATCH_DOCS:
                _write_batch(batch, tok, writers, out, dtype, shard_tokens, val_fraction, seed, counts)
                batch = []
        _write_batch(batch, tok, writers, out, dtype, shard_tokens, val_fraction, seed, counts)
    manifest = _manifest(request, tok, kind, dtype, writers, counts)
    files.write_json(out / "manifest.json", manifest)
    (out / "tokenize.json").unlink()
    return manifest


def _claim(out: Path, request: dict):
    """Start on an empty folder, or redo an interrupted run of the same request."""
    marker = out / "tokenize.json"
    if marker.exists():
        if files.read_json(marker) != request:
            raise ValueError(f"out={out}: holds an interrupted tokenize of another request")
        for sub in ("train", "val"):
            shutil.rmtree(out / sub, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"out={out}: the folder is not empty and holds no shards")
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(marker, request)


def _write_batch(batch, tok, writers, out, dtype, shard_tokens, val_fraction, seed, counts):
    for (domain, lang, text), ids in zip(batch, tok.encode_batch([text for _, _, text in batch])):
        split = "val" if unit_hash(seed, text) < val_fraction else "train"
        key = ("train", domain) if split == "train" else ("val", domain, lang)
        if key not in writers:
            writers[key] = ShardWriter(out, "/".join(key), dtype, shard_tokens)
        writers[key].add(ids + [tok.eos_id])
        docs = counts["documents"].setdefault(split, {})
        docs[domain] = docs.get(domain, 0) + 1


def _manifest(request, tok, kind, dtype, writers, counts) -> dict:
    shards = {"train": {}, "val": {}}
    for key, writer in writers.items():
        entries = writer.close()
        if key[0] == "train":
            shards["train"][key[1]] = entries
        else:
            shards["val"].setdefault(key[1], {})[key[2]] = entries
    if not shards["val"]:
        raise ValueError(f"val_fraction={request['val_fraction']}: no document fell into "
                         "validation; raise --val-fraction")

    def tokens(entries):
        return sum(e["tokens"] for e in entries)

    by_split = {"train": {d: tokens(e) for d, e in shards["train"].items()},
                "val": {d: sum(tokens(e) for e in langs.values())
                        for d, langs in shards["val"].items()}}
    by_lang = {}
    for langs in shards["val"].values():
        for lang, entries in langs.items():
            by_lang[f"val_{lang}"] = by_lang.get(f"val_{lang}", 0) + tokens(entries)
    return {"format": FORMAT, "request": request, "tokenizer": tok.name, "tokenizer_kind": kind,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name,
            "domains": list(shards["train"]), "shards": shards,
            "tokens": {"train": sum(by_split["train"].values()),
                       "val": sum(by_split["val"].values()), **by_lang},
            "tokens_by_domain": by_split, "documents": counts["documents"],
            "dropped": counts["dropped"]}


# --- reading them back ------------------------------------------------------------------------
def is_shard_folder(path) -> bool:
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_shards(folder) -> tuple[TokenData, object]:
    """(TokenData over the shards' memory maps, the tokenizer) of a `tokenize` folder."""
    folder = Path(folder)
    manifest = files.read_json(folder / "manifest.json")
    tok = (ByteTokenizer() if manifest["tokenizer_kind"] == "byte"
           else BPETokenizer(folder / "tokenizer.json", manifest["tokenizer"]))
    dtype = np.dtype(manifest["dtype"])

    def maps(entries):
        return [Shard(folder / e["file"], dtype, e["tokens"]) for e in entries]

    train, ranges, at = [], {}, 0
    for domain in manifest["domains"]:
        parts = maps(manifest["shards"]["train"][domain])
        n = sum(len(p) for p in parts)
        train += parts
        ranges[domain], at = (at, at + n), at + n
    val = {(d, lang): maps(entries) for d, langs in manifest["shards"]["val"].items()
           for lang, entries in langs.items()}
    arrays = {"train": ConcatTokens(train),
              "val": ConcatTokens([p for parts in val.values() for p in parts])}
    for name in sorted({lang for _, lang in val}):
        arrays[f"val_{name}"] = ConcatTokens([p for (_, lang), ps in val.items() if lang == name
                                              for p in ps])
    for name in sorted({d for d, _ in val}):
        arrays[f"val_{name}"] = ConcatTokens([p for (d, _), ps in val.items() if d == name
                                              for p in ps])
    return TokenData(folder, arrays, manifest["tokenizer"], ranges, {s: s for s in arrays}), tok
