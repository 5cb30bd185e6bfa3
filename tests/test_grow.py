"""Scale-Up (minimoe/grow.py): function preservation, shapes, maps, errors, and streaming."""

import dataclasses
import json
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minimoe import checkpoint as ckpt
from minimoe.config import ModelConfig, get_preset
from minimoe.grow import (depth_map, fpi, grow_checkpoint, grow_model, grow_state_dict, is_new,
                          plan_growth, scale_up)
from minimoe.model import RMSNorm, build_model

EXAMPLES = settings(max_examples=100, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from threads, and on a shared machine a second thread
    waiting for a busy core makes each op ~40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def growths(draw, integer_width=False, deeper=False, kinds=("mha", "gqa")):
    """(source, target) tiny configs. kind: mha (K and V heads grow with the queries), gqa
    (the KV groups stay), pool (fewer KV groups in the target: kv='mean-pool')."""
    kind = draw(st.sampled_from(kinds))
    head_dim = draw(st.sampled_from([2, 4]))
    factor = draw(st.integers(1, 3))
    if kind == "mha":
        heads_s = kv_s = draw(st.integers(1, 3))
        heads_t = kv_t = heads_s * factor if integer_width else draw(st.integers(heads_s, 8))
    else:
        kv_t = draw(st.integers(1, 2))
        kv_s = kv_t * (draw(st.integers(2, 3)) if kind == "pool" else 1)
        heads_s = kv_s * draw(st.integers(1, 2))
        per_group_s = heads_s // kv_t
        per_group_t = per_group_s * factor if integer_width else draw(st.integers(per_group_s, 6))
        heads_t = kv_t * per_group_t
    d_ffn_s = draw(st.integers(1, 12))
    layers_s = draw(st.integers(1, 3))
    common = dict(vocab_size=16, max_seq_len=8, qkv_bias=draw(st.booleans()))
    source = ModelConfig(n_layers=layers_s, d_model=heads_s * head_dim, n_heads=heads_s,
                         n_kv_heads=kv_s, d_ffn=d_ffn_s, **common)
    layers_t = draw(st.integers(layers_s, 2 * layers_s + 1)) if deeper else layers_s
    d_ffn_t = draw(st.integers(d_ffn_s, 2 * d_ffn_s + 3))
    target = ModelConfig(n_layers=layers_t, d_model=heads_t * head_dim, n_heads=heads_t,
                         n_kv_heads=kv_t, d_ffn=d_ffn_t, **common)
    return source, target


def random_model(cfg: ModelConfig, seed: int):
    """Every weight random (biases and norm weights too), float64 so 1e-5 is a strict bound."""
    torch.manual_seed(seed)
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.3)
    return model


def tokens(cfg, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=generator)


def balanced_random_map(n_source, n_target, seed):
    """A random map that copies every source neuron equally often (n_target = k * n_source)."""
    g = torch.Generator().manual_seed(seed)
    extra = n_target // n_source - 1
    copies = [torch.randperm(n_source, generator=g).tolist() for _ in range(extra)]
    return tuple(range(n_source)) + tuple(i for copy in copies for i in copy)


def without_normalisation():
    """RMSNorm without the normalisation: weight * x. What FPI must preserve at any ratio."""
    return mock.patch.object(RMSNorm, "forward", lambda self, x: self.weight * x)


# --- function preservation ----------------------------------------------------------------
@EXAMPLES
@given(growths(integer_width=True), st.sampled_from(["cyclic", "balanced"]), st.integers(0, 99))
def test_fpi_integer_width_keeps_logits(configs, mapping, seed):
    source, target = configs
    model = random_model(source, seed)
    plan = plan_growth(source, target, "fpi", mapping="cyclic" if mapping == "cyclic" else "random",
                       seed=seed)
    if mapping == "balanced":  # random d_ffn and head maps stay unbalanced: no norm reads them
        plan = dataclasses.replace(plan, d_model_map=balanced_random_map(
            source.d_model, target.d_model, seed))
    grown = grow_model(plan, model)
    torch.testing.assert_close(grown(tokens(source)), model(tokens(source)), atol=1e-5, rtol=0)


@EXAMPLES
@given(growths(), st.sampled_from(["cyclic", "random"]), st.integers(0, 99))
def test_fpi_any_width_changes_logits_only_through_rmsnorm(configs, mapping, seed):
    """With RMSNorm's division by the RMS taken out (weights kept), FPI is exact at any ratio
    and any map: the only thing a non-integer ratio changes is the mean over the wider vector."""
    source, target = configs
    model = random_model(source, seed)
    grown = scale_up(model, target, "fpi", mapping=mapping, seed=seed)
    with without_normalisation():
        torch.testing.assert_close(grown(tokens(source)), model(tokens(source)), atol=1e-5, rtol=0)


@EXAMPLES
@given(growths(integer_width=True, deeper=True), st.sampled_from(["fpi", "aki", "aki-pro"]),
       st.integers(0, 99))
def test_identity_depth_keeps_logits(configs, method, seed):
    source, target = configs
    if method != "fpi":  # AKI changes the function through width; isolate depth
        target = target.replace(d_model=source.d_model, n_heads=source.n_heads,
                                n_kv_heads=source.n_kv_heads, d_ffn=source.d_ffn)
    model = random_model(source, seed)
    grown = scale_up(model, target, method, depth="identity")
    torch.testing.assert_close(grown(tokens(source)), model(tokens(source)), atol=1e-5, rtol=0)


# --- shapes, counts, maps -----------------------------------------------------------------
@EXAMPLES
@given(growths(deeper=True, kinds=("mha", "gqa", "pool")),
       st.sampled_from(["fpi", "aki", "aki-pro"]),
       st.sampled_from([None, "stack", "stack-top", "interpolate", "identity"]),
       st.sampled_from(["cyclic", "random"]), st.integers(0, 99))
def test_parameter_count_and_groups_match_target(configs, method, depth, mapping, seed):
    source, target = configs
    plan = plan_growth(source, target, method, depth, mapping, seed, kv="mean-pool")
    state = grow_state_dict(plan, random_model(source, seed).state_dict())
    assert sum(t.numel() for t in state.values()) == target.param_counts()["total"]
    total = target.param_counts()["total"]
    assert grow_model(plan, random_model(source, seed)).num_params() == total
    # a query head copies a head of its own KV group (AKI-Pro's GQA rule)
    per_group_s = source.n_heads // target.n_kv_heads
    per_group_t = target.n_heads // target.n_kv_heads
    mha = source.n_kv_heads == source.n_heads and target.n_kv_heads == target.n_heads
    for h, src in enumerate(plan.head_map):
        if mha:
            assert plan.kv_head_map[h] == src  # K and V travel with their query head
        else:
            assert src // per_group_s == h // per_group_t


@EXAMPLES
@given(growths(deeper=True), st.sampled_from(["aki", "aki-pro"]), st.integers(0, 99))
def test_aki_new_neurons_are_not_copies_within_the_layer(configs, method, seed):
    source, target = configs
    model = random_model(source, seed)
    plan = plan_growth(source, target, method, mapping="random", seed=seed)
    grown = grow_model(plan, model)
    state = grown.state_dict()
    maps = {"d_model": plan.d_model_map, "d_ffn": plan.d_ffn_map,
            "heads": [h for h in plan.head_map for _ in range(source.head_dim)]}
    rows = {"attn.q_proj.weight": "heads", "attn.o_proj.weight": "d_model",
            "mlp.gate_proj.weight": "d_ffn", "mlp.up_proj.weight": "d_ffn",
            "mlp.down_proj.weight": "d_model"}
    for layer, src_layer in enumerate(plan.layer_map):
        if src_layer == source.n_layers - 1:
            continue  # the top layer has no layer above: FPI by design
        for rest, dim in rows.items():
            weight = state[f"layers.{layer}.{rest}"]
            new = torch.tensor(is_new(maps[dim]))
            if new.any():
                distance = torch.cdist(weight[new], weight[~new], p=float("inf"))
                assert distance.min() > 0, f"layer {layer} {rest}: a new neuron is a copy"


def test_aki_takes_new_neurons_from_the_layer_above():
    """AquilaMoE eq. 2 on an MLP: FPI(W1) = [w1; w2; w3; w1], AKI(W1) = [w1; w2; w3; w(2)_1]."""
    source = get_preset("tiny").replace(n_layers=2, d_ffn=3)
    model = random_model(source, 0)
    grown = scale_up(model, source.replace(d_ffn=4), "aki")  # d_model unchanged: no division
    up = [model.layers[i].mlp.up_proj.weight for i in range(2)]
    torch.testing.assert_close(grown.layers[0].mlp.up_proj.weight, torch.cat([up[0], up[1][:1]]))
    # the top layer has no layer above and copies within itself (FPI)
    torch.testing.assert_close(grown.layers[1].mlp.up_proj.weight, torch.cat([up[1], up[1][:1]]))


@EXAMPLES
@given(growths(deeper=True), st.integers(0, 10**6), st.integers(0, 10**6))
def test_random_mapping_is_reproducible(configs, seed, other_seed):
    source, target = configs
    assert plan_growth(source, target, mapping="random", seed=seed) == \
        plan_growth(source, target, mapping="random", seed=seed)
    big_s, big_t = get_preset("tiny"), get_preset("tiny").replace(d_model=256, n_heads=16)
    if seed != other_seed:  # 192 new features, 64 choices each: a collision is impossible
        assert plan_growth(big_s, big_t, mapping="random", seed=seed).d_model_map != \
            plan_growth(big_s, big_t, mapping="random", seed=other_seed).d_model_map


def test_mean_pool_averages_consecutive_kv_heads():
    source = get_preset("tiny").replace(n_heads=4, n_kv_heads=4)  # MHA 4 heads
    target = source.replace(d_model=128, n_heads=8, n_kv_heads=2)  # 2 groups of 4 heads
    model = random_model(source, 0)
    grown = scale_up(model, target, kv="mean-pool")
    hd = source.head_dim
    k_src = model.layers[0].attn.k_proj.weight.unflatten(0, (4, hd))
    k_new = grown.layers[0].attn.k_proj.weight.unflatten(0, (2, hd))
    # d_model doubled: each column is read twice, so divided by 2
    torch.testing.assert_close(k_new[:, :, :64], k_src.unflatten(0, (2, 2)).mean(1) / 2)
    assert grown.layers[0].attn.k_proj.bias.shape == (2 * hd,)


@pytest.mark.parametrize("n_source, n_target, depth, expected", [
    (3, 6, "stack", [0, 1, 2, 0, 1, 2]),
    (3, 6, "interpolate", [0, 0, 1, 1, 2, 2]),
    (3, 6, "stack-top", [0, 1, 2, 0, 1, 2]),  # a multiple: the same as stack
    # not a multiple: stack restarts at the bottom (AquilaMoE §2.2.1's l mod L1), stack-top
    # appends the top layers (bert2BERT port loader.py set_depth; Apollo stack_meta_layer)
    (24, 32, "stack", list(range(24)) + list(range(8))),
    (24, 32, "stack-top", list(range(24)) + list(range(16, 24))),
    (3, 4, "stack-top", [0, 1, 2, 2]),
    (2, 7, "stack-top", [0, 1, 0, 1, 0, 1, 1]),
    # interpolation (AquilaMoE eq. 3 as Apollo's extend_meta_layer computes it): 24 -> 32
    # duplicates layers 0, 3, ..., 21; 32 -> 40 layers 0, 4, ..., 28
    (24, 32, "interpolate", [l for s in range(24) for l in [s] * (2 if s % 3 == 0 else 1)]),
    (32, 40, "interpolate", [l for s in range(32) for l in [s] * (2 if s % 4 == 0 else 1)]),
])
def test_depth_maps(n_source, n_target, depth, expected):
    assert depth_map(n_source, n_target, depth) == expected


def test_identity_depth_zeroes_the_duplicates_only_and_method_defaults():
    small, large = get_preset("toy-small"), get_preset("toy-large")
    plan = plan_growth(small, large, depth="identity")
    assert plan.layer_map == (0, 0, 1, 2, 2, 3) and plan.zeroed_layers == (1, 4)
    assert plan_growth(small, large, "aki-pro").depth == "interpolate"
    assert plan_growth(small, large, "aki").depth == "stack"
    assert plan_growth(small, large, "fpi").depth == "stack"


def test_scale_up_leaves_the_source_untouched():
    model = random_model(get_preset("tiny"), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown = scale_up(model, get_preset("tiny"))  # same shape: every tensor still a copy
    with torch.no_grad():
        for p in grown.parameters():
            p.add_(1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# --- bad input ----------------------------------------------------------------------------
TINY = get_preset("tiny")  # d_model 64, 4 heads, 2 KV heads, d_ffn 176, 2 layers


@pytest.mark.parametrize("target, options, message", [
    (TINY.replace(d_model=32, n_heads=2, n_kv_heads=2), {},
     r"target.d_model=32: must be >= source d_model=64"),
    (TINY.replace(n_layers=1), {}, r"target.n_layers=1: must be >= source n_layers=2"),
    (TINY.replace(d_ffn=100), {}, r"target.d_ffn=100: must be >= source d_ffn=176"),
    (TINY.replace(d_model=128), {}, r"target.head_dim=32"),
    (TINY.replace(n_kv_heads=4), {},
     r"target.n_kv_heads=4: must equal source n_kv_heads=2.*mean-pool"),
    (TINY.replace(n_kv_heads=4), {"kv": "mean-pool"}, r"target.n_kv_heads=4: kv='mean-pool' needs"),
    (TINY.replace(vocab_size=1000), {}, r"target.vocab_size=1000"),
    # another eps changes every RMSNorm, so FPI would not keep the function: refused
    (TINY.replace(norm_eps=1e-6), {}, r"target.norm_eps=1e-06: must equal source norm_eps=1e-05"),
    (TINY.replace(n_experts=4), {}, r"target.n_experts=4"),
    (TINY, {"method": "net2net"}, r"method='net2net': must be one of fpi, aki, aki-pro"),
    (TINY, {"depth": "random"}, r"depth='random': must be one of stack, stack-top, interpolate"),
    (TINY, {"mapping": "zigzag"}, r"mapping='zigzag'"),
    (TINY, {"kv": "drop"}, r"kv='drop'"),
])
def test_bad_requests_name_the_field(target, options, message):
    with pytest.raises(ValueError, match=message):
        plan_growth(TINY, target, **options)


# --- streaming ----------------------------------------------------------------------------
@pytest.mark.parametrize("source_kv_heads, dtype, options", [
    (2, torch.bfloat16, dict(method="aki-pro", mapping="random", seed=3)),
    (4, torch.float32, dict(method="aki", depth="identity", kv="mean-pool")),
])
def test_streamed_checkpoint_equals_in_memory_growth(tmp_path, source_kv_heads, dtype, options):
    source = get_preset("tiny").replace(n_layers=3, n_heads=4, n_kv_heads=source_kv_heads)
    target = source.replace(n_layers=5, d_model=96, n_heads=6, n_kv_heads=2, d_ffn=200)
    state = {k: v.to(dtype) for k, v in random_model(source, 0).state_dict().items()}
    save_file(state, tmp_path / "src.safetensors")
    plan, written = grow_checkpoint(tmp_path / "src.safetensors", source, target,
                                    tmp_path / "out.safetensors", **options)
    streamed = load_file(tmp_path / "out.safetensors")
    expected = grow_state_dict(plan, state)
    assert list(streamed) == list(expected)
    for name in expected:
        assert streamed[name].dtype == dtype and torch.equal(streamed[name], expected[name]), name
    assert written == (tmp_path / "out.safetensors").stat().st_size
    assert not list(tmp_path.glob("*.partial"))


# --- Table 2 at toy scale: how much does a non-integer ratio cost? ------------------------
def _trained_model(cfg, steps=80):
    """A tiny model that has learnt a noisy bigram language (so its loss means something)."""
    torch.manual_seed(0)
    successor = torch.randperm(cfg.vocab_size)

    def batch():
        x = torch.empty(16, cfg.max_seq_len, dtype=torch.long)
        x[:, 0] = torch.randint(0, cfg.vocab_size, (16,))
        for t in range(1, cfg.max_seq_len):
            noise = torch.randint(0, cfg.vocab_size, (16,))
            x[:, t] = torch.where(torch.rand(16) < 0.8, successor[x[:, t - 1]], noise)
        return x

    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = batch()
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), torch.stack([batch() for _ in range(8)]).flatten(0, 1)


def test_fpi_non_integer_ratio_costs_a_little_loss():
    """AquilaMoE Table 2: x2 width keeps the loss exactly, x1.25 raises it a little (1.85 -> 1.96)."""
    source = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4,
                         d_ffn=64, max_seq_len=32)  # multi-head, so 4 -> 5 heads is allowed
    model, data = _trained_model(source)

    def loss(m):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(
                m(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).item()

    original = loss(model)
    times2 = loss(scale_up(model, source.replace(d_model=64, n_heads=8, n_kv_heads=8)))
    times125 = loss(scale_up(model, source.replace(d_model=40, n_heads=5, n_kv_heads=5)))
    assert abs(times2 - original) < 1e-5
    assert times125 != original and abs(times125 - original) < 0.25


# --- the command --------------------------------------------------------------------------
def _source_run(tmp_path, preset):
    model = random_model(get_preset(preset), 0).float()
    ckpt.save_model(tmp_path / "src", model, {"stage": "pretrain"})  # no data spec: no val loss
    return model


def test_cli_scale_up_writes_the_grown_run_and_report(tmp_path):
    from minimoe.cli import main  # here, so the library tests above do not need the CLI

    model = _source_run(tmp_path, "tiny")
    rc = main(["scale-up", "--from", str(tmp_path / "src"), "--to", "tiny-large", "--method", "fpi",
               "--depth", "identity", "--out", str(tmp_path / "big")])
    assert rc == 0
    grown, meta = ckpt.load_model(tmp_path / "big")
    assert grown.cfg == get_preset("tiny-large") and meta["stage"] == "scale-up"
    x = tokens(get_preset("tiny"))
    torch.testing.assert_close(grown(x), model(x), atol=1e-4, rtol=0)  # x2 width, identity depth
    report = json.loads((tmp_path / "big" / "transform.json").read_text())["growth"]
    assert report["target_params"] == get_preset("tiny-large").param_counts()["total"]
    assert report["layer_map"] == [0, 0, 1] and report["zeroed_layers"] == [1]


def test_cli_bad_target_is_one_line_and_exit_2(tmp_path, capsys):
    from minimoe.cli import main

    _source_run(tmp_path, "tiny-large")
    rc = main(["scale-up", "--from", str(tmp_path / "src"), "--to", "tiny",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "target.n_layers=2: must be >= source n_layers=3" in err


def test_grow_checkpoint_refuses_a_file_of_another_shape(tmp_path):
    save_file(random_model(TINY, 0).float().state_dict(), tmp_path / "src.safetensors")
    other = TINY.replace(d_ffn=100)
    with pytest.raises(ValueError, match=r"gate_proj.weight must have shape \(100, 64\)"):
        grow_checkpoint(tmp_path / "src.safetensors", other, other, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# --- the operators on tensors -------------------------------------------------------------
def test_fpi_operator_is_aquilamoe_eq_1():
    """Input 1 copied into input 3: both columns halved (eq. 7); output 4 copies output 1 (eq. 8)."""
    W = torch.arange(1.0, 7.0).view(3, 2)  # (out 3, in 2)
    U = fpi(W, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 0]), torch.tensor([2.0, 1.0, 2.0]))
    expected = torch.stack([W[:, 0] / 2, W[:, 1], W[:, 0] / 2], dim=1)[[0, 1, 2, 0]]
    torch.testing.assert_close(U, expected)
    assert W[0, 0] == 1.0  # the source is not divided in place


@pytest.mark.parametrize("depth, top_from", [("stack", 0), ("stack-top", 1)])
def test_stacked_third_layer_comes_from_the_bottom_or_the_top(depth, top_from):
    model = random_model(TINY, 0)  # 2 layers -> 3, same width: every layer a plain copy
    grown = scale_up(model, TINY.replace(n_layers=3), "fpi", depth=depth)
    grown_sd, source_sd = grown.state_dict(), model.state_dict()
    for rest in ("attn.q_proj.weight", "mlp.down_proj.weight", "mlp_norm.weight"):
        assert torch.equal(grown_sd[f"layers.2.{rest}"], source_sd[f"layers.{top_from}.{rest}"])
