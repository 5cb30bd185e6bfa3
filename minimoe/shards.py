"""Pre-tokenised shards for text of any size (`minimoe tokenize --data PATH --out shards/`),
streamed in bounded memory, read back as the same TokenData as tokens.py (memory maps), so
`--data shards/` trains by the same batch rule; each shard is opened when read, at most
OPEN_SHARDS at once (a 3.6T-token corpus is ~27k shards, past a common `ulimit -n`). Layout and
limits: docs/method.md, "Data"."""

from __future__ import annotations

import heapq
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minimoe import files
from minimoe.checks import check, problem
from minimoe.data import (MIN_DOC_CHARS, clean_text, detect_lang, jsonl_record, unit_hash,
                          user_sources)
from minimoe.tokens import TokenData, Tokenizer, tokenizer_of

FORMAT = "minimoe-shards"
SHARD_TOKENS = 1 << 27  # 134M tokens: 256 MB of uint16 per shard
MAX_DOC_CHARS = 1_000_000  # a longer paragraph is cut at a line boundary
BATCH_DOCS = 512  # documents tokenised at once (the tokenizers library's threads)
FLUSH_TOKENS = 1 << 20  # a writer's buffer
OPEN_SHARDS = 64  # memory maps open at once, the most recently read


_maps: OrderedDict = OrderedDict()  # path -> memory map, the OPEN_SHARDS most recently read


class Shard:
    """One shard file of n tokens, its memory map opened when read (a slice of a map evicted
    from _maps stays readable: it holds its own reference)."""

    def __init__(self, path: Path, dtype, n: int):
        self.path, self.dtype, self.n = str(path), np.dtype(dtype), n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> np.ndarray:
        if self.path not in _maps:
            _maps[self.path] = np.memmap(self.path, dtype=self.dtype, mode="r")
            while len(_maps) > OPEN_SHARDS:
                _maps.popitem(last=False)
        _maps.move_to_end(self.path)
        return _maps[self.path][key]


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
            for whole in f:  # a line over MAX_DOC_CHARS is cut into pieces of that size
                for line in (whole[i:i + MAX_DOC_CHARS] for i in range(0, len(whole) or 1,
                                                                        MAX_DOC_CHARS)):
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
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield jsonl_record(line, f"{path}:{n}")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


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


def tokenize(paths: list[str], out, tokenizer: str = "bpe", vocab_size: int = 2048,
             val_fraction: float = 0.03, seed: int = 0, shard_tokens: int = SHARD_TOKENS,
             sample_chars: int = 200_000_000, progress: bool = True) -> dict:
    """Stream `paths` (.txt/.jsonl files or folders) into shards in `out`; returns the manifest.
    A finished folder of the same request is returned as it is; an interrupted one is redone."""
    assert 0 < val_fraction < 0.5 and shard_tokens > 0  # the door (the CLI) holds its rules
    sources = user_sources([str(p) for p in paths])
    request = {"sources": sources, "tokenizer": tokenizer, "vocab_size": vocab_size,
               "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
               "sample_chars": sample_chars, "min_doc_chars": MIN_DOC_CHARS}
    out = Path(out)
    if is_shard_folder(out):
        manifest = read_manifest(out)
        if manifest.get("request") != request:
            raise ValueError(f"out={out}: holds shards of another request; choose another --out")
        return manifest
    _claim(out, request)
    tok = tokenizer_of(tokenizer, vocab_size,
                       lambda: _sample_texts(sources, val_fraction, seed, sample_chars))
    tok.save(out)
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
    manifest = _manifest(request, tok, dtype, writers, counts)
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
        writers[key].add(tok.document(ids))
        docs = counts["documents"].setdefault(split, {})
        docs[domain] = docs.get(domain, 0) + 1


def _manifest(request, tok, dtype, writers, counts) -> dict:
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
    return {"format": FORMAT, "request": request, "tokenizer": tok.name,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name,
            "domains": list(shards["train"]), "shards": shards,
            "tokens": {"train": sum(by_split["train"].values()),
                       "val": sum(by_split["val"].values()), **by_lang},
            "tokens_by_domain": by_split, "documents": counts["documents"],
            "dropped": counts["dropped"]}


# --- reading them back ------------------------------------------------------------------------
def is_shard_folder(path) -> bool:
    try:
        return json.loads((Path(path) / "manifest.json").read_text("utf-8"))["format"] == FORMAT
    except (OSError, ValueError, TypeError, KeyError):  # none, not JSON, not a manifest
        return False


def load_shards(folder) -> tuple[TokenData, object]:
    """(TokenData over the shards' memory maps, the tokenizer) of a `tokenize` folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    tok = Tokenizer.load(folder)
    if tok.name != manifest["tokenizer"]:
        raise ValueError(f"{folder}: its tokenizer.json ({tok.name}) is not the one its shards "
                         f"were made with ({manifest['tokenizer']})")
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
    for by in (1, 0):  # each language's, then each domain's
        for name in sorted({key[by] for key in val}):
            arrays[f"val_{name}"] = ConcatTokens([p for key, ps in val.items() if key[by] == name
                                                  for p in ps])
    return TokenData(folder, arrays, tok, ranges, {s: s for s in arrays}), tok


def read_manifest(folder: Path) -> dict:
    """manifest.json held to its rules: every shard a file inside the folder whose size is its
    token count, train shards for each domain, validation shards."""
    m, where = files.read_json(folder / "manifest.json"), f"{folder / 'manifest.json'}: "
    for key, rule in (("format", (FORMAT,)), ("dtype", ("uint16", "uint32")), ("tokenizer", "str"),
                      ("vocab_size", "int[1, 4294967296]")):
        check(where, key, m.get(key), rule)
    shards, domains = m.get("shards"), m.get("domains")
    if not (isinstance(domains, list) and domains and all(isinstance(d, str) for d in domains)
            and isinstance(shards, dict) and isinstance(shards.get("train"), dict)
            and sorted(shards["train"]) == sorted(domains) and isinstance(shards.get("val"), dict)
            and shards["val"] and all(isinstance(v, dict) and v for v in shards["val"].values())):
        raise ValueError(f"{where}domains, shards: must list the domains, train shards for each "
                         "and validation shards")
    lists = [*shards["train"].values(), *(e for v in shards["val"].values() for e in v.values())]
    root, size = folder.resolve(), np.dtype(m["dtype"]).itemsize
    for entry in (e for entries in lists for e in (entries if isinstance(entries, list) else [0])):
        file = entry.get("file") if isinstance(entry, dict) else None
        path = (root / file).resolve() if isinstance(file, str) else root
        if root not in path.parents or problem(entry.get("tokens"), "int>=0") \
                or not path.is_file() or path.stat().st_size != entry["tokens"] * size:
            raise ValueError(f"{where}shard {entry!r}: must name a file in the folder that "
                             "holds its tokens")
    return m


class ShardTexts:
    """A shard folder's validation documents decoded back to text (the tokenizer is lossless on
    cleaned text), the first VAL_CHARS characters of each domain and language: what `minimoe
    eval`'s built-in tasks and bits per byte read (a Corpus's langs, val_domains, texts)."""

    def __init__(self, folder):
        manifest = read_manifest(Path(folder))
        self.tokenizer = Tokenizer.load(folder)
        self.docs = {(domain, lang): _decoded(self.tokenizer, ConcatTokens(
            [Shard(Path(folder) / e["file"], manifest["dtype"], e["tokens"]) for e in entries]))
            for domain, langs in manifest["shards"]["val"].items() for lang, entries in langs.items()}
        self.langs = sorted({lang for _, lang in self.docs})
        self.val_domains = list(dict.fromkeys(domain for domain, _ in self.docs))

    def texts(self, split: str, lang: str | None = None, domain: str | None = None) -> list[str]:
        assert split == "val", "a shard folder keeps the text of its validation split only"
        return [text for (d, lg), texts in self.docs.items() if lang in (None, lg)
                and domain in (None, d) for text in texts]


VAL_CHARS = 1_000_000


def _decoded(tok, tokens: ConcatTokens) -> list[str]:
    """Whole documents ([bos] ids eos) from the start of `tokens`, until VAL_CHARS characters."""
    docs, at, chars, block = [], 0, 0, 1 << 16
    while at < len(tokens) and chars < VAL_CHARS:
        ids = tokens[at:at + block]
        ends = np.flatnonzero(ids == tok.eos_id)
        if not len(ends) and at + block < len(tokens):
            block *= 2  # a document longer than the block: read more
            continue
        for start, end in zip([0, *(ends[:-1] + 1)], ends):
            docs.append(tok.decode(ids[start + (ids[start] == tok.bos_id):end].tolist()))
            chars += len(docs[-1])
            if chars >= VAL_CHARS:
                break
        at += int(ends[-1]) + 1 if len(ends) else len(ids)
    return docs
