"""flops.py against a counter that runs the real model (fvcore, torch's FlopCounterMode), against
Megatron-LM's formula (megatron/training/training.py, num_floating_point_operations), and the
`minimoe flops` command (units, --check)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest
import torch

from minimoe.cli import main
from minimoe.config import PRESETS, ModelConfig
from minimoe.bench.flops_check import fvcore_analysis, fvcore_check
from minimoe.flops import flop_unit, flops_per_token

# Published shapes (Llama 2, Touvron et al. 2023, Table 1 / its config.json; Mixtral-8x7B's
# config.json): untied, no QKV bias.
LLAMA2_7B = ModelConfig(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ffn=11008,
                        qkv_bias=False, vocab_size=32000, max_seq_len=4096)
MIXTRAL_8X7B = ModelConfig(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ffn=14336,
                           qkv_bias=False, vocab_size=32000, max_seq_len=4096,
                           n_experts=8, top_k=2)


def megatron_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Megatron-LM's `num_floating_point_operations` / tokens (megatron/training/training.py,
    2025), written independently of flops.py, term for term as Megatron writes it: factor 6 on
    every GEMM, SwiGLU factor 3, causal-halved attention core, no router, no embedding."""
    h, L, hd = cfg.d_model, cfg.n_layers, cfg.head_dim
    q, kv = hd * cfg.n_heads, hd * cfg.n_kv_heads
    n_moe = cfg.n_moe_layers
    mlp = 3 * cfg.d_ffn * (L - n_moe) + 3 * cfg.expert_d_ffn * cfg.top_k * n_moe \
        + 3 * cfg.shared_d_ffn * n_moe
    attn_linear = 6 * (h * (q + kv + kv) + q * h)
    attn_core = 6 * q / 2 * 2  # per unit of seq_len: "/2 causal mask", "*2 QK^T and (QK^T)V"
    return 6 * h * mlp + attn_linear * L + 6 * h * cfg.vocab_size + seq_len * attn_core * L


@pytest.mark.parametrize("cfg, gflop", [(LLAMA2_7B, 42.9), (MIXTRAL_8X7B, 79.7)])
def test_published_per_token_values(cfg, gflop):
    # Megatron-LM counts no router and no embedding, and halves the attention core
    count = flops_per_token(cfg, 4096, attention="causal", include_router=False)
    assert count.model / 1e9 == pytest.approx(gflop, rel=0.005)
    assert count.model == pytest.approx(megatron_flops_per_token(cfg, 4096), rel=1e-12)


def test_mixtral_six_n_and_full_attention():
    count = flops_per_token(MIXTRAL_8X7B, 4096, include_router=False)
    # N_active = 12.88B ("13B active parameters", Jiang et al. 2024, Mixtral of Experts)
    assert count.six_n_active / 1e9 == pytest.approx(77.3, rel=0.005)
    full = flops_per_token(MIXTRAL_8X7B, 4096, attention="full", include_router=False)
    # full minus causal = one more causal attention core, fwd + bwd
    assert full.model - count.model == pytest.approx(3 * count.attention_core_causal)
    assert full.attention == "full" and count.attention == "causal"


def test_router_is_2_d_E_per_moe_layer():
    cfg = PRESETS["toy-moe"]
    with_router = flops_per_token(cfg, 128).forward
    without = flops_per_token(cfg, 128, include_router=False).forward
    assert with_router - without == 2 * cfg.d_model * cfg.n_experts * cfg.n_moe_layers


def test_recompute_adds_attention_core_or_full_layer_forward():
    cfg = PRESETS["aquila-16b"]
    none = flops_per_token(cfg, 4096)
    selective = flops_per_token(cfg, 4096, recompute="selective")
    full = flops_per_token(cfg, 4096, recompute="full")
    assert none.hardware == none.model == 3 * none.forward
    assert selective.hardware - none.hardware == pytest.approx(none.attention_core_causal)
    lm_head = 2 * cfg.d_model * cfg.vocab_size
    assert full.hardware - none.hardware == pytest.approx(none.forward - lm_head)
    assert full.model == none.model  # recompute never changes model FLOPs (MFU)


def test_rows_params_sum_to_param_counts_and_active():
    for name in ("aquila-16b", "aquilamoe-8x16b", "toy-moe"):
        count = flops_per_token(PRESETS[name], 512)
        assert sum(r.params for r in count.rows) == count.params_total
        assert sum(r.active_params for r in count.rows) == count.params_active
    moe = flops_per_token(PRESETS["aquilamoe-8x16b"], 4096)
    # arXiv 2408.06567 Table 3's shapes: 8 experts of the 16B's MLP, top-2 -> 29.2B active
    assert 29.0e9 < moe.params_active < 29.5e9


def test_capacity_padding_counts_only_in_hardware():
    cfg = PRESETS["toy-moe"].replace(capacity_factor=1.25)
    plain = flops_per_token(cfg, 128)
    padded = flops_per_token(cfg, 128, pad_to_capacity=True)
    experts = next(r.forward for r in plain.rows if r.component == "experts")
    assert padded.model == plain.model
    assert padded.hardware - plain.hardware == pytest.approx(0.25 * 3 * experts)


def test_frame_and_summary():
    count = flops_per_token(PRESETS["aquila-16b"], 4096)
    df = count.to_frame()
    assert df.loc["total", "forward_GFLOP"] == pytest.approx(count.forward / 1e9)
    assert df.loc["embedding", "forward_GFLOP"] == 0
    assert json.loads(json.dumps(count.summary()))["attention"] == "causal"
    with pytest.raises(ValueError, match="recompute='some'"):
        flops_per_token(PRESETS["tiny"], 64, recompute="some")


# --- against counters that run the real model ------------------------------------------------
def test_fvcore_dense_model_matches_exactly():
    from minimoe.model import Transformer

    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    batch, seq = 2, 48
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    analysis = fvcore_analysis(model, idx)
    ours = flops_per_token(cfg, seq)
    assert analysis.total() == ours.forward * batch * seq / 2  # fvcore counts multiply-adds
    by_op = analysis.by_operator()
    core = next(r.forward for r in ours.rows if r.component == "attn_core")
    assert by_op["scaled_dot_product_attention"] == core * batch * seq / 2
    # per module: layer 0's q/k/v/o and MLP
    by_module = analysis.by_module()
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    tokens = batch * seq
    assert by_module["layers.0.attn.k_proj"] == tokens * d * kv
    assert by_module["layers.0.mlp"] == tokens * 3 * d * cfg.d_ffn
    assert by_module["lm_head"] == tokens * d * cfg.vocab_size
    assert by_module["embed"] == 0


def test_torch_flop_counter_backward_is_twice_forward():
    from torch.utils.flop_counter import FlopCounterMode

    from minimoe.model import Transformer

    cfg = PRESETS["tiny"]
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    with FlopCounterMode(display=False) as fwd:
        model(idx)
    with FlopCounterMode(display=False) as both:
        model(idx).sum().backward()
    ours = flops_per_token(cfg, 32)
    core = next(r.forward for r in ours.rows if r.component == "attn_core")
    # torch's CPU flash kernel is counted as 0 (pytorch/pytorch#195460), so compare the GEMMs
    assert fwd.get_total_flops() == (ours.forward - core) * 64
    assert both.get_total_flops() == 3 * fwd.get_total_flops()


def test_fvcore_moe_model_matches_routed_count():
    from minimoe.model import Transformer

    cfg = PRESETS["tiny"].replace(n_experts=4, top_k=2)  # dropless
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    batch, seq = 2, 32
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    analysis = fvcore_analysis(model, idx)
    ours = flops_per_token(cfg, seq)
    tokens = batch * seq
    by_module = analysis.by_module()
    d, E, k = cfg.d_model, cfg.n_experts, cfg.top_k
    for layer in range(cfg.n_layers):
        mlp = f"layers.{layer}.mlp"
        assert by_module[f"{mlp}.router"] == tokens * d * E
        # dropless top-k: the experts see tokens * k rows in all, however routing falls
        assert by_module[mlp] - by_module[f"{mlp}.router"] == tokens * k * 3 * d * cfg.expert_d_ffn
    assert analysis.total() == ours.forward * tokens / 2


def test_fvcore_moe_with_dropping_counts_the_routed_tokens():
    """With a capacity factor the traced shapes hold the tokens actually routed this forward."""
    from minimoe.model import Transformer

    cfg = PRESETS["tiny"].replace(n_experts=4, top_k=2, capacity_factor=0.5)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    by_module = fvcore_analysis(model, idx).by_module()
    tokens, k = idx.numel(), cfg.top_k
    for layer in range(cfg.n_layers):
        moe = model.layers[layer].mlp
        routed = tokens * k - int(moe.dropped_E.sum())  # pairs that reached an expert
        assert routed < tokens * k  # capacity 0.5 must drop some
        expert_macs = by_module[f"layers.{layer}.mlp"] - by_module[f"layers.{layer}.mlp.router"]
        assert expert_macs == routed * 3 * cfg.d_model * cfg.expert_d_ffn


# --- the command: units and the fvcore cross-check -------------------------------------------
def test_unit_follows_the_size(capsys):
    assert flop_unit(2.26e6) == ("MFLOP", 1e6) and flop_unit(5.7e10) == ("GFLOP", 1e9)
    assert flop_unit(3e12)[0] == "TFLOP" and flop_unit(0.0)[0] == "FLOP"
    assert main(["flops", "--preset", "toy-small"]) == 0
    out = capsys.readouterr().out
    assert "forward_MFLOP" in out and "GFLOP" not in out
    assert "forward 2.26 MFLOP" in out  # not "0.00 GFLOP"


def test_check_command_agrees_exactly_for_a_toy(capsys):
    assert main(["flops", "--preset", "toy-small", "--check"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert total.split()[-1] == "1.000000", out


def test_check_of_the_paper_moe_follows_the_routing():
    """aquilamoe-8x16b runs as a one-layer, small-vocabulary copy; its expert count must be
    what the router sent (dropless top-2: every token twice), scaled to 40 layers."""
    cfg = PRESETS["aquilamoe-8x16b"]
    check = fvcore_check(cfg, seq_len=32)
    assert check.copy.n_layers == 1 and check.copy.vocab_size < cfg.vocab_size
    assert check.routed_pairs == [check.tokens * cfg.top_k]
    d, F_, E = cfg.d_model, cfg.expert_d_ffn, cfg.n_experts
    per_layer_macs = check.tokens * d * E + check.routed_pairs[0] * 3 * d * F_  # router + experts
    assert check.fvcore["mlp / experts"] == pytest.approx(
        2 * per_layer_macs * cfg.n_layers / check.tokens, rel=1e-12)
    for group in ("attention", "mlp / experts", "lm_head", "total"):
        assert check.ratio(group) == pytest.approx(1.0, rel=1e-12), group


def test_check_counts_only_the_pairs_that_reached_an_expert():
    cfg = PRESETS["tiny"].replace(n_experts=4, top_k=2, capacity_factor=0.5)
    check = fvcore_check(cfg, seq_len=32)
    assert all(routed < check.tokens * cfg.top_k for routed in check.routed_pairs)
    assert check.ratio("mlp / experts") < 1.0 and check.ratio("attention") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="seq_len=4096: must be a positive integer <= max_seq_len"):
        fvcore_check(cfg, seq_len=4096)
