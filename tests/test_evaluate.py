"""Evaluation: tasks whose answers are known (a memorising model, a uniform one), bits per byte
with known values, the join of context and continuation, task files and the CLI."""

import json
import math

import pytest
import torch

from minimoe.cli import main
from minimoe.config import get_preset
from minimoe.evaluate import (join_tokens, load_tasks, loglikelihoods, results_table, run_tasks,
                              score_ppl)
from minimoe.model import build_model
from minimoe.recipes.stages import data_spec, pretrain
from minimoe.shards import ShardTexts, load_data
from minimoe.tasks import BUILTIN, WORD_STOPS, load_task_file, resolve_task
from minimoe.tokens import byte_tokenizer
from minimoe.train import TrainConfig


@pytest.fixture(scope="module")
def demo():
    tokens, tokenizer = load_data(vocab_size=512)  # the cache the training tests use
    return ShardTexts(tokens.path), tokenizer


class Uniform(torch.nn.Module):
    """Equal logits for every token, or only for `allowed` ones: a model that knows nothing."""

    def __init__(self, vocab_size: int, allowed: int | None = None, max_seq_len: int = 128):
        super().__init__()
        self.cfg = get_preset("tiny").replace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the callers' device and dtype
        bias = torch.zeros(vocab_size)
        if allowed is not None:
            bias[allowed:] = -math.inf
        self.register_buffer("bias", bias)

    def forward(self, idx, cache=None):
        return self.bias.expand(*idx.shape, -1)


# --- the join of context and continuation ----------------------------------------------------
def test_a_token_merged_at_the_join_counts_once_for_the_continuation(demo):
    _, tok = demo
    context, continuation = "And the LO", "RD said"
    ids, n_context = join_tokens(tok, context, continuation)
    before, after = tok.decode(ids[1:n_context]), tok.decode(ids[n_context:])
    assert ids[0] == tok.eos_id and before + after == context + continuation  # each token once
    assert before != context and after.endswith(continuation)  # " LORD" spans the join
    # encoding the context alone and taking the tail would hand "RD" to no one
    tail = tok.encode(context + continuation)[len(tok.encode(context)):]
    assert tok.decode(tail) != continuation and not tok.decode(tail).endswith("RD said")
    # the log-likelihoods of the two parts add up to the whole text's
    torch.manual_seed(0)
    model = build_model(get_preset("tiny").replace(vocab_size=tok.vocab_size)).eval()
    (whole, n_all), (cont, n_cont) = loglikelihoods(model, [(ids, 1), (ids, n_context)])
    (ctx, _), = loglikelihoods(model, [(ids[:n_context], 1)])
    assert n_all == len(ids) - 1 and n_cont == len(ids) - n_context
    assert ctx + cont == pytest.approx(whole, abs=1e-6)
    byte_ids, byte_n = join_tokens(byte_tokenizer(), "中", "国")  # three bytes per character
    assert byte_n == 4 and len(byte_ids) == 7


# --- bits per byte -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    en = [f"Document {i}: the quick brown fox jumps over the lazy dog, and then it sleeps {i} hours."
          for i in range(5)]
    zh = [f"第{i}篇文章。今天天气很好,我们一起去公园散步,看见了很多美丽的花和树,大家都很高兴。"
          "晚上我们回到家里,一起做饭,吃饭,然后看书。" for i in range(5)]
    (root / "text.txt").write_text("\n\n".join(en + zh), encoding="utf-8")
    tokens, _ = load_data([str(root / "text.txt")], tokenizer="byte", cache_dir=root / "cache")
    return ShardTexts(tokens.path)


def test_a_uniform_model_over_bytes_gives_exactly_8_bits_per_byte(small_corpus):
    tok = byte_tokenizer()
    model = Uniform(tok.vocab_size, allowed=256, max_seq_len=32)  # every byte, never eos
    result = score_ppl(model, tok, small_corpus, chars=10_000)
    for key in ("bpb", "bpb en", "bpb zh"):
        assert result["metrics"][key] == pytest.approx(8.0, rel=1e-6), key
    assert result["metrics"]["ppl"] == pytest.approx(256, rel=1e-5)


def test_a_uniform_model_over_a_bpe_vocabulary_gives_log2_v_bits_per_token(small_corpus, demo):
    _, tok = demo
    torch.manual_seed(0)
    model = build_model(get_preset("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=16))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # equal logits: a uniform model
    result = score_ppl(model, tok, small_corpus, chars=10_000)
    docs = small_corpus.texts("val")
    tokens = sum(len(tok.encode(d)) for d in docs)  # windows of 16: every token exactly once
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert result["tokens"] == tokens and result["n"] == len(docs)
    expected = math.log2(tok.vocab_size) * tokens / n_bytes
    assert result["metrics"]["bpb"] == pytest.approx(expected, rel=1e-6)
    assert result["chance"]["bpb"] == pytest.approx(expected, rel=1e-12)
    assert result["metrics"]["ppl"] == pytest.approx(tok.vocab_size, rel=1e-5)


# --- tasks with known answers ----------------------------------------------------------------
NAMES = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle"]
COLOURS = ["red", "blue", "grey", "white", "gold", "black", "green", "pink"]


def _write_tasks(folder):
    """A multiple-choice and a generative task on the same eight facts."""
    choice, gen = folder / "colours.jsonl", folder / "colours-gen.jsonl"
    lines = []
    for i, name in enumerate(NAMES):
        wrong = [COLOURS[(i + k) % 8] for k in (1, 3, 5)]
        choices = [f" {c}." for c in wrong]
        choices.insert(i % 4, f" {COLOURS[i]}.")
        lines.append(json.dumps({"context": f"The {name} is", "choices": choices, "answer": i % 4}))
    choice.write_text("\n".join(lines) + "\n")
    gen.write_text("".join(json.dumps({"context": f"The {name} is", "answer": COLOURS[i],
                                       "stop": ["."]}) + "\n" for i, name in enumerate(NAMES)))
    return choice, gen


def test_a_model_that_memorised_a_task_scores_100_percent(tmp_path):
    tok = byte_tokenizer()
    choice, gen = (load_task_file(p) for p in _write_tasks(tmp_path))
    assert (choice.kind, gen.kind, len(choice.examples)) == ("choice", "generate", 8)
    texts = [[tok.eos_id] + tok.encode(f"The {n} is {c}.") for n, c in zip(NAMES, COLOURS)]
    width = max(len(t) for t in texts)
    batch = torch.tensor([t + [tok.eos_id] * (width - len(t)) for t in texts])
    torch.manual_seed(0)
    model = build_model(get_preset("tiny").replace(vocab_size=tok.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):  # the loss left is the name's first letter after "The "
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    results = run_tasks(model, tok, [choice, gen])
    assert results["colours"]["metrics"] == {"acc": 1.0, "acc_norm": 1.0}
    assert results["colours-gen"]["metrics"] == {"em": 1.0}  # written with the KV cache
    assert results["colours"]["chance"]["acc"] == 0.25


def test_a_uniform_model_scores_at_chance_on_the_built_in_tasks(demo):
    corpus, tok = demo
    tasks = load_tasks(list(BUILTIN), corpus, limit=200)
    results = run_tasks(Uniform(tok.vocab_size), tok, tasks)
    for name in ("cloze-en", "cloze-zh"):
        # equal logits prefer the choice of fewest tokens: at chance only if the distractors
        # are drawn like the true sentence (the answer's length tells nothing)
        r = results[name]
        assert r["n"] == 200 and r["chance"]["acc"] == 0.25
        for metric in ("acc", "acc_norm"):
            assert abs(r["metrics"][metric] - 0.25) < 0.1, (name, metric, r["metrics"])
    assert results["complete-en"]["metrics"]["em"] == 0.0
    assert results["complete-zh"]["metrics"]["em"] == 0.0


def test_the_built_in_tasks_come_from_the_held_out_text(demo):
    corpus, _ = demo
    for lang in ("en", "zh"):
        docs = corpus.texts("val", lang=lang)
        cloze = resolve_task(f"cloze-{lang}", corpus, limit=30)
        assert resolve_task(f"cloze-{lang}", corpus, limit=10).examples == cloze.examples[:10]
        assert len({ex.answer for ex in cloze.examples}) == 4  # the answer is anywhere
        for ex in cloze.examples:
            truth = ex.context + ex.choices[ex.answer]
            assert any(truth in d for d in docs)  # the data decides the answer
            assert len(set(ex.choices)) == 4
            wrong = [ex.context + c for i, c in enumerate(ex.choices) if i != ex.answer]
            assert not any(w in d for w in wrong for d in docs)
        for ex in resolve_task(f"complete-{lang}", corpus, limit=30).examples:
            written = ex.context + (" " if lang == "en" else "") + ex.answer  # the word's space
            doc = next(d for d in docs if written in d)
            assert doc[doc.index(written) + len(written)] in "".join(WORD_STOPS)  # ends there
            assert ex.answer.strip() == ex.answer and ex.answer


def test_results_table_shows_chance_and_percentages(demo):
    corpus, tok = demo
    results = run_tasks(Uniform(tok.vocab_size), tok, load_tasks(["cloze-en"], corpus, limit=8))
    table = results_table({"a": results, "b": results})
    assert list(table.columns) == ["a", "b", "chance", "n"]
    assert table.loc["cloze-en acc (%)", "chance"] == "25.0"


# --- task files and the CLI ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    tc = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=4,
                     eval_batches=1, ckpt_every=4, log_every=1)
    pretrain("tiny", out, tc, data_spec(vocab_size=512), progress=False)
    return out


GOOD = {"context": "The sky is", "choices": [" blue.", " green."], "answer": 0}
BAD_LINES = {
    "bad JSON": ('{"context": "x", "choices": ["a", "b"], "answer": 0', "not valid JSON"),
    "missing field": (json.dumps({"context": "x", "choices": ["a", "b"]}), "missing field 'answer'"),
    "answer out of range": (json.dumps({**GOOD, "answer": 2}), "answer=2"),
    "empty choices": (json.dumps({**GOOD, "choices": []}), "choices=[]"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_malformed_task_file_is_refused_with_its_line(case, tiny_run, tmp_path, capsys):
    line, message = BAD_LINES[case]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), json.dumps(GOOD), line, json.dumps(GOOD)]) + "\n")
    out = tmp_path / "results.json"
    code = main(["eval", "--ckpt", str(tiny_run), "--tasks", f"cloze-en,{path}", "--limit", "3",
                 "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and f"{path}:3:" in err and message in err, err
    assert not out.exists()  # nothing written


def test_eval_and_generate_commands_run_on_a_tiny_run(tiny_run, tmp_path, capsys):
    choice, gen = _write_tasks(tmp_path)
    out = tmp_path / "results.json"
    assert main(["eval", "--ckpt", str(tiny_run), "--tasks", f"cloze-zh,ppl,{choice},{gen}",
                 "--limit", "4", "--ppl-chars", "300", "--json", "--out", str(out),
                 "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    results = printed[str(tiny_run)]
    assert set(results) == {"cloze-zh", "ppl", "colours", "colours-gen"}
    assert results["colours"]["n"] == 4 and 0 <= results["colours"]["metrics"]["acc"] <= 1
    assert results["ppl"]["metrics"]["bpb"] > 0
    assert main(["eval", "--ckpt", str(tiny_run), "--tasks", "cloze-en", "--limit", "4",
                 "--no-progress"]) == 0
    assert "cloze-en acc_norm (%)" in capsys.readouterr().out
    assert main(["generate", "--ckpt", str(tiny_run), "--prompt", "And God said",
                 "--max-new-tokens", "8", "--temperature", "0.8", "--top-p", "0.9",
                 "--num-samples", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("And God said") == 2 and "--- sample 2" in text
    assert main(["generate", "--ckpt", str(tiny_run), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p=0: must be in (0, 1]" in capsys.readouterr().err
