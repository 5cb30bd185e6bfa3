"""The one field checker (minimoe/checks.py): every rule accepts what it says and refuses the rest
with one line naming the field, the value and the rule; every config dataclass uses it."""

import math

import pytest

from minimoe.checks import check, problem
from minimoe.config import ModelConfig
from minimoe.moe import AuxLossConfig
from minimoe.recipes.config import RecipeConfig
from minimoe.sim.hardware import get_device
from minimoe.sim.options import Options
from minimoe.train import TrainConfig


@pytest.mark.parametrize("rule, good, bad, text", [
    ("int>0", [1, 7], [0, -1, 2.0, True, "3"], "must be a positive integer"),
    ("int>=0", [0, 5], [-1, 0.5, False], "must be a non-negative integer"),
    ("int[1, inf)", [1, 10**9], [0, 1.5], "must be an integer in [1, inf)"),
    (">0", [1e-9, 3, 2.5], [0, -0.1], "must be positive"),
    (">=0", [0, 0.0, 4], [-1e-12], "must be >= 0"),
    ("(0, 1]", [1, 0.5, 1e-6], [0, 1.0001], "must be in (0, 1]"),
    ("[0, 1)", [0, 0.999], [1, -0.1], "must be in [0, 1)"),
    ("", [-3, 0, 2.5], [], "must be a finite number"),
    ("bool", [True, False], [0, 1, "true"], "must be true or false"),
    ("str", ["", "x"], [1, None], "must be a string"),
    (("a", "b"), ["a", "b"], ["c", 1], "must be one of a, b"),
])
def test_each_rule_accepts_what_it_says_and_refuses_the_rest(rule, good, bad, text):
    for value in good:
        assert problem(value, rule) is None, (rule, value)
    for value in bad:
        assert problem(value, rule) == text, (rule, value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1", None, True])
def test_a_number_rule_refuses_what_is_not_a_finite_number(value):
    assert problem(value, ">=0") == "must be a finite number"


def test_the_error_names_owner_field_value_and_rule():
    with pytest.raises(ValueError) as err:
        check("TrainConfig", "lr", -1.0, ">0")
    assert str(err.value) == "TrainConfig.lr=-1.0: must be positive"


@pytest.mark.parametrize("make, message", [
    (lambda: ModelConfig(d_ffn=0), "ModelConfig.d_ffn=0: must be a positive integer"),
    (lambda: ModelConfig(qkv_bias=1), "ModelConfig.qkv_bias=1: must be true or false"),
    (lambda: ModelConfig(norm_eps=math.nan), "ModelConfig.norm_eps=nan: must be a finite number"),
    (lambda: ModelConfig(gate="top1"), "ModelConfig.gate='top1': must be one of softmax-topk"),
    (lambda: ModelConfig(capacity_factor=-1.0), "ModelConfig.capacity_factor=-1.0: must be >= 0"),
    (lambda: TrainConfig(beta2=1.0), "TrainConfig.beta2=1.0: must be in [0, 1)"),
    (lambda: TrainConfig(warmup_steps=-1), "TrainConfig.warmup_steps=-1: must be a non-negative"),
    (lambda: TrainConfig(parallel="zero"), "TrainConfig.parallel='zero': must be one of fsdp, ddp"),
    (lambda: AuxLossConfig(balance=-0.1), "AuxLossConfig.balance=-0.1: must be >= 0"),
    (lambda: AuxLossConfig(max_z_on="logits"), "AuxLossConfig.max_z_on='logits': must be one of"),
    (lambda: RecipeConfig(batch_size=0), "RecipeConfig.batch_size=0: must be a positive integer"),
    (lambda: Options(gemm_efficiency=1.5), "options.gemm_efficiency=1.5: must be in (0, 1]"),
    (lambda: get_device("h100", gpus_per_node=0), "device h100.gpus_per_node=0: must be a positive"),
    (lambda: get_device("a100", inter_node_eff=0.0), "device a100.inter_node_eff=0.0: must be in"),
])
def test_every_config_checks_its_fields_with_the_one_checker(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(message)
