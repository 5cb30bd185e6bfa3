"""Tokens: the tokenizer (byte-level BPE trained on the training split) and batches.

corpus (data.py) -> tokenizer -> token memmaps (`TokenData`) -> batches that are pure functions
of (seed, step) and, when domains are mixed, of the domain weights in force (minimoe/mixing.py),
so a resumed run sees exactly the batches of an unbroken one.

The training stream holds each domain's documents together, so a domain is a range of it;
meta.json records the ranges and the tokens per split and domain. Validation has one split
per language (`val_en`) and per domain (`val_en-kjv`); a domain split whose tokens equal a
language's is stored once and named twice.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from minimoe import files
from minimoe.data import Corpus, prepare_corpus

EOS = "<|endoftext|>"  # separates documents in the token stream


# --- tokenizers: encode(text) -> list[int], decode(ids) -> str, vocab_size, eos_id, name,
# and encode_with_ends(text) -> (ids, the character index where each token's text ends) ---


class ByteTokenizer:
    """UTF-8 bytes as tokens plus one end-of-text id: nothing to train, nothing unknown."""

    name, vocab_size, eos_id = "byte", 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        ids, ends = [], []
        for i, char in enumerate(text):  # every byte of a character ends where it ends
            data = char.encode("utf-8")
            ids += data
            ends += [i + 1] * len(data)
        return ids, ends

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        pieces = (EOS.encode() if i == self.eos_id else bytes([i]) for i in ids)
        return b"".join(pieces).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE, as in GPT-2: any text encodes, and frequent byte runs (English words,
    common Chinese characters) become single tokens, so sequences are ~3x shorter than bytes."""

    def __init__(self, path: Path, name: str):
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises plain Exception (and panics)
            raise ValueError(f"{path}: not a tokenizer file of the tokenizers library "
                             f"({str(err).splitlines()[0][:100]})") from None
        self.name = name
        self.vocab_size = self._tokenizer.get_vocab_size()
        if max(self._tokenizer.get_vocab().values(), default=0) >= self.vocab_size:
            raise ValueError(f"{path}: token ids reach past its vocabulary of {self.vocab_size}")
        self.eos_id = self._tokenizer.token_to_id(EOS)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        encoding = self._tokenizer.encode(text)  # a token holding part of a character ends with it
        return encoding.ids, [end for _, end in encoding.offsets]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, on the tokenizers library's threads."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def train_bpe(texts: list[str], vocab_size: int) -> str:
    """A byte-level BPE trained on `texts`, as the tokenizers library's JSON."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer.to_str()


def load_tokenizer(corpus: Corpus, vocab_size: int = 2048, kind: str = "bpe"):
    """The byte fallback, or a BPE trained on the training split only (cached in the corpus)."""
    if kind == "byte":
        return ByteTokenizer()
    assert kind == "bpe", kind
    assert vocab_size > 257  # the doors (CLI, run.json, recipes) hold it: 256 bytes + eos
    path = corpus.path / f"tokenizer-bpe{vocab_size}.json"
    if not path.exists():
        files.write_text(path, train_bpe(corpus.texts("train"), vocab_size))
    return BPETokenizer(path, name=f"bpe{vocab_size}-{corpus.hash[:8]}")


# --- token arrays and batches ------------------------------------------------------------


def _encode_all(tokenizer, texts: list[str], split: str) -> np.ndarray:
    """Every document followed by eos, so the model learns where a document ends."""
    ids: list[int] = []
    for text in tqdm(texts, desc=f"tokenizing {split}", unit="doc", delay=3, leave=False):
        ids += tokenizer.encode(text)
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)


def _seed_for(seed: int, step: int) -> int:
    """Mix (seed, step) into one torch seed (blake2b: the same in every Python process)."""
    digest = hashlib.blake2b(f"{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class TokenData:
    """Token ids of train, val, val_<lang> and val_<domain> as read-only memory maps, the
    training stream's domain ranges, and batches from them."""

    path: Path
    arrays: dict[str, np.ndarray]
    tokenizer_name: str
    domain_ranges: dict[str, tuple[int, int]]  # [start, end) of each domain in train
    stored_as: dict[str, str]  # split -> the split whose file holds its tokens
    vocab_size: int = 0  # every id read must be below it (0: not checked)

    @classmethod
    def build(cls, corpus: Corpus, tokenizer) -> TokenData:
        folder = corpus.path / f"tokens-{tokenizer.name}"
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            folder.mkdir(exist_ok=True)
            files.write_json(meta_path, _write_arrays(folder, corpus, tokenizer))
        meta = json.loads(meta_path.read_text())
        stored = {split: np.load(folder / f"{split}.npy", mmap_mode="r")
                  for split in set(meta["stored_as"].values())}
        arrays = {split: stored[source] for split, source in meta["stored_as"].items()}
        ranges = {domain: tuple(bounds) for domain, bounds in meta["domain_ranges"].items()}
        return cls(folder, arrays, meta["tokenizer"], ranges, meta["stored_as"], meta["vocab_size"])

    @property
    def langs(self) -> list[str]:
        return sorted(split[4:] for split in self.arrays
                      if split.startswith("val_") and split[4:] not in self.domain_ranges)

    @property
    def domains(self) -> list[str]:
        """The domains of the training stream, in its order."""
        return list(self.domain_ranges)

    @property
    def val_domains(self) -> list[str]:
        return [domain for domain in self.domains if f"val_{domain}" in self.arrays]

    def domain_tokens(self) -> dict[str, int]:
        """Training tokens per domain (the default mix is proportional to these)."""
        return {domain: end - start for domain, (start, end) in self.domain_ranges.items()}

    def n_tokens(self, split: str = "train") -> int:
        return len(self._array(split))

    def _array(self, split: str) -> np.ndarray:
        if split not in self.arrays:
            raise ValueError(f"split {split!r}: must be one of {sorted(self.arrays)}")
        return self.arrays[split]

    def _windows(self, tokens: np.ndarray, starts, seq_len: int):
        """(x, y) of the windows at `starts`: (B, T) each, y the next tokens."""
        if len(tokens) < seq_len + 1:
            raise ValueError(f"seq_len {seq_len}: needs {seq_len + 1} tokens, this split has "
                             f"{len(tokens)}")
        rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        if self.vocab_size and rows.max() >= self.vocab_size:  # files on disk: not trusted
            raise ValueError(f"{self.path}: token id {rows.max()} is past the vocabulary of "
                             f"{self.vocab_size} (tokens and tokenizer disagree)")
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # x, and y = next token: (B, T)

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0,
                    weights: dict[str, float] | None = None, rows: slice | None = None):
        """Random windows that depend on (seed, step, batch_size, seq_len, weights) only: no
        iterator state, so a run resumed at step i sees exactly the batches of an unbroken run.
        weights=None: windows anywhere in the stream, so each domain in proportion to its size.
        rows: read only these rows of the batch (a data-parallel rank's share)."""
        tokens = self._array("train")
        if weights is not None:
            starts = self.mixed_starts(step, batch_size, seq_len, seed, weights)[0]
        else:
            generator = torch.Generator().manual_seed(_seed_for(seed, step))
            high = max(len(tokens) - seq_len, 1)  # the last start whose target window still fits
            starts = torch.randint(0, high, (batch_size,), generator=generator).tolist()
        return self._windows(tokens, starts if rows is None else starts[rows], seq_len)

    def mixed_starts(self, step: int, batch_size: int, seq_len: int, seed: int,
                     weights: dict[str, float]) -> tuple[list[int], list[str]]:
        """Window starts and their domains: each row draws its domain from `weights`, then a
        window inside that domain's range."""
        if sorted(weights) != sorted(self.domains):
            raise ValueError(f"weights={weights}: must give a weight to each domain of the data "
                             f"({', '.join(self.domains)}) and no other")
        names = [domain for domain in self.domains if weights[domain] > 0]
        for domain in names:
            start, end = self.domain_ranges[domain]
            if end - start < seq_len + 1:
                raise ValueError(f"domain {domain!r}: {end - start} training tokens, fewer than "
                                 f"seq_len + 1 = {seq_len + 1}; give it weight 0")
        generator = torch.Generator().manual_seed(_seed_for(seed, step))
        p = torch.tensor([weights[domain] for domain in names], dtype=torch.float64)
        rows = torch.multinomial(p, batch_size, replacement=True, generator=generator).tolist()
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64).tolist()
        starts = []
        for row, x in zip(rows, u):
            start, end = self.domain_ranges[names[row]]
            starts.append(start + int(x * (end - start - seq_len)))  # the window ends in range
        return starts, [names[row] for row in rows]

    def val_batches(self, batch_size: int, seq_len: int, n_batches: int | None = None,
                    lang: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, evenly spaced windows: the same in every run and stage, so losses compare.
        n_batches=None takes as many as fit without overlap (at least one batch)."""
        tokens = self._array("val" if lang is None else f"val_{lang}")
        if n_batches is None:
            n_batches = max(1, (len(tokens) - 1) // seq_len // batch_size)
        starts = np.linspace(0, max(len(tokens) - seq_len - 1, 0), n_batches * batch_size)
        starts = starts.round().astype(int).tolist()
        return [self._windows(tokens, starts[i:i + batch_size], seq_len)
                for i in range(0, len(starts), batch_size)]


def _write_arrays(folder: Path, corpus: Corpus, tokenizer) -> dict:
    """Encode every split into folder/<split>.npy; returns meta.json's content."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32  # half the bytes
    # train.jsonl holds each domain's documents together: encoding domain by domain gives the
    # same stream as encoding the file, and each domain's range in it
    pieces, ranges, at = [], {}, 0
    for domain in corpus.domains:
        ids = _encode_all(tokenizer, corpus.texts("train", domain=domain), f"train {domain}")
        pieces.append(ids)
        ranges[domain] = [at, at + len(ids)]
        at += len(ids)
    arrays = {"train": np.concatenate(pieces).astype(dtype)}
    arrays["val"] = _encode_all(tokenizer, corpus.texts("val"), "val").astype(dtype)
    for lang in corpus.langs:
        arrays[f"val_{lang}"] = _encode_all(tokenizer, corpus.texts("val", lang), lang).astype(dtype)
    stored_as = {split: split for split in arrays}
    for domain in corpus.manifest["domains"]["val"]:
        ids = _encode_all(tokenizer, corpus.texts("val", domain=domain), domain).astype(dtype)
        same = next((s for s in arrays if s.startswith("val_") and np.array_equal(arrays[s], ids)),
                    None)
        stored_as[f"val_{domain}"] = same or f"val_{domain}"
        if same is None:
            arrays[f"val_{domain}"] = ids
    for split, ids in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, ids)
        files.write_bytes(folder / f"{split}.npy", buffer.getvalue())
    tokens = {split: len(arrays[source]) for split, source in stored_as.items()}
    by_domain = {"train": {d: end - start for d, (start, end) in ranges.items()},
                 "val": {d: tokens[f"val_{d}"] for d in corpus.manifest["domains"]["val"]}}
    return {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "corpus_sha256": corpus.hash, "tokens": tokens, "tokens_by_domain": by_domain,
            "domain_ranges": ranges, "stored_as": stored_as}


def load_data(paths: list[str] | None = None, vocab_size: int = 2048, tokenizer: str = "bpe",
              cache_dir: str | Path | None = None, val_fraction: float = 0.03, seed: int = 0):
    """Corpus -> tokenizer -> token arrays in one call; returns (TokenData, tokenizer)."""
    corpus = prepare_corpus(paths, cache_dir, val_fraction, seed)
    tok = load_tokenizer(corpus, vocab_size, tokenizer)
    return TokenData.build(corpus, tok), tok
