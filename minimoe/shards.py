"""The one data path: documents (data.py) -> split -> tokenizer -> shards -> TokenData over
their memory maps. `minimoe tokenize --data PATH --out shards/` writes a folder of them for text
of any size; `load_data` does the same for the demo corpus and your files, in a cache folder
keyed on content. Each shard is opened when read, at most OPEN_SHARDS at once (a 3.6T-token
corpus is ~27k shards, past a common `ulimit -n`). Layout and limits: docs/method.md, "Data"."""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minimoe import files
from minimoe.checks import check, problem
from minimoe.data import MIN_DOC_CHARS, Split, content_key, demo_sources, documents, split_of, \
    unit_hash, user_sources
from minimoe.tokens import TokenData, Tokenizer, tokenizer_of, train_bpe

FORMAT = "minimoe-shards"
SHARD_TOKENS = 1 << 27  # 134M tokens: 256 MB of uint16 per shard
BATCH_DOCS = 512  # documents tokenised at once (the tokenizers library's threads)
SAMPLE_CHARS = 200_000_000  # the most text a BPE is trained on
OPEN_SHARDS = 64  # memory maps open at once, the most recently read


@functools.lru_cache(maxsize=OPEN_SHARDS)  # the most recently read stay open
def _memmap(path: str, dtype: str) -> np.memmap:
    return np.memmap(path, dtype=dtype, mode="r")


class Shard:
    """One shard file of n tokens, its memory map opened when read (a slice of a map evicted
    from the cache stays readable: it holds its own reference)."""

    def __init__(self, path: Path, dtype: str, n: int):
        self.path, self.dtype, self.n = str(path), dtype, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> np.ndarray:
        return _memmap(self.path, self.dtype)[key]


class ConcatTokens:
    """Several memory-mapped shards read as one array: len() and slices [a:b] (what the batch
    and validation windows of TokenData take)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, key: slice) -> np.ndarray:
        assert isinstance(key, slice) and key.step in (None, 1), "slices with step 1 only"
        start, stop, _ = key.indices(len(self))
        pieces = []
        part = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            begin = int(self.ends[part]) - len(self.parts[part])
            end = min(stop, int(self.ends[part]))
            pieces.append(self.parts[part][start - begin:end - begin])
            start, part = end, part + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [np.zeros(0, np.int64)])


# --- writing shards ---------------------------------------------------------------------------
class ShardWriter:
    """Token ids appended to <folder>/00000.bin, 00001.bin ... of at most shard_tokens each
    (through the file's buffer); a shard gets its name once complete."""

    def __init__(self, root: Path, folder: str, dtype, shard_tokens: int):
        self.root, self.folder, self.dtype, self.limit = root, folder, dtype, shard_tokens
        self.shards, self.file = [], None  # shards: [{"file", "tokens"}]

    def add(self, ids: list[int]):
        data = np.asarray(ids, dtype=self.dtype)
        while len(data):
            if self.file is None:
                name = f"{self.folder}/{len(self.shards):05d}.bin"
                (self.root / name).parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.root / (name + ".tmp"), "wb")
                self.shards.append({"file": name, "tokens": 0})
            take = data[:self.limit - self.shards[-1]["tokens"]]
            self.file.write(take.tobytes())
            self.shards[-1]["tokens"] += len(take)
            data = data[len(take):]
            if self.shards[-1]["tokens"] == self.limit:
                self._seal()

    def close(self) -> list[dict]:
        if self.file is not None:
            self._seal()
        return self.shards

    def _seal(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        name = self.shards[-1]["file"]
        os.replace(self.root / (name + ".tmp"), self.root / name)
        self.file = None


# --- the tokenizer and the writing pass ----------------------------------------------------
def _train_bpe(sources: list[dict], split: Split, vocab_size: int) -> str:
    """A BPE trained on the training documents in the training stream's order (domain after
    domain) when they fit in SAMPLE_CHARS; else on a uniform sample within it: those with the
    smallest hash (a bottom-k sketch), so one pass in bounded memory sees the whole corpus."""
    heap, size, cut = [], 0, False  # max-heap on the hash: (-u, text, domain's place, n)
    place = {domain: i for i, domain in enumerate(split.domains)}
    for n, (domain, lang, text) in enumerate(documents(sources)):
        if split.is_val(domain, lang, text):
            continue
        heapq.heappush(heap, (-unit_hash(split.seed + 1, text), text, place[domain], n))
        size += len(text)
        while size > SAMPLE_CHARS and len(heap) > 1:
            size -= len(heapq.heappop(heap)[1])
            cut = True
    ordered = sorted(heap, reverse=True) if cut else sorted(heap, key=lambda item: item[2:])
    return train_bpe([text for _, text, _, _ in ordered], vocab_size)


def tokenize(paths: list[str], out, tokenizer: str = "bpe", vocab_size: int = 2048,
             val_fraction: float = 0.03, seed: int = 0, shard_tokens: int = SHARD_TOKENS,
             progress: bool = True) -> dict:
    """Stream `paths` (.txt/.jsonl files or folders) into shards in `out`; returns the manifest.
    A finished folder of the same request is returned as it is; an interrupted one is redone."""
    sources = user_sources([str(p) for p in paths])
    request = {"sources": sources, "tokenizer": tokenizer, "vocab_size": vocab_size,
               "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
               "sample_chars": SAMPLE_CHARS, "min_doc_chars": MIN_DOC_CHARS}
    given = None if tokenizer == "bpe" else tokenizer_of(tokenizer)  # checked before any text
    return write_shards(sources, Path(out), request, lambda split: given or Tokenizer(
        _train_bpe(sources, split, vocab_size)), progress)


def load_data(paths: list[str] | None = None, vocab_size: int = 2048,
              tokenizer: str | Tokenizer = "bpe", cache_dir: str | Path | None = None,
              val_fraction: float = 0.03, seed: int = 0) -> tuple[TokenData, Tokenizer]:
    """The demo corpus (paths=None) or your files, tokenised ("bpe", "byte", or a tokenizer
    given) into shards once, in a cache folder keyed on content; returns (TokenData, tokenizer)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if paths is not None and not paths:
        raise ValueError("paths: empty; give .txt or .jsonl files or folders (None: the demo)")
    sources = demo_sources() if paths is None else user_sources([str(p) for p in paths])
    inputs, key = content_key(sources, {"val_fraction": val_fraction, "seed": seed,
                                        "sample_chars": SAMPLE_CHARS})
    root = Path(cache_dir or os.environ.get("MINIMOE_CACHE") or "~/.cache/minimoe").expanduser()
    folder = root / f"shards-{'demo' if paths is None else 'user'}-{key[:12]}"
    split = None  # made once, where a new tokenizer needs it
    if tokenizer == "bpe":  # trained once per vocabulary size, named by its digest
        path = folder / f"tokenizer-bpe{vocab_size}.json"
        if not path.exists():
            split = split_of(sources, val_fraction, seed)
            folder.mkdir(parents=True, exist_ok=True)
            files.write_text(path, _train_bpe(sources, split, vocab_size))
        tokenizer = Tokenizer(path.read_text(encoding="utf-8"))
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer_of(tokenizer)
    out = folder / f"tokens-{tok.name}"
    request = {"inputs": inputs, "tokenizer": tok.name, "val_fraction": val_fraction,
               "seed": seed, "shard_tokens": SHARD_TOKENS}
    write_shards(sources, out, request, lambda _: tok, split=split)
    return load_shards(out)


def write_shards(sources: list[dict], out: Path, request: dict, make_tokenizer,
                 progress: bool = True, split: Split | None = None) -> dict:
    """Split the documents (request's val_fraction, seed), make the tokenizer
    (`make_tokenizer(split)`) and write each split, domain and language into shards of
    request's shard_tokens; a finished folder of the same request is kept."""
    val_fraction, seed, shard_tokens = (request[k] for k in ("val_fraction", "seed", "shard_tokens"))
    assert 0 < val_fraction < 0.5 and shard_tokens > 0  # the doors (CLI, run.json) hold them
    if is_shard_folder(out):
        manifest = read_manifest(out)
        if manifest.get("request") != request:
            raise ValueError(f"out={out}: holds shards of another request; choose another --out")
        return manifest
    split = split or split_of(sources, val_fraction, seed)
    marker = out / "tokenize.json"  # there while a run writes: an interrupted one is redone
    if marker.exists():
        if files.read_json(marker) != request:
            raise ValueError(f"out={out}: holds an interrupted tokenize of another request")
        for sub in ("train", "val"):
            shutil.rmtree(out / sub, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"out={out}: the folder is not empty and holds no shards")
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(marker, request)
    tok = make_tokenizer(split)
    tok.save(out)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    writers: dict[tuple, ShardWriter] = {}
    n_docs, dropped = {"train": Counter(), "val": Counter()}, Counter()
    total = sum(s["bytes"] for s in sources)
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
              delay=3, leave=False) as bar:
        docs = documents(sources, dropped, bar)
        while batch := list(itertools.islice(docs, BATCH_DOCS)):
            for (domain, lang, text), ids in zip(batch, tok.encode_batch([t for _, _, t in batch])):
                name = "val" if split.is_val(domain, lang, text) else "train"
                key = ("train", domain) if name == "train" else ("val", domain, lang)
                if key not in writers:
                    writers[key] = ShardWriter(out, "/".join(key), dtype, shard_tokens)
                writers[key].add(tok.document(ids))
                n_docs[name][domain] += 1
    manifest = _manifest(request, tok, dtype, writers, split.domains)
    manifest.update(documents=n_docs, dropped=dropped)
    files.write_json(out / "manifest.json", manifest)
    marker.unlink()
    return manifest


def _manifest(request, tok, dtype, writers, domains: list[str]) -> dict:
    """Each split's domains in the order they first appear in the documents (the training
    stream's), each domain's validation shards by language."""
    shards = {"train": {}, "val": {}}
    by_split, by_lang = {"train": Counter(), "val": Counter()}, Counter()
    for (split, domain, *lang), writer in sorted(writers.items(),
                                                 key=lambda item: domains.index(item[0][1])):
        entries = writer.close()
        by_split[split][domain] += _tokens(entries)
        if split == "train":
            shards["train"][domain] = entries
        else:
            shards["val"].setdefault(domain, {})[lang[0]] = entries
            by_lang[f"val_{lang[0]}"] += _tokens(entries)
    assert shards["val"] and shards["train"]  # Split keeps a document in each
    return {"format": FORMAT, "request": request, "tokenizer": tok.name,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name,
            "domains": list(shards["train"]), "shards": shards,
            "tokens": {split: n.total() for split, n in by_split.items()} | by_lang,
            "tokens_by_domain": by_split}


def _tokens(entries) -> int:
    return sum(e["tokens"] for e in entries)


def _val_shards(folder: Path, manifest: dict) -> dict[tuple[str, str], list[Shard]]:
    return {(domain, lang): [Shard(folder / e["file"], manifest["dtype"], e["tokens"])
                             for e in entries]
            for domain, langs in manifest["shards"]["val"].items() for lang, entries in langs.items()}


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
    train, ranges, at = [], {}, 0
    for domain in manifest["domains"]:
        entries = manifest["shards"]["train"][domain]
        train += [Shard(folder / e["file"], manifest["dtype"], e["tokens"]) for e in entries]
        ranges[domain], at = (at, at + _tokens(entries)), at + _tokens(entries)
    val = _val_shards(folder, manifest)
    arrays = {"train": ConcatTokens(train),
              "val": ConcatTokens([p for parts in val.values() for p in parts])}
    stored_as, split_of_paths = {"train": "train", "val": "val"}, {}
    for by in (1, 0):  # each language's, then each domain's
        for name in sorted({key[by] for key in val}):
            parts = [p for key, ps in val.items() if key[by] == name for p in ps]
            # a domain that is one language's: the same shards, stored once
            split = split_of_paths.setdefault(tuple(p.path for p in parts), f"val_{name}")
            stored_as[f"val_{name}"] = split
            arrays[f"val_{name}"] = arrays.setdefault(split, ConcatTokens(parts))
    return TokenData(folder, arrays, tok, ranges, stored_as), tok


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
    eval`'s built-in tasks and bits per byte read (langs, val_domains, texts)."""

    def __init__(self, folder):
        manifest = read_manifest(Path(folder))
        self.tokenizer = Tokenizer.load(folder)
        self.docs = {key: _decoded(self.tokenizer, ConcatTokens(parts))
                     for key, parts in _val_shards(Path(folder), manifest).items()}
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
