"""ModelConfig validation, presets and analytic parameter counts."""

import pytest

from minimoe.config import PRESETS, ModelConfig, get_preset
from minimoe.model import build_model
from minimoe.tables import param_table


@pytest.mark.parametrize("changes, field", [
    (dict(d_model=130), "d_model"),            # not divisible by n_heads=4
    (dict(n_heads=4, n_kv_heads=3), "n_heads"),  # heads not divisible by kv heads
    (dict(n_layers=0), "n_layers"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(gate="argmax"), "gate"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        ModelConfig(**changes)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="preset='aquila-70b': unknown; choose one of tiny"):
        get_preset("aquila-70b")


def test_from_dict_rejects_unknown_field():
    with pytest.raises(ValueError, match="ModelConfig.hidden_size"):
        ModelConfig.from_dict({"hidden_size": 4})


def test_round_trip_json():
    cfg = get_preset("toy-moe")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_paper_table3_shapes():
    # AquilaMoE Table 3, and the parameter counts derived from it (docs/method.md, "Model shapes")
    c16 = get_preset("aquila-16b")
    assert (c16.n_layers, c16.d_model, c16.d_ffn, c16.n_heads, c16.n_kv_heads) == (40, 5120, 20480, 40, 8)
    assert get_preset("aquila-7b").n_kv_heads == 32 and get_preset("aquila-7b-kv8").n_kv_heads == 8
    assert get_preset("aquila-16b-hf").d_ffn == 17920
    assert round(get_preset("aquila-16b").param_counts()["total"] / 1e9, 2) == 16.66
    moe = get_preset("aquilamoe-8x16b").param_counts()
    assert round(moe["total"] / 1e9, 1) == 104.7 and round(moe["active"] / 1e9, 1) == 29.2
    assert get_preset("tiny").param_counts()["total"] < 1_000_000


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_with_exact_counts(name):
    cfg = get_preset(name)
    model = build_model(cfg, device="meta")
    assert model.num_params() == cfg.param_counts()["total"]
    assert next(model.parameters()).device.type == "meta"


def test_param_table_rows_sum_to_the_total():
    table = param_table(["aquila-7b", "aquilamoe-8x16b"])
    parts = table.drop(columns=["total", "active"]).sum(axis=1)
    assert parts.round(6).tolist() == table["total"].round(6).tolist()
    assert table.loc["aquilamoe-8x16b", "experts"] > 0 and "experts" in table.columns
    assert table.loc["aquila-7b", "active"] == table.loc["aquila-7b", "total"]
