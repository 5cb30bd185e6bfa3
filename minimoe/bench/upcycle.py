"""bench upcycle: Scale-Out of a real-size checkpoint (aquila-1.8b -> aquila-8x1.8b, sparse
upcycling, bf16) between safetensors files, one tensor in memory at a time: time, GB/s and
peak resident memory against the 4 GB the streaming must stay under."""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from minimoe.bench import peak_resident_gb, reset_peak_resident, write_random_checkpoint
from minimoe.config import get_preset
from minimoe.model import build_model
from minimoe.upcycle import upcycle_checkpoint

LIMIT_GB = 4.0


def bench_upcycle(args):
    """aquila-1.8b (random bf16 weights) -> 8 experts top-2, streamed. --quick: 32k vocabulary,
    4 layers."""
    source = get_preset("aquila-1.8b")
    if args.quick:
        source = source.replace(vocab_size=32000, n_layers=4)
    tmp = Path(tempfile.mkdtemp(prefix="minimoe-bench-upcycle-"))
    try:
        src_bytes, src_s = write_random_checkpoint(source, tmp / "dense.safetensors")

        reset_peak_resident()
        t0 = time.perf_counter()
        cfg, written = upcycle_checkpoint(tmp / "dense.safetensors", source,
                                          tmp / "moe.safetensors", n_experts=8, top_k=2)
        upcycle_s = time.perf_counter() - t0
        peak = peak_resident_gb()

        # the result holds the MoE's shapes, and every expert of a layer is the dense MLP
        expected = build_model(cfg, device="meta").state_dict()
        with safe_open(str(tmp / "moe.safetensors"), "pt") as f, \
                safe_open(str(tmp / "dense.safetensors"), "pt") as d:
            assert set(f.keys()) == set(expected)
            for name, t in expected.items():
                assert tuple(f.get_slice(name).get_shape()) == tuple(t.shape), name
            experts = f.get_tensor("layers.1.mlp.w_down_EFD")
            dense = d.get_tensor("layers.1.mlp.down_proj.weight").T
            assert all(torch.equal(experts[e], dense) for e in range(cfg.n_experts))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"upcycle {'(quick) ' if args.quick else ''}{source.param_counts()['total'] / 1e9:.2f}B "
          f"-> {cfg.param_counts()['total'] / 1e9:.2f}B parameters "
          f"({cfg.param_counts()['active'] / 1e9:.2f}B active), bf16, {cfg.n_experts} experts "
          f"top-{cfg.top_k}")
    print(f"  write source   {src_bytes / 1e9:6.2f} GB in {src_s:6.1f} s")
    print(f"  upcycle        {written / 1e9:6.2f} GB in {upcycle_s:6.1f} s = "
          f"{written / 1e9 / upcycle_s:.2f} GB/s written")
    print(f"  peak resident  {peak:6.2f} GB while upcycling (VmHWM), {max_rss:.2f} GB whole "
          f"process (ru_maxrss); limit {LIMIT_GB:.0f} GB: {'ok' if peak < LIMIT_GB else 'OVER'}")
    return {"upcycle_s": upcycle_s, "bytes": written, "gb_per_s": written / 1e9 / upcycle_s,
            "peak_gb": peak, "max_rss_gb": max_rss}
