"""In and out of the ecosystem. A run exported with `minimoe export` loads with
AutoModelForCausalLM and AutoTokenizer alone and gives our logits and our tokens; a checkpoint
transformers wrote (save_pretrained, random weights, a real tokenizer) imports into a run that
grows, upcycles, trains, evaluates and exports back unchanged; what a format cannot hold is
refused by name. A run trained on `minimoe tokenize` shards is evaluated, generated from,
analysed and reported on like any other; training curves reach TensorBoard; the corpus cache is
keyed on content; lm-evaluation-harness scores exported tasks exactly as `minimoe eval` does."""

import functools
import json

import pytest
import torch

from minimoe import checkpoint as ckpt
from minimoe.cli import main
from minimoe.data import Split, demo_sources, documents
from minimoe.interop import config_from_hf
from minimoe.recipes.stages import (data_spec, evaluate_run, mix_used, pretrain, run_data,
                                    scale_out_run, specialisation_run)
from minimoe.shards import load_data, tokenize
from minimoe.tokens import EOS, Tokenizer, train_bpe
from minimoe.train import TrainConfig, read_log
from minimoe.upcycle import upcycle

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

TEXTS = ["And God said, Let there be light: and there was light. In 1998, 12 tribes.",
         "新华社北京1月1日电 中华人民共和国主席江泽民发表了1998年新年讲话。"]
TINY_TC = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=2,
                      eval_batches=1, ckpt_every=4, log_every=1)
SMALL_EVAL = TrainConfig(batch_size=2, seq_len=32, eval_batches=1)  # a transformation's val loss


def _refused(capsys, args: list, *needles):
    """The command fails with one line on stderr naming each of `needles`, exit code 2."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and all(n in err for n in needles), err


def _logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return getattr(out, "logits", out)


@functools.cache
def _demo_texts(lang: str, split: str) -> list[str]:
    """The demo corpus's training or validation documents of one language, in stream order."""
    docs = list(documents(demo_sources()))
    rule = Split(docs, val_fraction=0.03, seed=0)  # load_data's defaults
    return [text for domain, doc_lang, text in docs
            if doc_lang == lang and rule.is_val(domain, doc_lang, text) == (split == "val")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny run (QKV bias, a byte-level BPE) trained on shards of real English and Chinese."""
    root = tmp_path_factory.mktemp("shards")
    for lang in ("en", "zh"):
        docs = _demo_texts(lang, "train")[:40]
        (root / f"{lang}.txt").write_text("\n\n".join(d[:2000] for d in docs) + "\n")
    tokenize([str(root / "en.txt"), str(root / "zh.txt")], root / "shards", vocab_size=400,
             val_fraction=0.25, progress=False)
    pretrain("tiny", root / "run", TINY_TC, data_spec([str(root / "shards")]), progress=False)
    return root


@pytest.fixture(scope="module")
def run(shards):
    return shards / "run"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small folder of the user's text: real English and Chinese documents."""
    folder = tmp_path_factory.mktemp("text")
    for lang in ("en", "zh"):
        docs = _demo_texts(lang, "train")[:12] + _demo_texts(lang, "val")[:4]
        (folder / f"{lang}.txt").write_text("\n\n".join(d[:1500] for d in docs) + "\n")
    return folder


def _check_export(run_dir, out, capsys, fmt):
    """The folder alone gives our logits and our tokens (Chinese and digits included)."""
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = AutoTokenizer.from_pretrained(out)
    ours, _ = ckpt.load_model(run_dir)
    tok = Tokenizer.load(run_dir)
    assert type(hf).__name__ == fmt
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tok.encode(text), text
    ids = [tok.start_id] + tok.encode(" ".join(TEXTS))[: ours.cfg.max_seq_len - 1]
    torch.testing.assert_close(_logits(hf, ids), _logits(ours.eval(), ids), atol=1e-5, rtol=0)
    assert hf.generation_config.eos_token_id == tok.eos_id


def test_export_dense_loads_alone_and_equals_ours(run, tmp_path, capsys):
    out = tmp_path / "hf"
    for _ in range(2):  # a second export replaces the first
        assert main(["export", "--ckpt", str(run), "--out", str(out)]) == 0
    # QKV bias with our tokenizer: Llama (attention_bias, zero o_proj bias), since transformers
    # rebuilds a Qwen2 model's tokenizer with Qwen2's own pre-tokenizer
    _check_export(run, out, capsys, "LlamaForCausalLM")
    card = (out / "README.md").read_text()
    assert str(run) in card and "pretrain" in card and "LlamaForCausalLM" in card
    _refused(capsys, ["export", "--ckpt", run, "--out", tmp_path / "q", "--format", "qwen2"],
             "format='qwen2'", "pre-tokenizer")
    (out / "notes.txt").write_text("mine")
    _refused(capsys, ["export", "--ckpt", run, "--out", out], "notes.txt", "not an export")


def test_export_moe_as_qwen2_moe_or_mixtral(run, tmp_path, capsys):
    moe = tmp_path / "moe"
    scale_out_run(run, moe, n_experts=4, top_k=2, tc=SMALL_EVAL, router_std=0.5)
    assert (moe / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    out = tmp_path / "hf-moe"  # trained QKV biases: Qwen2-MoE with an empty shared expert
    assert main(["export", "--ckpt", str(moe), "--out", str(out)]) == 0
    _check_export(moe, out, capsys, "Qwen2MoeForCausalLM")
    assert json.loads((out / "config.json").read_text())["shared_expert_intermediate_size"] == 0
    _refused(capsys, ["export", "--ckpt", moe, "--out", tmp_path / "m", "--format", "mixtral"],
             "q_proj.bias: nonzero")
    # without biases, and expert outputs scaled (folded into down_proj): Mixtral
    dense, _ = ckpt.load_model(run)
    nobias = dense.cfg.replace(qkv_bias=False)
    plain = type(dense)(nobias)
    plain.load_state_dict({k: v for k, v in dense.state_dict().items() if "bias" not in k})
    model = upcycle(plain, n_experts=4, top_k=2, router_std=0.5, expert_scale=2.0)
    ckpt.save_model(tmp_path / "mixtral-run", model, {"stage": "scale-out", "init_from": str(run)})
    Tokenizer.load(run).save(tmp_path / "mixtral-run")
    assert main(["export", "--ckpt", str(tmp_path / "mixtral-run"), "--out",
                 str(tmp_path / "hf-mixtral")]) == 0
    _check_export(tmp_path / "mixtral-run", tmp_path / "hf-mixtral", capsys, "MixtralForCausalLM")


# --- in: checkpoints transformers wrote ------------------------------------------------------------
def _hub_checkpoint(folder, model_type: str, texts: list[str], tie: bool = False, **config):
    """save_pretrained of a random model (every tensor perturbed) and a BPE trained on `texts`:
    GPT-2's pre-tokenizer for Llama and Mistral, Qwen2's (with NFC) for Qwen2, as each ships."""
    from tokenizers import Regex, Tokenizer as RawTokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    if model_type == "qwen2":
        raw = RawTokenizer(models.BPE())
        raw.normalizer = normalizers.NFC()
        raw.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        raw.decoder = decoders.ByteLevel()
        raw.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    else:
        raw = RawTokenizer.from_str(train_bpe(texts, 400))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS)
    hf_config = transformers.AutoConfig.for_model(
        model_type, vocab_size=raw.get_vocab_size() + 8, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=176,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        eos_token_id=raw.token_to_id(EOS), **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, max_shard_size="200KB")  # an index and several files
    tokenizer.save_pretrained(folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("model_type, tie, config", [
    ("llama", False, {"attention_bias": True}),  # the zero o_proj bias is checked and dropped
    ("mistral", False, {"sliding_window": None}),
    ("qwen2", True, {}),  # tied embeddings, as Qwen2.5-0.5B
])
def test_import_equals_the_checkpoint_and_exports_back(model_type, tie, config, text, tmp_path,
                                                       capsys):
    texts = [d for p in sorted(text.glob("*.txt")) for d in p.read_text().split("\n\n")]
    hf, hf_tok = _hub_checkpoint(tmp_path / "hub", model_type, texts, tie, **config)
    if model_type == "llama":
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.o_proj.bias.zero_()
        hf.save_pretrained(tmp_path / "hub", max_shard_size="200KB")
    run = tmp_path / "run"
    assert (tmp_path / "hub" / "model.safetensors.index.json").exists()
    assert main(["import", "--hf", str(tmp_path / "hub"), "--out", str(run),
                 "--data", str(text)]) == 0
    tok = Tokenizer.load(run)
    for t in TEXTS:
        assert tok.encode(t) == hf_tok(t, add_special_tokens=False)["input_ids"], t
    ours, meta = ckpt.load_model(run)
    assert meta["data"]["tokenizer"] == "run" and ours.cfg.vocab_size == tok.vocab_size + 8
    ids = [tok.start_id] + tok.encode(" ".join(TEXTS))[:100]
    torch.testing.assert_close(_logits(ours.eval(), ids), _logits(hf, ids), atol=1e-5, rtol=0)
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == {"mistral": "LlamaForCausalLM"}.get(model_type, type(hf).__name__)
    torch.testing.assert_close(_logits(back, ids), _logits(hf, ids), atol=1e-5, rtol=0)
    if model_type != "qwen2":
        return
    # the imported run in the chain: upcycled, it equals the dense model at init; it trains
    # on the user's text in its own tokenizer, is scored and generates
    tokenize([str(text)], tmp_path / "shards", str(tmp_path / "hub"), val_fraction=0.2,
             progress=False)  # text of any size: shards in the checkpoint's tokenizer
    assert main(["import", "--hf", str(tmp_path / "hub"), "--out", str(tmp_path / "run2"),
                 "--data", str(tmp_path / "shards")]) == 0
    assert run_data(tmp_path / "run2")[0].n_tokens() > 0
    report = scale_out_run(run, tmp_path / "moe", n_experts=4, top_k=2, tc=SMALL_EVAL)
    # equal up to fp32 rounding: the top-2 gate weights of identical experts sum to 1 only to rounding
    assert report["val_after"] == pytest.approx(report["val_before"], abs=1e-5)
    moe, _ = ckpt.load_model(tmp_path / "moe")
    torch.testing.assert_close(_logits(moe.eval(), ids), _logits(ours, ids), atol=1e-5, rtol=0)
    assert main(["pretrain", "--init", str(run), "--out", str(tmp_path / "cpt"), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--no-progress"]) == 0
    assert (tmp_path / "cpt" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    task = tmp_path / "sky.jsonl"
    task.write_text(json.dumps({"context": "天空是", "choices": ["蓝色的。", "绿色的。"], "answer": 0}))
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "cpt"), "--tasks", f"ppl,{task}",
                 "--ppl-chars", "500", "--json", "--no-progress"]) == 0
    results = json.loads(capsys.readouterr().out)[str(tmp_path / "cpt")]
    assert results["ppl"]["metrics"]["bpb"] > 0 and results["sky"]["n"] == 1
    assert main(["generate", "--ckpt", str(tmp_path / "cpt"), "--prompt", "新华社",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("新华社")


def test_import_refuses_what_minimoe_cannot_represent(text, tmp_path, capsys):
    texts = [d for p in sorted(text.glob("*.txt")) for d in p.read_text().split("\n\n")]
    _hub_checkpoint(tmp_path / "hub", "llama", texts, rope_scaling={"rope_type": "linear",
                                                                    "factor": 2.0})
    _refused(capsys, ["import", "--hf", tmp_path / "hub", "--out", tmp_path / "a"],
             "rope_type='linear'")
    assert not (tmp_path / "a").exists()
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    for weights in [*(tmp_path / "hub").glob("*.safetensors*")]:  # only a pickle left
        weights.unlink()
    (tmp_path / "hub" / "pytorch_model.bin").write_bytes(b"")
    _refused(capsys, ["import", "--hf", tmp_path / "hub", "--out", tmp_path / "b"],
             "no model.safetensors", "pickle")
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=8: must be 0"):
        config_from_hf(transformers.AutoConfig.for_model("qwen2_moe", shared_expert_intermediate_size=8))


# --- runs from shards, TensorBoard, the corpus cache, lm-evaluation-harness --------------------
def test_a_shard_run_evaluates_generates_and_routes(shards, tmp_path, capsys):
    run = shards / "run"
    assert (run / "tokenizer.json").read_text() == (shards / "shards" / "tokenizer.json").read_text()
    assert main(["eval", "--ckpt", str(run), "--tasks", "cloze-zh,complete-en,ppl",
                 "--limit", "4", "--ppl-chars", "1000", "--json", "--no-progress"]) == 0
    results = json.loads(capsys.readouterr().out)[str(run)]
    assert results["cloze-zh"]["n"] == 4 and results["ppl"]["metrics"]["bpb zh"] > 0
    # the tasks written for lm-evaluation-harness are the same tasks: scored from their files,
    # they give the built-in tasks' numbers
    assert main(["eval", "--ckpt", str(run), "--tasks", "cloze-zh,complete-en", "--limit", "4",
                 "--export-tasks", str(tmp_path / "tasks")]) == 0
    assert "--include_path" in capsys.readouterr().out
    files = [str(tmp_path / "tasks" / f"{t}.jsonl") for t in ("cloze-zh", "complete-en")]
    assert main(["eval", "--ckpt", str(run), "--tasks", ",".join(files), "--json",
                 "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)[str(run)]
    assert [again[t]["metrics"] for t in ("cloze-zh", "complete-en")] == \
        [results[t]["metrics"] for t in ("cloze-zh", "complete-en")]
    assert main(["generate", "--ckpt", str(run), "--prompt", "And God", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("And God")
    moe = tmp_path / "moe"
    scale_out_run(run, moe, n_experts=4, top_k=2, tc=TrainConfig(batch_size=2, seq_len=32,
                                                                 eval_batches=1))
    assert main(["experts", "--ckpt", str(moe), "--batches", "1", "--batch-size", "2",
                 "--seq-len", "32"]) == 0
    assert "domains en, zh" in capsys.readouterr().out
    # what the pipeline's report reads of a run
    assert evaluate_run(run, tasks=("cloze-en",), limit=2)["cloze-en"]["n"] == 2
    assert "en" in mix_used(run, read_log(run))
    assert specialisation_run(moe, tmp_path / "experts", batch_size=2, seq_len=32,
                              n_batches=1)["domains"] == ["en", "zh"]


def test_training_curves_reach_tensorboard(shards, tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard extra is not installed")
    assert main(["pretrain", "--preset", "tiny", "--data", str(shards / "shards"), "--out",
                 str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--eval-every", "1", "--log-every", "1", "--mix", "en=0.4,zh=0.6",
                 "--tensorboard", str(tmp_path / "tb"), "--no-progress"]) == 0
    board = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    log = read_log(tmp_path / "run")
    for key in ("loss", "val_loss", "mix/en"):
        logged = [(r["step"], r[key] if "/" not in key else r["mix"]["en"]) for r in log
                  if key in r or ("/" in key and "mix" in r)]
        assert [(e.step, pytest.approx(e.value)) for e in board.Scalars(key)] == logged


def test_the_corpus_cache_is_keyed_on_content(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    docs = [f"Document {i}: " + "the same words again and again, " * 4 for i in range(6)]
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "text.txt").write_text("\n\n".join(docs))
    first, _ = load_data([str(tmp_path / "a" / "text.txt")], tokenizer="byte", val_fraction=0.3)
    built = (first.path / "manifest.json").stat().st_mtime_ns
    moved, _ = load_data([str(tmp_path / "b" / "text.txt")], tokenizer="byte",
                         val_fraction=0.3)  # another place
    assert moved.path == first.path and (moved.path / "manifest.json").stat().st_mtime_ns == built
    (tmp_path / "b" / "text.txt").write_text("\n\n".join(docs[:5]))
    edited, _ = load_data([str(tmp_path / "b" / "text.txt")], tokenizer="byte", val_fraction=0.3)
    assert edited.path != first.path


def test_lm_eval_scores_the_exported_tasks_as_minimoe_eval_does(shards, tmp_path, capsys):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the harness extra) "
                                                    "is not installed")
    pytest.importorskip("transformers")
    from lm_eval.tasks import TaskManager

    run, tasks = shards / "run", "cloze-en,cloze-zh,ppl"
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 0
    args = ["eval", "--ckpt", str(run), "--tasks", tasks, "--limit", "8", "--ppl-chars", "600"]
    assert main([*args, "--export-tasks", str(tmp_path / "tasks")]) == 0
    capsys.readouterr()
    assert main([*args, "--json", "--no-progress"]) == 0
    ours = json.loads(capsys.readouterr().out)[str(run)]
    names = ["minimoe_cloze-en", "minimoe_cloze-zh", "minimoe_ppl", "minimoe_ppl-zh"]
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32", tasks=names,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), batch_size=8,
        device="cpu")["results"]
    for lang in ("en", "zh"):
        for metric in ("acc", "acc_norm"):
            assert theirs[f"minimoe_cloze-{lang}"][f"{metric},none"] == ours[f"cloze-{lang}"]["metrics"][metric]
            assert theirs[f"minimoe_cloze-{lang}"][f"{metric}_stderr,none"] == pytest.approx(
                ours[f"cloze-{lang}"]["stderr"][metric])
    for name, key in (("minimoe_ppl", "bpb"), ("minimoe_ppl-zh", "bpb zh")):
        assert theirs[name]["bits_per_byte,none"] == pytest.approx(ours["ppl"]["metrics"][key], rel=1e-6)
