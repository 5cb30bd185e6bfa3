"""Tokens: the tokenizer (a tokenizers-library JSON: byte-level BPE trained on the training
split, bytes, or an imported checkpoint's) and batches that are pure functions of (seed, step)
and the domain weights in force (minimoe/mixing.py), so a resumed run sees an unbroken run's."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from minimoe import files

EOS = "<|endoftext|>"  # ends every document (and starts one, where a tokenizer has no BOS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a run folder's, as HF names them


class Tokenizer:
    """A tokenizers-library tokenizer and the tokens around a document: each is stored as
    [bos] + text + [eos] and scored after `start_id` (bos, else eos: lm-evaluation-harness's
    prefix token). `name` holds a digest of the JSON: token caches are keyed on content."""

    def __init__(self, json_text: str, eos: str = EOS, bos: str | None = None):
        try:  # the tokenizers library raises plain Exception on a bad file
            self._tokenizer = tokenizers.Tokenizer.from_str(json_text)
            kind = json.loads(json_text)["model"]["type"].lower()
        except Exception as err:
            raise ValueError(f"not a tokenizer of the tokenizers library ({str(err)[:100]})") \
                from None
        self.json, self.eos, self.bos = json_text, eos, None if bos == eos else bos
        self.vocab_size = self._tokenizer.get_vocab_size()
        if max(self._tokenizer.get_vocab().values(), default=0) >= self.vocab_size or not all(
                isinstance(t, str) for t in (eos, bos or "")):
            raise ValueError(f"token ids past its vocabulary of {self.vocab_size}, or eos/bos "
                             "not names of tokens")
        self.eos_id = self._tokenizer.token_to_id(eos)
        self.bos_id = None if self.bos is None else self._tokenizer.token_to_id(self.bos)
        for token, found in ((eos, self.eos_id), (self.bos, self.bos_id)):
            if token is not None and found is None:
                raise ValueError(f"tokenizer: has no token {token!r} to end or start documents with")
        self.name = f"{kind}{self.vocab_size}-{hashlib.sha256(json_text.encode()).hexdigest()[:8]}"

    @property
    def start_id(self) -> int:
        return self.eos_id if self.bos_id is None else self.bos_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        """ids, and the character index where each token's text ends (a token holding part of a
        character ends with it)."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [end for _, end in encoding.offsets]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:  # on the library's threads
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def document(self, ids: list[int]) -> list[int]:  # as the training stream holds it
        return ([] if self.bos_id is None else [self.bos_id]) + ids + [self.eos_id]

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, folder):
        """tokenizer.json as it is, and a tokenizer_config.json whose class keeps it so
        (transformers' own Llama and Qwen2 classes rebuild its pre-tokenizer)."""
        files.write_text(Path(folder) / TOKENIZER_FILES[0], self.json)
        files.write_json(Path(folder) / TOKENIZER_FILES[1], {
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos,
            "bos_token": self.bos, "clean_up_tokenization_spaces": False})

    @classmethod
    def load(cls, path, eos: str = EOS, bos: str | None = None) -> Tokenizer:
        """A tokenizer.json file's tokenizer, or a folder's that `save` wrote (a run's) or
        transformers did (a Hub model's): its tokenizer_config.json's eos_token and bos_token
        ("..." or {"content": "..."}) win."""
        path = Path(path)
        if path.is_dir():
            config_path = path / TOKENIZER_FILES[1]
            config = files.read_json(config_path) if config_path.exists() else {}
            eos, bos = ((t.get("content") if isinstance(t, dict) else t) for t in
                        (config.get("eos_token") or eos, config.get("bos_token", bos)))
            path = path / TOKENIZER_FILES[0]
        try:
            return cls(path.read_text(encoding="utf-8"), eos, bos)
        except ValueError as err:  # refused under its file's name
            raise ValueError(f"{path}: {err}") from None


def byte_tokenizer() -> Tokenizer:
    """UTF-8 bytes as tokens 0-255 plus EOS (256): a byte-level BPE without merges, so nothing
    to train and nothing unknown."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes_to_unicode
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    tokenizer = tokenizers.Tokenizer(models.BPE({char[b]: b for b in range(256)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return Tokenizer(tokenizer.to_str())


def train_bpe(texts: list[str], vocab_size: int) -> str:
    """A byte-level BPE trained on `texts`, as the tokenizers library's JSON."""
    assert vocab_size > 257  # the doors (CLI, run.json, recipes) hold it: 256 bytes + eos
    if not texts:
        raise ValueError("--data: no training document to train the tokenizer on")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer.to_str()


def tokenizer_of(kind: str) -> Tokenizer:
    """"byte", a tokenizers JSON file, or the tokenizer a folder holds (a run, a Hugging Face
    checkpoint); a BPE to train ("bpe") is shards.py's."""
    if kind == "byte":
        return byte_tokenizer()
    if Path(kind).is_dir() or Path(kind).is_file():
        return Tokenizer.load(kind)
    raise ValueError(f"tokenizer={kind!r}: must be bpe, byte, a tokenizer.json file or a "
                     "folder holding one (a run, a Hugging Face checkpoint)")


# --- token arrays and batches ------------------------------------------------------------


def _seed_for(seed: int, step: int) -> int:
    """(seed, step) as one torch seed (blake2b: the same in every Python process)."""
    digest = hashlib.blake2b(f"{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class TokenData:
    """Token ids of train, val, val_<lang> and val_<domain> (memory-mapped shards: shards.py),
    the training stream's domain ranges, and batches from them."""

    path: Path
    arrays: dict[str, np.ndarray]
    tokenizer: Tokenizer
    domain_ranges: dict[str, tuple[int, int]]  # [start, end) of each domain in train
    stored_as: dict[str, str]  # split -> the split whose shards hold its tokens

    @property
    def langs(self) -> list[str]:
        return sorted(split[4:] for split in self.arrays
                      if split.startswith("val_") and split[4:] not in self.domain_ranges)

    @property
    def domains(self) -> list[str]:  # in the training stream's order
        return list(self.domain_ranges)

    @property
    def val_domains(self) -> list[str]:
        return [domain for domain in self.domains if f"val_{domain}" in self.arrays]

    def domain_tokens(self) -> dict[str, int]:  # the default mix is proportional to these
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
        if rows.max() >= self.tokenizer.vocab_size:  # ids from files on disk: not trusted
            raise ValueError(f"{self.path}: token id {rows.max()} is past the vocabulary of "
                             f"{self.tokenizer.vocab_size} (tokens and tokenizer disagree)")
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
        assert sorted(weights) == sorted(self.domains)  # resolve_mix and run_files hold it
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
        ranges = [self.domain_ranges[names[row]] for row in rows]
        starts = [start + int(x * (end - start - seq_len))  # the window ends in range
                  for (start, end), x in zip(ranges, u)]
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
