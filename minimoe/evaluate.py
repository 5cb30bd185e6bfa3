"""Evaluation: validation loss, perplexity and bits per byte, multiple-choice and generative
tasks (minimoe/tasks.py) scored as lm-evaluation-harness scores them (`acc`, `acc_norm`, exact
match, each with its standard error), every text after the tokenizer's start token as in the
training stream. Where and why we differ at the join: docs/method.md#evaluation."""

from __future__ import annotations

import bisect
import itertools
import math

import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from minimoe.generate import generate_text
from minimoe.tasks import Task, export_task, export_texts, resolve_task

PPL = "ppl"  # the task name of perplexity and bits per byte on the validation split


@torch.no_grad()
def evaluate(model, data, tc) -> dict[str, float]:
    """Mean validation loss over the fixed batches of `tc` (a TrainConfig), overall, per language
    and per domain (val_<domain>; a domain whose tokens are a language's gets that number)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    result = {}
    for lang in [None, *data.langs, *data.val_domains]:
        stored = data.stored_as["val" if lang is None else f"val_{lang}"]
        if stored in result:  # the same tokens under another name: measured once
            result[f"val_{lang}"] = result[stored]
            continue
        losses = []  # eval_batches >= 1 (TrainConfig's rule)
        for x, y in data.val_batches(tc.batch_size, tc.seq_len, tc.eval_batches, lang=lang):
            logits = model(x.to(device))
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten()).item())
        result["val_loss" if lang is None else f"val_{lang}"] = sum(losses) / len(losses)
    model.train(was_training)
    return result


# --- log-likelihoods --------------------------------------------------------------------
def join_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(start + context + continuation as one text's tokens, how many of them precede the
    continuation's): the first token whose text ends past the context is the continuation's, so
    every token is scored once and a token merged across the join counts for the continuation.
    White space ending the context counts with the continuation (lm-evaluation-harness moves it)."""
    ids, ends = tokenizer.encode_with_ends(context + continuation)
    return [tokenizer.start_id] + ids, 1 + bisect.bisect_right(ends, len(context.rstrip()))


@torch.inference_mode()
def loglikelihoods(model, requests: list[tuple[list[int], int]], batch_size: int = 32
                   ) -> list[tuple[float, int]]:
    """For each (ids, n_context): the summed log-probability (nats) of ids[n_context:], each
    token given those before it, and how many tokens that is. A sequence longer than the model's
    context loses tokens on the left (as lm-evaluation-harness truncates)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    window = model.cfg.max_seq_len + 1  # inputs and targets overlap by all but one token
    rows = []
    for ids, n_context in requests:
        cut = max(0, len(ids) - window)
        if n_context - cut < 1:
            raise ValueError(f"a continuation of {len(ids) - n_context} tokens: longer than the "
                             f"model's max_seq_len={model.cfg.max_seq_len}")
        rows.append((ids[cut:], n_context - cut))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
    result: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start:start + batch_size]]
        # right padding: causal attention keeps it from changing the positions before it
        x, y = (pad_sequence([torch.tensor(ids[a:len(ids) - 1 + a]) for ids, _ in batch],
                             batch_first=True) for a in (0, 1))  # target j is token j + 1
        scored = pad_sequence([torch.arange(len(ids) - 1) >= n_context - 1 for ids, n_context
                               in batch], batch_first=True)
        logp = model(x.to(device)).float().log_softmax(dim=-1)
        token_logp = logp.gather(-1, y.to(device)[..., None]).squeeze(-1).double().cpu()
        sums = torch.where(scored, token_logp, 0.0).sum(dim=1).tolist()  # padding may be -inf
        for i, total, count in zip(order[start:start + batch_size], sums, scored.sum(1).tolist()):
            result[i] = (total, count)
    model.train(was_training)
    return result


def _stderr(hits: list[float]) -> float:
    """Standard error of a mean of 0/1 scores (sample standard deviation / sqrt(n))."""
    p = sum(hits) / len(hits)
    return math.sqrt(p * (1 - p) / (len(hits) - 1)) if len(hits) > 1 else float("nan")


def score_choices(model, tokenizer, task: Task, batch_size: int = 32) -> dict:
    """acc and acc_norm of a multiple-choice task."""
    requests = [join_tokens(tokenizer, ex.context, c) for ex in task.examples for c in ex.choices]
    lls = iter(loglikelihoods(model, requests, batch_size))
    acc, acc_norm = [], []
    for ex in task.examples:
        ll = [next(lls)[0] for _ in ex.choices]
        per_char = [v / len(c) for v, c in zip(ll, ex.choices)]
        acc.append(float(ll.index(max(ll)) == ex.answer))  # the first of equal values
        acc_norm.append(float(per_char.index(max(per_char)) == ex.answer))
    chance = sum(1 / len(ex.choices) for ex in task.examples) / len(task.examples)
    return _result(task, {"acc": acc, "acc_norm": acc_norm}, {"acc": chance, "acc_norm": chance})


def score_generation(model, tokenizer, task: Task, batch_size: int = 32) -> dict:
    """Exact match: the greedy completion, cut at the example's stop strings and stripped of
    surrounding white space, equals the answer."""
    outputs = [""] * len(task.examples)
    for stop in dict.fromkeys(ex.stop for ex in task.examples):  # one stop set at a time
        members = [i for i, ex in enumerate(task.examples) if ex.stop == stop]
        examples = [task.examples[i] for i in members]
        texts = generate_text(model, tokenizer, [ex.context for ex in examples],
                              max_new_tokens=answer_tokens(tokenizer, examples, model.cfg),
                              stop=list(stop), batch_size=batch_size, truncate=True)
        for i, text in zip(members, texts):
            outputs[i] = text
    em = [float(out.strip() == ex.answer.strip()) for out, ex in zip(outputs, task.examples)]
    return _result(task, {"em": em}, {"em": 0.0}, samples=outputs[:5])


def answer_tokens(tokenizer, examples: list, cfg) -> int:
    """New tokens a completion may take: the longest answer's + 4, at most half the context."""
    longest = max(len(tokenizer.encode(" " + ex.answer)) for ex in examples)
    return min(longest + 4, cfg.max_seq_len // 2)


def _result(task: Task, hits: dict[str, list[float]], chance: dict, **extra) -> dict:
    return {"task": task.name, "kind": task.kind, "n": len(task.examples), "source": task.source,
            "metrics": {k: sum(v) / len(v) for k, v in hits.items()},
            "stderr": {k: _stderr(v) for k, v in hits.items()}, "chance": chance, **extra}


# --- perplexity and bits per byte ---------------------------------------------------------
def document_nll(model, tokenizer, docs: list[str], batch_size: int = 32) -> list[list]:
    """(negative log-likelihood in nats, tokens) of each whole document, every token scored
    once: windows of max_seq_len targets, each seeing the tokens before it in its window, the
    last one reaching back a full window (lm-evaluation-harness's rolling windows)."""
    L = model.cfg.max_seq_len
    requests, owner = [], []
    for d, text in enumerate(docs):
        full = [tokenizer.start_id] + tokenizer.encode(text)
        for a in range(1, len(full), L):  # targets full[a:b]
            b = min(a + L, len(full))
            s = max(0, b - 1 - L)
            requests.append((full[s:b], a - s))
            owner.append(d)
    totals = [[0.0, 0] for _ in docs]
    for d, (ll, count) in zip(owner, loglikelihoods(model, requests, batch_size)):
        totals[d][0] -= ll
        totals[d][1] += count
    return totals


def ppl_documents(corpus, chars: int) -> list[tuple[list[str], list[str]]]:
    """The validation documents bits per byte is measured on, per language and domain: (the
    figures they count in: all "", the language, and the domain where the language has several;
    the documents in file order until `chars` characters, at least one)."""
    groups = {}
    for lang in corpus.langs:
        for domain in corpus.val_domains:
            texts = corpus.texts("val", lang=lang, domain=domain)
            ends = list(itertools.accumulate(len(text) for text in texts))
            if texts:  # every document that starts before `chars`
                groups[(lang, domain)] = texts[:bisect.bisect_left(ends, chars) + 1]
    langs = [lang for lang, _ in groups]
    return [(["", lang] + ([domain] if langs.count(lang) > 1 else []), docs)
            for (lang, domain), docs in groups.items()]


def score_ppl(model, tokenizer, corpus, chars: int = 20_000, batch_size: int = 32) -> dict:
    """Bits per byte overall, per language and (where a language has several) per domain, and
    perplexity per token; chance is the uniform model: log2(V) bits per token, perplexity V."""
    groups = ppl_documents(corpus, chars)
    sums: dict[str, list[float]] = {}  # name -> [nll nats, tokens, bytes]
    for names, docs in groups:
        for text, (nll, count) in zip(docs, document_nll(model, tokenizer, docs, batch_size)):
            for name in names:
                added = (nll, count, len(text.encode("utf-8")))
                sums[name] = [a + b for a, b in zip(sums.get(name, (0.0, 0, 0)), added)]
    metrics, chance = {}, {}
    for name, (nll, count, n_bytes) in sums.items():
        key = f"bpb {name}".strip()
        metrics[key] = nll / math.log(2) / n_bytes
        chance[key] = math.log2(tokenizer.vocab_size) * count / n_bytes
    nll, count, _ = sums[""]
    metrics["ppl"], chance["ppl"] = math.exp(nll / count), float(tokenizer.vocab_size)
    n_docs = sum(len(docs) for _, docs in groups)
    return {"task": PPL, "kind": PPL, "n": n_docs, "source": "the validation split",
            "metrics": metrics, "stderr": {}, "chance": chance, "tokens": count}


def export_tasks(tasks: list, tokenizer, cfg, corpus, folder, ppl_chars: int = 20_000) -> list:
    """Tasks (as load_tasks gives them) written for lm-evaluation-harness (tasks.export_task):
    bits per byte as rolling tasks ppl, ppl-<lang> and ppl-<domain>, minimoe's figures."""
    written = []
    for task in tasks:
        if task != PPL:
            max_new = answer_tokens(tokenizer, task.examples, cfg) if task.kind == "generate" else 0
            written += export_task(task, folder, tokenizer.bos or tokenizer.eos, max_new)
            continue
        named: dict[str, list[str]] = {}
        for names, docs in ppl_documents(corpus, ppl_chars):
            for name in names:
                named.setdefault(f"{PPL}-{name}" if name else PPL, []).extend(docs)
        for name, docs in named.items():
            written += export_texts(name, docs, folder)
    return written


# --- several tasks, one table ---------------------------------------------------------------
def load_tasks(names: list[str], corpus=None, limit: int = 100, seed: int = 0) -> list:
    """Every task resolved and checked before any is run: a bad task file fails first, so
    nothing is evaluated or written for it. PPL stays a name."""
    if not names:
        raise ValueError("tasks: empty; name at least one (cloze-en, ppl, a .jsonl file...)")
    assert limit > 0  # the doors (--limit, the recipes' eval_examples) hold it
    return [name if name == PPL else resolve_task(name, corpus, limit, seed) for name in names]


def run_tasks(model, tokenizer, tasks: list, corpus=None, ppl_chars: int = 20_000,
              batch_size: int = 32, progress: bool = False) -> dict[str, dict]:
    """Each task's result (metrics, standard errors, chance level, examples), by task name."""
    results = {}
    for task in tqdm(tasks, desc="evaluating", unit="task", disable=not progress, leave=False):
        if task == PPL:
            results[PPL] = score_ppl(model, tokenizer, corpus, ppl_chars, batch_size)
        elif task.kind == "choice":
            results[task.name] = score_choices(model, tokenizer, task, batch_size)
        else:
            results[task.name] = score_generation(model, tokenizer, task, batch_size)
    return results


def _cell(metric: str, value) -> str:
    if value is None or value != value:
        return "-"
    if metric.startswith("bpb"):
        return f"{value:.3f}"
    return f"{value:.1f}" if metric == "ppl" else f"{100 * value:.1f}"


def metric_label(task: str, metric: str) -> str:
    unit = "bits/byte" if metric.startswith("bpb") else "" if metric == "ppl" else "%"
    return f"{task} {metric}" + (f" ({unit})" if unit else "")


def results_table(columns: dict[str, dict], stderr: bool = False) -> pd.DataFrame:
    """Rows: task and metric; a column per model (its results from run_tasks), then the chance
    level (shown where every model has the same) and the examples counted. Accuracies in %."""
    rows = {}
    first = next(iter(columns.values()), {})
    for task, result in first.items():
        for metric, chance in result["chance"].items():
            row = {}
            for label, results in columns.items():
                r = results.get(task, {})
                row[label] = _cell(metric, r.get("metrics", {}).get(metric))
                if stderr:
                    row[f"{label} ±"] = _cell(metric, r.get("stderr", {}).get(metric))
            same = all(r.get(task, {}).get("chance", {}).get(metric) == chance for r in columns.values())
            row["chance"] = _cell(metric, chance) if same else "-"
            row["n"] = result["n"]
            rows[metric_label(task, metric)] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("task")
