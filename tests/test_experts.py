"""Expert specialisation: the Jensen-Shannon score is 0 for a router blind to the input and 1
for a router that gives each domain experts of its own; `minimoe experts` writes its files."""

import json

import pytest
import torch

from minimoe.cli import main
from minimoe.config import PRESETS
from minimoe.experts import expert_specialisation, js_specialisation, route_counts, token_routes
from minimoe.model import build_model
from minimoe.recipes.stages import data_spec, pretrain
from minimoe.train import TrainConfig

CFG = PRESETS["tiny"].replace(n_layers=1, n_experts=4, top_k=2)


def test_js_score_on_counts():
    assert js_specialisation([[5, 5, 0, 0], [50, 50, 0, 0]]) == 0.0  # same distribution
    assert js_specialisation([[5, 5, 0, 0], [0, 0, 7, 3]]) == pytest.approx(1.0)  # disjoint
    assert 0 < js_specialisation([[6, 4, 0, 0], [4, 6, 0, 0]]) < 0.1
    with pytest.raises(ValueError, match="need at least 2"):
        js_specialisation([[1, 2, 3, 4]])


def _domain_batches():
    """Domain "low" uses the first half of the vocabulary, domain "high" the second."""
    g = torch.Generator().manual_seed(0)
    half = CFG.vocab_size // 2
    return {"low": [torch.randint(0, half, (4, 32), generator=g) for _ in range(2)],
            "high": [torch.randint(half, CFG.vocab_size, (4, 32), generator=g) for _ in range(2)]}


def _model(router_weight):
    """One MoE layer whose attention adds nothing, so the router sees the normed embedding."""
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    half = CFG.vocab_size // 2
    with torch.no_grad():
        model.layers[0].attn.o_proj.weight.zero_()
        direction = torch.zeros(CFG.d_model)
        direction[0] = 1.0
        model.embed.weight[:half] += 5 * direction  # a sign that tells the domains apart
        model.embed.weight[half:] -= 5 * direction
        model.layers[0].mlp.router.weight.copy_(router_weight(direction))
    return model


def test_input_blind_router_scores_zero():
    result = expert_specialisation(_model(lambda v: torch.zeros(CFG.n_experts, CFG.d_model)),
                                   _domain_batches())
    assert result["layers"][0]["js"] == 0.0
    shares = result["layers"][0]["expert_given_domain"]
    assert shares[0] == shares[1]


def test_domain_partitioning_router_scores_one():
    def partition(v):  # experts 0, 1 prefer the "low" sign, experts 2, 3 the "high" one
        return torch.stack([v, v, -v, -v]) * 10
    result = expert_specialisation(_model(partition), _domain_batches(), top=3)
    layer = result["layers"][0]
    assert layer["js"] == pytest.approx(1.0) and result["mean_js"] == pytest.approx(1.0)
    assert layer["expert_given_domain"][0][2:] == [0.0, 0.0]  # "low" never reaches 2, 3
    assert layer["domain_given_expert"][0][:2] == [1.0, 1.0]
    token, count, share = layer["top_tokens"][0][0]
    assert token < CFG.vocab_size // 2 and share == 1.0 and count >= 1


def test_token_routes_give_each_token_the_experts_the_forward_chose():
    def partition(v):  # as above: "low" tokens to experts 0 and 1, "high" ones to 2 and 3
        return torch.stack([v, v, -v, -v]) * 10
    model = _model(partition).train()
    half = CFG.vocab_size // 2
    idx_T = torch.tensor([1, half + 3, 7, half + 9, 2])
    routes = token_routes(model, idx_T)
    assert list(routes) == [0] and model.training  # one MoE layer; training mode given back
    experts_TK, weights_TK = routes[0]
    assert experts_TK.shape == weights_TK.shape == (5, CFG.top_k)
    for token, experts in zip(idx_T.tolist(), experts_TK.tolist()):
        assert set(experts) == ({0, 1} if token < half else {2, 3})
    assert torch.allclose(weights_TK.sum(-1), torch.ones(5))
    # the same choices route_counts counts on the same window
    _, pairs_LDE, _, _ = route_counts(model, {"one": [idx_T[None]]})
    assert torch.equal(pairs_LDE[0, 0], torch.bincount(experts_TK.flatten(), minlength=CFG.n_experts))
    with pytest.raises(ValueError, match="no MoE layer"):
        token_routes(build_model(PRESETS["tiny"]), idx_T)


def test_experts_command_writes_heatmaps_scores_and_top_tokens(tmp_path, capsys):
    tc = TrainConfig(steps=2, batch_size=2, seq_len=32, warmup_steps=1, eval_batches=1)
    pretrain(CFG.replace(n_layers=2), tmp_path / "moe", tc, data_spec(vocab_size=512),
             progress=False)
    assert main(["experts", "--ckpt", str(tmp_path / "moe"), "--batches", "1",
                 "--batch-size", "2", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "layer   0: Jensen-Shannon specialisation" in out and "en-kjv, zh-pd1998" in out
    result = json.loads((tmp_path / "moe" / "experts" / "specialisation.json").read_text())
    assert [layer["layer"] for layer in result["layers"]] == [0, 1]
    assert all(0.0 <= layer["js"] <= 1.0 for layer in result["layers"])
    assert (tmp_path / "moe" / "experts" / "specialisation.png").stat().st_size > 0
    assert "expert 0:" in (tmp_path / "moe" / "experts" / "top_tokens.md").read_text()
    dense = tmp_path / "dense"
    pretrain(PRESETS["tiny"], dense, tc, data_spec(vocab_size=512), progress=False)
    assert main(["experts", "--ckpt", str(dense)]) == 2
    assert "has no MoE layer" in capsys.readouterr().err
