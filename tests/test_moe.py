"""The MoE layer: dispatch against a plain loop, routing options, auxiliary losses, Mixtral."""

import math

import pytest
import torch
import torch.nn.functional as F

import minimoe.moe as moe_module
from minimoe.config import get_preset
from minimoe.model import build_model
from minimoe.moe import (AuxLossConfig, MoE, aux_losses, expert_load, max_z_loss,
                         router_init_std)

TINY_MOE = get_preset("tiny").replace(n_experts=4, top_k=2)


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The plain version: every token, each of its k experts, one at a time; an expert that
    has taken `capacity` pairs (in token order) takes no more."""
    B, T, D = x.shape
    x_TD = x.reshape(-1, D)
    routing = moe.route(x_TD)
    capacity = moe.capacity(len(x_TD)) if moe.cfg.capacity_factor > 0 else math.inf
    taken = [0] * moe.n_experts
    rows = []
    for t in range(len(x_TD)):
        y_D = torch.zeros(D)
        for slot in range(moe.top_k):
            e = int(routing.idx_TK[t, slot])
            if taken[e] >= capacity:
                continue
            taken[e] += 1
            h_F = F.silu(x_TD[t] @ moe.w_gate_EDF[e]) * (x_TD[t] @ moe.w_up_EDF[e])
            y_D = y_D + routing.weight_TK[t, slot] * moe.cfg.expert_scale * (h_F @ moe.w_down_EFD[e])
        rows.append(y_D)
    out_TD = torch.stack(rows)
    if moe.shared is not None:
        out_TD = out_TD + moe.shared(x_TD)
    return out_TD.view(B, T, D)


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """Counts the calls of F.grouped_mm, so a test can say which path ran."""
    calls = []
    if hasattr(F, "grouped_mm"):
        real = F.grouped_mm
        monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _outputs_and_grads(moe, x, forward):
    moe.zero_grad()
    x = x.clone().requires_grad_()
    out = forward(moe, x)
    out.square().sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()]


@pytest.mark.parametrize("path", ["grouped_mm", "expert_loop"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(gate="topk-softmax", expert_scale=2.0),
    dict(capacity_factor=0.5),
    dict(shared_d_ffn=32, top_k=3),
    dict(top_k=4, expert_d_ffn=22),  # widths that grouped_mm cannot take: the loop runs
])
def test_fast_dispatch_equals_plain_loop(path, options, monkeypatch, grouped_mm_calls):
    if path == "expert_loop":
        monkeypatch.setattr(moe_module, "GROUPED_MM", False)
    torch.manual_seed(0)
    moe = MoE(TINY_MOE.replace(**{"expert_d_ffn": 32, **options}))
    moe.router.weight.data.normal_(0, 0.5)  # decisive routing, so both see the same choice
    x = torch.randn(2, 12, TINY_MOE.d_model)
    fast = _outputs_and_grads(moe, x, lambda m, x: m(x))
    aligned = moe.cfg.expert_d_ffn % 4 == 0  # 16 bytes of float32
    assert bool(grouped_mm_calls) == (path == "grouped_mm" and aligned and hasattr(F, "grouped_mm"))
    plain = _outputs_and_grads(moe, x, reference_moe)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_grouped_mm_path_is_taken_where_it_can_be():
    moe = MoE(TINY_MOE.replace(expert_d_ffn=32))
    x_SD = torch.randn(5, TINY_MOE.d_model)
    assert moe_module._grouped_mm_usable(x_SD, moe.w_gate_EDF) == hasattr(F, "grouped_mm")
    odd = MoE(TINY_MOE.replace(expert_d_ffn=22))  # 22 floats = 88 bytes: not 16-byte aligned
    assert not moe_module._grouped_mm_usable(x_SD, odd.w_gate_EDF)
    # the CPU kernel takes float32, bf16 and fp16 only; float64 raises inside it
    assert not moe_module._grouped_mm_usable(x_SD.double(), moe.w_gate_EDF.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_forward_in_any_float_dtype_equals_plain_loop(dtype):
    """float64 used to reach grouped_mm, which raised "Expected mat_a to be Float32, ..."."""
    torch.manual_seed(0)
    moe = MoE(TINY_MOE.replace(expert_d_ffn=32)).to(dtype)
    moe.router.weight.data.normal_(0, 0.5)
    x = torch.randn(2, 12, TINY_MOE.d_model, dtype=dtype)
    out = moe(x)
    assert out.dtype == dtype
    expected = reference_moe(moe.double(), x.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("options", [dict(), dict(router_noise=True), dict(shared_d_ffn=48),
                                     dict(n_experts=8, top_k=1, moe_layer_freq=2)])
def test_parameter_count_matches_config(options):
    cfg = TINY_MOE.replace(**options)
    model = build_model(cfg)
    assert model.num_params() == cfg.param_counts()["total"]
    assert expert_load(model).shape == (cfg.n_moe_layers, cfg.n_experts)


def test_router_init_and_noise_weight():
    torch.manual_seed(0)
    moe = MoE(get_preset("tiny").replace(n_experts=8, d_model=256, router_noise=True))
    assert moe.router.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert moe.router_noise.weight.abs().max() == 0  # zero-initialised (LLaMA-MoE)
    assert router_init_std(0.02) == 0.02
    assert router_init_std(0.02, "variance") == pytest.approx(math.sqrt(0.02))
    with pytest.raises(ValueError, match="convention"):
        router_init_std(0.02, "stdev")


def test_noise_only_while_training():
    torch.manual_seed(0)
    moe = MoE(TINY_MOE.replace(router_noise=True))
    x = torch.randn(1, 32, TINY_MOE.d_model)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x))
    moe.train()
    assert not torch.allclose(moe(x), moe(x))  # noise std starts at softplus(0) + 0.01


def test_router_and_noise_receive_gradients():
    torch.manual_seed(0)
    moe = MoE(TINY_MOE.replace(router_noise=True)).train()
    out = moe(torch.randn(2, 8, TINY_MOE.d_model))
    (out.square().mean() + moe.aux["balance"] + moe.aux["cv2"]).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.router_noise.weight.grad.abs().sum() > 0


# --- auxiliary losses under routing we choose -----------------------------------------------
def _stub_moe(n_experts=4, top_k=2, **options):
    """A layer with D = E whose router is c * identity, so token x = onehot(e) goes to e."""
    cfg = get_preset("tiny").replace(d_model=n_experts, n_heads=1, n_kv_heads=1,
                                     n_experts=n_experts, top_k=top_k, expert_d_ffn=8, **options)
    moe = MoE(cfg)
    moe.router.weight.data = 4.0 * torch.eye(n_experts)
    return moe


def _cyclic_tokens(n_experts, n_tokens):
    """Token t prefers expert t mod E, then t+1 mod E: every expert equally loaded."""
    first = torch.arange(n_tokens) % n_experts
    return (F.one_hot(first, n_experts) + 0.5 * F.one_hot((first + 1) % n_experts, n_experts)).float()


def test_aux_losses_at_perfect_balance():
    E, T = 4, 16
    moe = _stub_moe(E)
    moe(_cyclic_tokens(E, T)[None])
    assert moe.load_E.tolist() == [T * 2 // E] * E
    assert moe.aux["balance"].item() == pytest.approx(1.0)  # E/(T k) sum_e P_e count_e
    assert moe.aux["cv2"].item() == pytest.approx(0.0, abs=1e-6)
    lse = math.log(math.exp(4.0) + math.exp(2.0) + (E - 2))  # logits (4, 2, 0, 0) per token
    assert moe.aux["z"].item() == pytest.approx(lse ** 2, rel=1e-5)
    assert moe.aux["max_z"].item() == pytest.approx(16.0)  # max logit 4, squared


def test_aux_losses_grow_with_imbalance():
    E, T = 4, 16
    moe = _stub_moe(E)
    moe(_cyclic_tokens(E, T)[None])
    balanced = {k: v.item() for k, v in moe.aux.items()}
    skewed = _cyclic_tokens(E, T)
    skewed[: T // 2] = _cyclic_tokens(E, 1)  # half the tokens all prefer expert 0, then 1
    moe(skewed[None])
    assert moe.aux["balance"].item() > balanced["balance"] + 0.1
    assert moe.aux["cv2"].item() > balanced["cv2"] + 0.1


def test_capacity_drops_and_counts_pairs():
    E, T = 4, 16
    moe = _stub_moe(E, capacity_factor=1.0)
    x = _cyclic_tokens(E, 1).repeat(T, 1)[None]  # every token -> experts 0 and 1
    out = moe(x)
    capacity = math.ceil(1.0 * T * 2 / E)  # 8 pairs per expert
    assert moe.capacity(T) == capacity
    assert moe.load_E.tolist() == [T, T, 0, 0]
    assert moe.dropped_E.tolist() == [T - capacity, T - capacity, 0, 0]
    assert out[0, capacity:].abs().max() == 0  # tokens after the first 8 got no expert
    assert out[0, :capacity].abs().max() > 0
    torch.testing.assert_close(out, reference_moe(moe, x))


def test_dropless_by_default():
    moe = _stub_moe(4)
    moe(_cyclic_tokens(4, 1).repeat(16, 1)[None])
    assert moe.dropped_E.sum() == 0


def test_model_level_aux_losses_and_total():
    torch.manual_seed(0)
    cfg = TINY_MOE.replace(n_layers=3)  # 3 MoE layers
    model = build_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(idx)
    raw = aux_losses(model)
    per_layer = [m.aux for m in moe_module.moe_layers(model)]
    assert set(raw) == {"balance", "z", "max_z", "cv2"}
    torch.testing.assert_close(raw["balance"], sum(a["balance"] for a in per_layer))  # a sum
    assert expert_load(model).sum(1).tolist() == [32 * cfg.top_k] * 3
    assert sum(m.dropped_E.sum() for m in moe_module.moe_layers(model)) == 0

    loss, parts = AuxLossConfig().total(model, logits)  # AquilaMoE: 0.001 balance, 0.01 max-z
    torch.testing.assert_close(loss, 0.001 * raw["balance"] + 0.01 * raw["max_z"])
    loss, parts = AuxLossConfig(balance=0, max_z=0.5, max_z_on="lm_head").total(model, logits)
    torch.testing.assert_close(loss, 0.5 * max_z_loss(logits))
    assert float(parts["max_z"]) == pytest.approx(logits.amax(-1).square().mean().item())
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="max_z_on"):
        AuxLossConfig(max_z_on="both")
    with pytest.raises(ValueError, match="logits"):
        AuxLossConfig(max_z_on="lm_head").total(model)


def test_bf16_autocast_runs_the_loop_and_stays_close(grouped_mm_calls):
    """grouped_mm knows no autocast, so under autocast the per-expert loop must run."""
    torch.manual_seed(0)
    model = build_model(TINY_MOE.replace(expert_d_ffn=32))
    idx = torch.randint(0, TINY_MOE.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    logits.float().square().mean().backward()
    assert not grouped_mm_calls
    torch.testing.assert_close(logits.float(), model(idx), atol=0.05, rtol=0.05)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without grouped_mm")
def test_bf16_grouped_mm_equals_the_loop(monkeypatch, grouped_mm_calls):
    """bf16 weights without autocast: the grouped_mm path runs, and agrees with the loop."""
    torch.manual_seed(0)
    moe = MoE(TINY_MOE.replace(expert_d_ffn=32)).to(torch.bfloat16)
    moe.router.weight.data.normal_(0, 0.5)
    x = torch.randn(2, 16, TINY_MOE.d_model, dtype=torch.bfloat16)
    fast = _outputs_and_grads(moe, x, lambda m, x: m(x))
    assert grouped_mm_calls, "the grouped_mm path did not run"
    monkeypatch.setattr(moe_module, "GROUPED_MM", False)
    loop = _outputs_and_grads(moe, x, lambda m, x: m(x))
    for a, b in zip(fast, loop):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_dense_model_has_no_aux_losses():
    model = build_model(get_preset("tiny"))
    logits = model(torch.zeros(1, 4, dtype=torch.long))
    loss, parts = AuxLossConfig().total(model, logits)
    assert loss.item() == 0 and parts == {}
    assert expert_load(model).shape == (0, 0)


# --- Hugging Face Mixtral ----------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_equals_transformers_mixtral_sparse_block(implementation):
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from minimoe.interop import hf_config

    torch.manual_seed(0)
    cfg = TINY_MOE.replace(n_experts=8, expert_d_ffn=32)
    ours = MoE(cfg).eval()
    ours.router.weight.data.normal_(0, 0.5)
    hf_cfg = hf_config(cfg, "mixtral")
    hf_cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(hf_cfg).eval()
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ours.w_gate_EDF, ours.w_up_EDF], 2).transpose(1, 2))
        block.experts.down_proj.copy_(ours.w_down_EFD.transpose(1, 2))
        x = torch.randn(2, 16, cfg.d_model)
        torch.testing.assert_close(ours(x), block(x), atol=1e-5, rtol=0)


def test_grouped_mm_runs_on_cuda_for_bf16_on_sm80_and_newer(monkeypatch):
    """On a GPU torch's grouped matmul takes bf16 on sm80+ (its docstring): there the MoE uses
    it, elsewhere the per-expert loop (tensors of a GPU, faked on this CPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x_SD = torch.empty(8, 64, device="cuda", dtype=torch.bfloat16)
        w_EDF = torch.empty(4, 64, 128, device="cuda", dtype=torch.bfloat16)
        for capability, usable in (((9, 0), True), ((8, 0), True), ((7, 5), False)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
            assert moe_module._grouped_mm_usable(x_SD, w_EDF) == usable, capability
        assert not moe_module._grouped_mm_usable(x_SD.float(), w_EDF.float())
