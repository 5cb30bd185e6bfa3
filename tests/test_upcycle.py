"""Scale-Out: upcycling and splitting preserve the dense function; Mixtral interop both ways."""

import pytest
import torch

from minimoe.config import get_preset
from minimoe.model import build_model
from minimoe.interop import check_format, convert, hf_config, hf_model
from minimoe.upcycle import balanced_kmeans, residual_split, split, taylor_importance, upcycle

TINY = get_preset("tiny")  # d_ffn 176 = 8 x 22


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def _calib(n_batches=4, batch=4, seq=16):
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, TINY.vocab_size, (batch, seq), generator=g),
             torch.randint(0, TINY.vocab_size, (batch, seq), generator=g)) for _ in range(n_batches)]


# --- upcycling -------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["softmax-topk", "topk-softmax"])
@pytest.mark.parametrize("layers", ["all", "every-other"])
def test_upcycled_model_equals_dense_for_every_top_k(dense, idx, gate, layers):
    with torch.no_grad():
        expected = dense(idx)
        for top_k in range(1, 9):
            moe = upcycle(dense, n_experts=8, top_k=top_k, layers=layers, gate=gate).eval()
            torch.testing.assert_close(moe(idx), expected, atol=1e-5, rtol=0)


def test_upcycle_copies_and_counts(dense):
    state_before = {k: v.clone() for k, v in dense.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    moe = upcycle(dense, n_experts=4, top_k=2, layers="every-other", router_noise=True)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # a pure function
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in state_before.items())
    assert moe.cfg.n_experts == 4 and moe.cfg.moe_layer_freq == 2 and moe.cfg.router_noise
    assert moe.num_params() == moe.cfg.param_counts()["total"]
    layer = moe.layers[0].mlp
    for e in range(4):  # every expert an exact copy of the dense MLP
        assert torch.equal(layer.w_gate_EDF[e], dense.layers[0].mlp.gate_proj.weight.T)
        assert torch.equal(layer.w_down_EFD[e], dense.layers[0].mlp.down_proj.weight.T)
    assert torch.equal(moe.layers[1].mlp.up_proj.weight, dense.layers[1].mlp.up_proj.weight)
    assert torch.equal(moe.layers[0].attn.q_proj.bias, dense.layers[0].attn.q_proj.bias)
    assert torch.equal(moe.lm_head.weight, dense.lm_head.weight)


def test_router_seed_and_std(dense):
    wide = build_model(TINY.replace(d_model=256, n_heads=4, n_layers=1))
    std = upcycle(wide, n_experts=8, top_k=2).layers[0].mlp.router.weight
    assert std.std().item() == pytest.approx(0.02, rel=0.1)
    variance = upcycle(wide, n_experts=8, top_k=2, router_init="variance").layers[0].mlp.router.weight
    assert variance.std().item() == pytest.approx(0.02 ** 0.5, rel=0.1)  # the paper read literally
    a, b = (upcycle(dense, 8, 2, seed=s).layers[0].mlp.router.weight for s in (0, 0))
    c = upcycle(dense, 8, 2, seed=1).layers[0].mlp.router.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(layers="odd"), "layers"),
    (dict(shared_d_ffn=16), "shared_d_ffn"),
    (dict(n_experts=0), "n_experts=0: scale-out needs at least one expert"),
    (dict(n_experts=-2), r"ModelConfig.n_experts=-2: must be a non-negative integer"),  # one place
    (dict(n_experts=2.0), r"ModelConfig.n_experts=2.0: must be a non-negative integer"),
])
def test_upcycle_refuses_bad_input(dense, kwargs, match):
    with pytest.raises(ValueError, match=match):
        upcycle(dense, **kwargs)


def test_already_moe_is_refused(dense):
    moe = upcycle(dense, 4, 2)
    with pytest.raises(ValueError, match="already an MoE"):
        upcycle(moe, 4, 2)
    with pytest.raises(ValueError, match="already an MoE"):
        split(moe, 4, 2)


# --- LLaMA-MoE splitting ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["random", "cluster"])
def test_split_with_all_experts_uniform_gates_and_scale_n_equals_dense(dense, idx, method):
    moe = split(dense, n_experts=8, top_k=8, method=method, scale=8.0).eval()
    assert moe.cfg.expert_d_ffn == 22
    assert moe.num_params() == dense.num_params() + moe.cfg.param_counts()["router"]
    with torch.no_grad():
        for block in moe.layers:
            block.mlp.router.weight.zero_()  # softmax over 8 equal logits: every weight 1/8
        torch.testing.assert_close(moe(idx), dense(idx), atol=1e-5, rtol=0)


def test_split_defaults_and_partition(dense):
    moe = split(dense, n_experts=4, top_k=2, method="random")
    assert moe.cfg.expert_scale == 2.0  # LLaMA-MoE's N / k
    assert moe.cfg.gate == "softmax-topk"
    # every dense neuron in exactly one expert: the experts' up rows are a permutation of it
    up_rows = moe.layers[0].mlp.w_up_EDF.transpose(1, 2).reshape(-1, TINY.d_model)
    dense_rows = dense.layers[0].mlp.up_proj.weight
    assert torch.equal(up_rows.sort(0).values, dense_rows.sort(0).values)


def test_balanced_kmeans_finds_separated_equal_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    points = (centres.repeat_interleave(6, 0) + torch.randn(24, 4, generator=g) * 0.1)
    labels = balanced_kmeans(points, 4, generator=g)
    assert torch.bincount(labels).tolist() == [6, 6, 6, 6]
    for group in labels.view(4, 6):  # points of one true cluster share one label
        assert len(set(group.tolist())) == 1
    uneven = balanced_kmeans(points[:23], 4, generator=g)
    assert sorted(torch.bincount(uneven).tolist()) == [5, 6, 6, 6]


def test_taylor_importance_is_zero_for_dead_neurons(dense):
    model = build_model(TINY)
    model.load_state_dict(dense.state_dict())
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[:, 3] = 0  # dL/dh_3 = 0
        model.layers[1].mlp.gate_proj.weight[5] = 0  # h_5 = silu(0) * up = 0
    scores = taylor_importance(model, _calib(n_batches=2), [0, 1])
    assert scores[0].shape == (TINY.d_ffn,)
    assert scores[0][3] == 0 and scores[1][5] == 0
    assert (scores[0] > 0).sum() == TINY.d_ffn - 1
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


def test_residual_split_moves_the_most_shared_neurons():
    scores_CN = torch.rand(3, 12, generator=torch.Generator().manual_seed(0))
    scores_CN[:, 7] = 5.0  # every expert's favourite
    scores_CN[:2, 2] = 4.0  # two experts' next favourite
    shared, experts = residual_split(scores_CN, expert_d_ffn=3, shared_d_ffn=2)
    assert shared.tolist() == [2, 7]
    for e, neurons in enumerate(experts):
        assert len(neurons) == 3 and not set(neurons.tolist()) & {2, 7}
        assert set(neurons.tolist()) == set(scores_CN[e].masked_fill(
            torch.isin(torch.arange(12), shared), -1).topk(3).indices.tolist())


@pytest.mark.parametrize("method", ["importance", "importance-shared"])
def test_split_by_importance(dense, idx, method):
    moe = split(dense, n_experts=8, top_k=2, method=method, calib=_calib())
    assert moe.num_params() == moe.cfg.param_counts()["total"]
    assert moe.cfg.shared_d_ffn == (22 if method == "importance-shared" else 0)
    assert torch.isfinite(moe(idx)).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_experts=5, top_k=2), "n_experts=5: must divide"),
    (dict(n_experts=-4, top_k=2), r"ModelConfig.n_experts=-4: must be a non-negative integer"),
    (dict(n_experts=4, top_k=2, expert_scale=3.0), "expert_scale=3.0: split takes it as scale="),
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(n_experts=4, top_k=2, method="importance"), "calib"),
    (dict(n_experts=4, top_k=2, method="magic"), "method"),
    (dict(n_experts=4, top_k=2, shared_d_ffn=8), "shared_d_ffn"),
    (dict(n_experts=4, top_k=2, method="importance-shared", calib=[], shared_d_ffn=200),
     "shared_d_ffn"),
])
def test_split_refuses_bad_input(dense, kwargs, match):
    with pytest.raises(ValueError, match=match):
        split(dense, **kwargs)


# --- Hugging Face Mixtral --------------------------------------------------------------------------
@pytest.mark.parametrize("make", ["upcycle", "split"])
def test_mixtral_logits_equal_ours_both_ways(dense, idx, make):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if make == "upcycle":  # LLaMA-MoE's gate: the same weights as Mixtral's, in another order
        moe = upcycle(dense, n_experts=4, top_k=2, router_std=0.5, gate="topk-softmax")
        with torch.no_grad():  # the experts differ, as after training, so a swap would show
            for block in moe.layers:
                block.mlp.w_up_EDF.add_(torch.randn_like(block.mlp.w_up_EDF) * 0.02)
                for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                    proj.bias.zero_()  # Mixtral has no attention biases
    else:  # qkv_bias=False and expert_scale 2 (folded into Mixtral's down_proj). Experts of
        # 44 neurons: transformers' CPU grouped_mm fails on rows that are not 16-byte multiples
        nobias = build_model(TINY.replace(qkv_bias=False))
        moe = split(nobias, n_experts=4, top_k=2, router_std=0.5)
    moe.eval()
    hf = hf_model(moe, "mixtral").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, moe(idx), atol=1e-5, rtol=0)
        # and back: a Mixtral with its own random weights, imported into ours
        other = transformers.MixtralForCausalLM(hf_config(moe.cfg, "mixtral")).eval()
        ours = build_model(moe.cfg).eval()
        ours.load_state_dict(convert(other.state_dict(), moe.cfg, "mixtral", to_hf=False), strict=True)
        torch.testing.assert_close(ours(idx), other(idx).logits, atol=1e-5, rtol=0)


def test_mixtral_state_dict_names_and_shapes(dense):
    moe = upcycle(dense, n_experts=4, top_k=2)
    for block in moe.layers:
        for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
            proj.bias.data.zero_()
    hf_sd = convert(moe.state_dict(), moe.cfg, "mixtral", to_hf=True)
    F_, D = TINY.d_ffn, TINY.d_model
    assert hf_sd["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 2 * F_, D)
    assert hf_sd["model.layers.1.mlp.experts.down_proj"].shape == (4, D, F_)
    assert hf_sd["model.layers.1.mlp.gate.weight"].shape == (4, D)
    assert not any(k.endswith("q_proj.bias") for k in hf_sd)
    moe.layers[0].attn.q_proj.bias.data.fill_(0.1)
    with pytest.raises(ValueError, match="q_proj.bias: nonzero, and mixtral has no such tensor"):
        convert(moe.state_dict(), moe.cfg, "mixtral", to_hf=True)


@pytest.mark.parametrize("kwargs, field, formats", [
    (dict(layers="every-other"), "moe_layer_freq", ["mixtral"]),  # Qwen2-MoE holds dense layers
    (dict(capacity_factor=1.25), "capacity_factor", ["mixtral", "qwen2_moe"]),
    (dict(router_noise=True), "router_noise", ["mixtral", "qwen2_moe"]),
])
def test_mixtral_refuses_what_it_cannot_express(dense, kwargs, field, formats):
    moe = upcycle(dense, n_experts=4, top_k=2, **kwargs)
    for fmt in formats:
        with pytest.raises(ValueError, match=field):
            check_format(moe.cfg, fmt)
    shared = split(dense, 4, 2, method="importance-shared", calib=_calib(n_batches=1))
    for fmt in ("mixtral", "qwen2_moe"):
        with pytest.raises(ValueError, match="shared_d_ffn"):
            hf_config(shared.cfg, fmt)


# --- the scale-out command ----------------------------------------------------------------------
def test_scale_out_command(dense, idx, tmp_path, capsys):
    from minimoe import checkpoint as ckpt
    from minimoe.cli import main

    ckpt.save_model(tmp_path / "dense", dense, {"stage": "pretrain"})
    args = ["scale-out", "--from", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2"]
    assert main(args + ["--method", "upcycle", "--out", str(tmp_path / "moe")]) == 0
    moe, meta = ckpt.load_model(tmp_path / "moe")
    assert moe.cfg.n_experts == 4 and meta["method"] == "upcycle"
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(idx), dense(idx), atol=1e-5, rtol=0)
    assert main(args + ["--method", "split-cluster", "--out", str(tmp_path / "split")]) == 0
    assert ckpt.load_model(tmp_path / "split")[0].cfg.expert_d_ffn == TINY.d_ffn // 4
    capsys.readouterr()

    bad = [
        (["--top-k", "5"], "top_k"),  # more than --experts 4
        (["--method", "split-random", "--experts", "5"], "must divide"),
        (["--from", str(tmp_path / "moe")], "already an MoE"),
        (["--method", "split-importance"], "no data"),
        (["--scale", "2"], "--scale"),
        (["--method", "split-random", "--out", str(tmp_path / "moe")], "already holds"),
    ]
    for extra, message in bad:
        out = ["--out", str(tmp_path / "never")] if "--out" not in extra else []
        assert main(args + extra + out) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_scale_out_reaches_llama_moe_gate_noise_and_capacity(tiny_run, tmp_path):
    """The method's options are reachable from the command, in memory and streamed alike, and
    the noisy gate's weights (zero at init) travel in the file."""
    from minimoe import checkpoint as ckpt
    from minimoe.cli import main

    for stream in ([], ["--stream"]):
        out = tmp_path / f"moe{len(stream)}"
        assert main(["scale-out", "--from", str(tiny_run), "--experts", "4", "--top-k", "2",
                     "--gate", "topk-softmax", "--router-noise", "--capacity-factor", "1.25",
                     "--out", str(out), *stream]) == 0
        model, _ = ckpt.load_model(out)
        assert (model.cfg.gate, model.cfg.router_noise, model.cfg.capacity_factor) == (
            "topk-softmax", True, 1.25)
        assert not model.layers[0].mlp.router_noise.weight.any()
