"""Evaluation tasks: JSONL task files of one example per line (HellaSwag, ARC or PIQA after
renaming; a choice is scored as written, so it usually starts with its joining space), the
built-in cloze-<lang> and complete-<lang> made from the held-out split, and both written out
for lm-evaluation-harness. What they measure and why: docs/method.md#evaluation.

    {"context": "...", "choices": ["...", "..."], "answer": 1}     multiple choice
    {"context": "...", "answer": "...", "stop": ["\\n"]}            generation, exact match
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minimoe import files

FORMAT = 2  # bump when the built-in tasks or their scoring change: cached results are redone
N_CHOICES = 4  # the cloze's candidates, as HellaSwag's four endings
# At most this much text before the sentence (whole sentences), and the cloze's sentences:
# long enough to mean something, short enough to fit a toy model's context and keep
# evaluation quick. A Chinese character is one or two tokens of a small BPE, an English one
# a third of a token.
CONTEXT_CHARS = {"en": 200, "zh": 80}
SENTENCE_CHARS = {"en": (12, 160), "zh": (6, 50)}
LENGTH_RATIO = 1.25  # a distractor is at most this much longer or shorter than the true one
ZH_TAIL = 2  # complete-zh: characters to write (a two-character word is the commonest)
WORD_STOPS = ["\n", ".", ",", ";", ":", "!", "?", "。", "、"]  # where a completion ends
# a sentence: from a non-space to 。!? (with closing quotes), to a '.' before a space or the end
# of the line, or to the end of the line (a headline)
_SENTENCE = re.compile(r"\S.*?(?:[。!?][”’\"」』)]*|\.(?= )|\.$|$)", re.M)
_EN_TAIL = re.compile(r"^(.*\S)\s+([A-Za-z]+)([.,;:!?]+)$")
_ZH_TAIL = re.compile(rf"^(.*\S)([\u4e00-\u9fff]{{{ZH_TAIL}}})[。!?]$")


@dataclass(frozen=True)
class ChoiceExample:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class GenExample:
    context: str
    answer: str
    stop: tuple[str, ...] = ("\n",)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "choice" or "generate"
    examples: list = field(repr=False)
    source: str = ""  # where it came from: a file, or the split it was made from


BUILTIN = ("cloze-en", "cloze-zh", "complete-en", "complete-zh")


# --- task files -------------------------------------------------------------------------
def load_task_file(path) -> Task:
    """A JSONL task file, every line checked: a bad line is a ValueError naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    examples, kind = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: must be a JSON object with 'context' and 'answer'")
        line_kind = "choice" if "choices" in record else "generate"
        if kind is not None and line_kind != kind:
            raise ValueError(f"{path}:{n}: a {line_kind} example in a file of {kind} examples "
                             "(every line has 'choices', or none does)")
        kind = line_kind
        examples.append(_example(record, kind, f"{path}:{n}"))
    if not examples:
        raise ValueError(f"{path}: no examples (one JSON object per line)")
    return Task(path.stem, kind, examples, str(path))


def _example(record: dict, kind: str, where: str) -> ChoiceExample | GenExample:
    for f in dataclasses.fields(ChoiceExample if kind == "choice" else GenExample):
        if f.default is dataclasses.MISSING and f.name not in record:
            raise ValueError(f"{where}: missing field {f.name!r}")
    context, answer = record["context"], record["answer"]
    if kind == "generate":
        stop = record.get("stop", ["\n"])
        if not isinstance(context, str) or not context:
            raise ValueError(f"{where}: context={context!r}: must be a non-empty string")
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{where}: answer={answer!r}: must be a non-empty string (a line "
                             "with 'choices' is a multiple-choice example)")
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"{where}: stop={stop!r}: must be a list of non-empty strings")
        return GenExample(context, answer, tuple(stop))
    choices = record["choices"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: context={context!r}: must be a string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{where}: choices={choices!r}: must be a list of at least 2 non-empty "
                         "strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer={answer!r}: must be the index of the right choice, "
                         f"0 to {len(choices) - 1}")
    return ChoiceExample(context, tuple(choices), answer)


def resolve_task(name: str, corpus=None, limit: int = 100, seed: int = 0) -> Task:
    """A built-in task made from `corpus` (the held-out split), or a .jsonl task file, cut to
    its first `limit` examples."""
    if re.fullmatch(r"(cloze|complete)-\w+", name):
        kind, lang = name.split("-", 1)
        if corpus is None or lang not in corpus.langs:
            have = ", ".join(corpus.langs) if corpus is not None else "no corpus"
            raise ValueError(f"task {name!r}: the data has no {lang!r} validation documents "
                             f"(languages: {have})")
        make = cloze_task if kind == "cloze" else completion_task
        return make(corpus.texts("val", lang=lang), lang, limit, seed)
    path = Path(name)
    if path.suffix != ".jsonl" or not path.is_file():
        raise ValueError(f"task {name!r}: not a built-in task ({', '.join(BUILTIN)}, ppl) and "
                         "not an existing .jsonl file")
    task = load_task_file(path)
    return dataclasses.replace(task, examples=task.examples[:limit])


# --- the built-in tasks -----------------------------------------------------------------
def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of every sentence of a document, in order."""
    return [m.span() for m in _SENTENCE.finditer(text) if m.group().strip()]


@dataclass(frozen=True)
class _Slot:
    """A sentence in its document: the context before it, and what joins them."""

    doc: int
    index: int
    context: str
    joiner: str  # "" after a line break (kept in the context), else the space or nothing
    sentence: str


def _slots(docs: list[str], lang: str) -> list[_Slot]:
    """Every sentence that has at least one sentence before it in its document."""
    budget = CONTEXT_CHARS.get(lang, CONTEXT_CHARS["en"])
    slots = []
    for d, text in enumerate(docs):
        spans = sentences(text)
        for i in range(1, len(spans)):
            first = i - 1  # whole sentences back, as many as fit in the budget
            while first > 0 and spans[i - 1][1] - spans[first - 1][0] <= budget:
                first -= 1
            start, end = spans[i]
            between = text[spans[i - 1][1]:start]
            # a line break stays with the context; a space goes with the continuation, the way
            # the tokenizer joins words (" And"), as lm-evaluation-harness moves it
            cut = start if "\n" in between else spans[i - 1][1]
            slots.append(_Slot(d, i, text[spans[first][0]:cut], "" if "\n" in between else between,
                               text[start:end]))
    return slots


def _task(name: str, kind: str, lang: str, slots: list[_Slot], seed: int, limit: int,
          example) -> Task:
    """The first `limit` examples `example(slot)` makes (None: none from that slot), the slots
    in a fixed order (string seeds are hashed the same in every Python process), so the first
    n examples are the same whatever the limit."""
    order = list(slots)
    random.Random(f"{seed}/{name}").shuffle(order)
    examples = list(itertools.islice(filter(None, map(example, order)), limit))  # lazily
    if not examples:
        raise ValueError(f"task {name!r}: the {lang!r} validation documents give no examples")
    return Task(name, kind, examples, f"the validation split ({lang})")


def cloze_task(docs: list[str], lang: str, limit: int = 100, seed: int = 0) -> Task:
    """The next sentence among N_CHOICES: the true one and others from other documents."""
    name = f"cloze-{lang}"
    lo, hi = SENTENCE_CHARS.get(lang, SENTENCE_CHARS["en"])
    pool = [s for s in _slots(docs, lang) if lo <= len(s.sentence) <= hi]

    def example(slot: _Slot) -> ChoiceExample | None:
        n = len(slot.sentence)
        others = sorted({s.sentence for s in pool if s.doc != slot.doc and s.sentence != slot.sentence
                         and n / LENGTH_RATIO <= len(s.sentence) <= n * LENGTH_RATIO})
        if len(others) < N_CHOICES - 1:
            return None
        rng = random.Random(f"{seed}/{name}/{slot.doc}/{slot.index}")  # apart from the limit
        choices = rng.sample(others, N_CHOICES - 1)
        answer = rng.randrange(N_CHOICES)
        choices.insert(answer, slot.sentence)
        return ChoiceExample(slot.context, tuple(slot.joiner + c for c in choices), answer)

    return _task(name, "choice", lang, pool, seed, limit, example)


def completion_task(docs: list[str], lang: str, limit: int = 100, seed: int = 0) -> Task:
    """The end of a sentence, written by the model: its last word (en) or its last ZH_TAIL
    characters (zh and any other language), which must be followed by the sentence's end."""
    tail = _EN_TAIL if lang == "en" else _ZH_TAIL

    def example(slot: _Slot) -> GenExample | None:
        match = tail.match(slot.sentence)
        if match is None or (lang == "en" and len(match.group(1).split()) < 3):
            return None
        return GenExample(slot.context + slot.joiner + match.group(1), match.group(2),
                          tuple(WORD_STOPS))

    return _task(f"complete-{lang}", "generate", lang, _slots(docs, lang), seed, limit, example)


# --- the tasks as lm-evaluation-harness reads them ----------------------------------------------
def export_task(task: Task, folder, start: str, max_gen_toks: int = 0) -> list[Path]:
    """task.jsonl and an lm-evaluation-harness task YAML (minimoe_<name>) that scores it as
    minimoe does, after the tokenizer's start token `start` (docs/method.md#evaluation);
    generation takes one set of stop strings per task and `max_gen_toks` new tokens."""
    if task.kind == "choice":
        fields = {"output_type": "multiple_choice", "doc_to_choice": "choices",
                   "doc_to_target": "answer", "target_delimiter": ""}
        metrics = ["acc", "acc_norm"]
    else:
        stops = {ex.stop for ex in task.examples}
        if len(stops) > 1:
            raise ValueError(f"task {task.name!r}: its examples stop at different strings; "
                             "lm-evaluation-harness takes one set per task")
        fields = {"output_type": "generate_until", "doc_to_target": "answer",
                   "generation_kwargs": {"until": list(stops.pop()), "do_sample": False,
                                         "max_gen_toks": max_gen_toks},
                   "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                                {"function": "take_first"}]}]}
        metrics = ["exact_match"]
    lines = [json.dumps(asdict(ex), ensure_ascii=False) for ex in task.examples]
    return _write_harness_task(Path(folder), task.name, lines, start + "{{context}}", fields,
                               metrics)


def export_texts(name: str, texts: list[str], folder) -> list[Path]:
    """Documents as an lm-evaluation-harness rolling log-likelihood task (bits per byte: the
    harness starts each document after its prefix token, bos or else eos, as minimoe does)."""
    lines = [json.dumps({"text": text}, ensure_ascii=False) for text in texts]
    fields = {"output_type": "loglikelihood_rolling", "doc_to_target": "text"}
    return _write_harness_task(Path(folder), name, lines, "", fields,
                               ["byte_perplexity", "bits_per_byte"])


def _write_harness_task(folder: Path, name: str, lines: list[str], text: str, fields: dict,
                        metrics: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data, spec = folder / f"{name}.jsonl", folder / f"{name}.yaml"
    files.write_text(data, "\n".join(lines) + "\n")
    config = {"task": f"minimoe_{name}", "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "test_split": "test",
              "doc_to_text": text, **fields, "metric_list": [{"metric": m} for m in metrics],
              "metadata": {"version": FORMAT}}
    # JSON scalars are YAML: one key per line, each value as JSON
    files.write_text(spec, "".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n"
                                   for k, v in config.items()))
    return [data, spec]
