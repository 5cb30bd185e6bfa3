"""The dense decoder: shapes, causality, and equality with transformers' LlamaForCausalLM."""

import pytest
import torch

from minimoe.config import get_preset
from types import SimpleNamespace

from minimoe.interop import config_from_hf, convert, hf_config, hf_model
from minimoe.model import build_model

transformers = pytest.importorskip("transformers")


def test_logits_shape_and_causality():
    cfg = get_preset("tiny")
    model = build_model(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, cfg.vocab_size)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % cfg.vocab_size
    logits2 = model(changed)
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])  # the past never sees the future
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])


def test_sequence_longer_than_context_is_refused():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="max_seq_len"):
        build_model(cfg)(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))


def test_init_std_sets_the_weights_std():
    cfg = get_preset("tiny").replace(d_model=256, n_heads=8)  # enough weights for a tight std
    for init_std in (0.02, 0.05):
        torch.manual_seed(0)
        model = build_model(cfg.replace(init_std=init_std))
        for w in (model.embed.weight, model.layers[0].attn.q_proj.weight, model.lm_head.weight):
            assert w.std().item() == pytest.approx(init_std, rel=0.05)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("changes", [
    dict(n_heads=8, n_kv_heads=2, qkv_bias=True, init_std=0.01),  # GQA + QKV bias: Aquila
    dict(n_heads=4, n_kv_heads=4, qkv_bias=False, tie_embeddings=True),  # MHA, tied head
])
def test_equals_transformers_both_ways(architecture, changes):
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(**changes)
    ours = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor would show
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf = hf_model(ours, architecture).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[architecture]
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=0)
        # and back: a fresh model of ours loaded from HF's weights and config
        back_cfg = config_from_hf(hf.config)
        back = build_model(back_cfg).eval()
        back.load_state_dict(convert(hf.state_dict(), back_cfg, architecture, to_hf=False), strict=True)
        torch.testing.assert_close(back(idx), hf(idx).logits, atol=1e-5, rtol=0)
    # every field read back, init_std (initializer_range) included; Qwen2 always has QKV bias
    assert back_cfg == cfg.replace(qkv_bias=cfg.qkv_bias or architecture == "qwen2")


def test_qwen2_has_no_o_proj_bias_where_llama_needs_one():
    cfg = get_preset("tiny")  # qkv_bias=True
    sd = build_model(cfg).state_dict()
    assert "model.layers.0.self_attn.o_proj.bias" in convert(sd, cfg, "llama", to_hf=True)
    qwen2 = convert(sd, cfg, "qwen2", to_hf=True)
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen2
    assert "model.layers.0.self_attn.q_proj.bias" in qwen2


def test_mixtral_config_reads_back():
    cfg = get_preset("tiny").replace(qkv_bias=False, n_experts=4, top_k=2, init_std=0.03)
    assert config_from_hf(hf_config(cfg, "mixtral")) == cfg


def _llama(**changes):
    return transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=176, num_hidden_layers=2, vocab_size=512,
                                    **changes)


@pytest.mark.parametrize("hf_config, message", [
    (_llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     r"rope_parameters.rope_type='llama3': not supported"),
    (_llama(rope_scaling={"rope_type": "linear", "factor": 2.0}),
     r"rope_parameters.rope_type='linear': not supported"),
    (_llama(hidden_act="gelu"), r"hidden_act='gelu': must be 'silu'"),
    (_llama(head_dim=32), r"head_dim=32: must equal hidden_size/num_attention_heads = 64/4"),
    (_llama(mlp_bias=True), r"mlp_bias=True: unsupported"),
])
def test_config_from_hf_refuses_what_it_cannot_represent(hf_config, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf_config)


def test_config_from_hf_reads_transformers_4_rope_fields():
    """transformers 4 spells RoPE as rope_theta + rope_scaling (old key "type" too)."""
    v4 = SimpleNamespace(**{k: v for k, v in vars(_llama()).items() if k != "rope_parameters"})
    v4.rope_theta, v4.rope_scaling = 5e5, None
    assert config_from_hf(v4).rope_theta == 5e5
    v4.rope_scaling = {"type": "linear", "factor": 4.0}
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type='linear': not supported"):
        config_from_hf(v4)


def test_config_from_hf_refuses_a_qwen2_sliding_window():
    qwen2 = hf_config(get_preset("tiny"), "qwen2")
    qwen2.use_sliding_window = True
    with pytest.raises(ValueError, match=r"use_sliding_window=True: must be False"):
        config_from_hf(qwen2)


def test_nonzero_o_proj_bias_is_refused():
    cfg = get_preset("tiny")
    hf = transformers.LlamaForCausalLM(hf_config(cfg, "llama"))
    sd = hf.state_dict()
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.ones_like(sd["model.layers.0.self_attn.o_proj.bias"])
    with pytest.raises(ValueError, match="o_proj.bias: nonzero"):
        convert(sd, cfg, "llama", to_hf=False)


def test_the_chunked_loss_is_the_whole_loss_and_holds_one_chunk(monkeypatch):
    """Given targets, the LM head computes the cross-entropy a chunk of tokens at a time, each
    chunk's logits recomputed in backward: the loss and every gradient equal those over all the
    logits at once, and the peak holds about a chunk of logits, not all (fp32, 8 MB here)."""
    import torch.nn.functional as F
    from torch.distributed._tools.mem_tracker import MemTracker

    from minimoe import model as model_module

    cfg = get_preset("tiny").replace(vocab_size=4096, max_seq_len=256)
    torch.manual_seed(0)
    model = build_model(cfg)
    x, y = torch.randint(0, 4096, (2, 256)), torch.randint(0, 4096, (2, 256))
    peaks, grads = {}, {}
    for chunk in (512, 32):  # tokens per chunk: every token at once, then 16 chunks
        monkeypatch.setattr(model_module, "LOSS_CHUNK_LOGITS", chunk * 4096)
        model.zero_grad()
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            loss = model(x, targets=y)
            loss.backward()
        peaks[chunk] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        grads[chunk] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    whole = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(grads[32][0], whole)
    torch.testing.assert_close(grads[32][1], grads[512][1])
    assert peaks[32] < peaks[512] - 2 * 512 * 4096 * 4  # at least two fp32 copies fewer
