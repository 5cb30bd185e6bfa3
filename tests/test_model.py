"""The dense decoder: shapes, causality, and equality with transformers' LlamaForCausalLM."""

import pytest
import torch

from minimoe.config import get_preset
from minimoe.interop import (config_from_hf, export_llama_state_dict, hf_llama_config,
                             import_llama_state_dict)
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


@pytest.mark.parametrize("changes", [
    dict(n_heads=8, n_kv_heads=2, qkv_bias=True),   # GQA + QKV bias, the Aquila layout
    dict(n_heads=4, n_kv_heads=4, qkv_bias=False, tie_embeddings=True),  # MHA, tied head
])
def test_equals_transformers_llama_both_ways(changes):
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(**changes)
    ours = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor would show
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg)).eval()
    hf.load_state_dict(export_llama_state_dict(ours.state_dict()), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=0)
        # and back: a fresh model of ours loaded from HF's weights and config
        back = build_model(config_from_hf(hf.config)).eval()
        back.load_state_dict(import_llama_state_dict(hf.state_dict()))
        torch.testing.assert_close(back(idx), hf(idx).logits, atol=1e-5, rtol=0)
    assert config_from_hf(hf.config) == cfg.replace(init_std=cfg.init_std)


def test_nonzero_o_proj_bias_is_refused():
    cfg = get_preset("tiny")
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg))
    sd = hf.state_dict()
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.ones_like(sd["model.layers.0.self_attn.o_proj.bias"])
    with pytest.raises(ValueError, match="o_proj"):
        import_llama_state_dict(sd)
