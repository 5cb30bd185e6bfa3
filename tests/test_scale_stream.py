"""Streamed Scale-Up and Scale-Out (`--stream`): safetensors to safetensors one tensor at a
time, for checkpoints bigger than memory. Invariant: the same tensors, bit for bit, as the
in-memory transformation."""

import pytest
import torch

from minimoe import checkpoint as ckpt
from minimoe.cli import main
from minimoe.config import get_preset
from minimoe.model import build_model
from minimoe.upcycle import upcycle, upcycle_checkpoint


@pytest.mark.parametrize("dtype, options", [
    (torch.float32, {}),
    (torch.bfloat16, {"layers": "every-other", "router_noise": True, "router_std": 0.1}),
])
def test_streamed_upcycling_equals_upcycle(tmp_path, dtype, options):
    torch.manual_seed(0)
    dense = build_model(get_preset("tiny").replace(n_layers=3, tie_embeddings=True), dtype=dtype)
    ckpt.save_tensors(tmp_path / "dense.safetensors", ckpt.model_tensors(dense))
    cfg, written = upcycle_checkpoint(tmp_path / "dense.safetensors", dense.cfg,
                                      tmp_path / "moe.safetensors", 4, 2, seed=7, **options)
    expected = ckpt.model_tensors(upcycle(dense, 4, 2, seed=7, **options))
    streamed = ckpt.load_tensors(tmp_path / "moe.safetensors")
    assert cfg == upcycle(dense, 4, 2, seed=7, **options).cfg
    assert sorted(streamed) == sorted(expected)
    for name, tensor in expected.items():
        assert streamed[name].dtype == dtype and torch.equal(streamed[name], tensor), name
    assert written == (tmp_path / "moe.safetensors").stat().st_size


def test_a_misshapen_source_is_named(tmp_path):
    dense = build_model(get_preset("tiny"))
    tensors = ckpt.model_tensors(dense)
    tensors["layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    ckpt.save_tensors(tmp_path / "dense.safetensors", tensors)
    with pytest.raises(ValueError, match=r"layers.1.mlp.up_proj.weight must have shape \(176, 64\)"):
        upcycle_checkpoint(tmp_path / "dense.safetensors", dense.cfg, tmp_path / "moe.safetensors")


def test_streamed_commands_give_the_in_memory_runs(tmp_path):
    torch.manual_seed(0)
    small = build_model(get_preset("tiny"))
    meta = {"stage": "pretrain", "data": None, "init_from": None}
    ckpt.save_model(tmp_path / "small", small, meta)
    for stream in ("", "--stream"):
        up = ["scale-up", "--from", str(tmp_path / "small"), "--to", "tiny-large", "--method",
              "aki-pro", "--out", str(tmp_path / f"large{stream}")]
        assert main(up + ([stream] if stream else [])) == 0
        out = ["scale-out", "--from", str(tmp_path / f"large{stream}"), "--experts", "4",
               "--out", str(tmp_path / f"moe{stream}")]
        assert main(out + ([stream] if stream else [])) == 0
    for name in ("large", "moe"):
        a, _ = ckpt.load_model(tmp_path / name)
        b, _ = ckpt.load_model(tmp_path / f"{name}--stream")
        assert a.cfg == b.cfg
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                      b.state_dict().values())), name
    report = ckpt.read_json(tmp_path / "moe--stream" / "transform.json")
    assert report["streamed"] and report["bytes_written"] > 0 and report["val_after"] is None
    # re-running the same request keeps the result; a different one is refused
    assert main(out + ["--stream"]) == 0
    assert main(out[:-2] + ["--experts", "8", "--out", str(tmp_path / "moe--stream"), "--stream"]) == 2
    split = ["scale-out", "--from", str(tmp_path / "large"), "--experts", "4", "--method",
             "split-random", "--out", str(tmp_path / "z"), "--stream"]
    assert main(split) == 2  # only upcycling streams
