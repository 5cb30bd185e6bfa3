"""bench grow: Scale-Up of a real-size checkpoint (aquila-1.3b -> aquila-7b, AKI-Pro, bf16)
between safetensors files, one tensor in memory at a time: time, GB/s and peak memory."""

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
from minimoe.grow import grow_checkpoint, grow_tensor
from minimoe.model import build_model
from minimoe.stream import SafetensorsSource


def bench_grow(args):
    """aquila-1.3b (16 heads) -> aquila-7b with AKI-Pro, bf16 random weights, between
    safetensors files with one tensor in memory at a time: time, bytes, GB/s and peak resident
    memory, against the 4 GB the streaming must stay under. --quick: 32k vocabulary, 4 -> 6
    layers."""
    source = get_preset("aquila-1.3b")
    target = get_preset("aquila-7b")
    if args.quick:
        source = source.replace(vocab_size=32000, n_layers=4)
        target = target.replace(vocab_size=32000, n_layers=6)
    tmp = Path(tempfile.mkdtemp(prefix="minimoe-bench-grow-"))
    try:
        src_bytes, src_s = write_random_checkpoint(source, tmp / "src.safetensors")

        reset_peak_resident()
        t0 = time.perf_counter()
        plan, written = grow_checkpoint(tmp / "src.safetensors", source, target,
                                        tmp / "out.safetensors", method="aki-pro")
        grow_s = time.perf_counter() - t0
        peak = peak_resident_gb()

        # the result opens with safetensors and holds the target's shapes; one tensor rechecked
        expected = build_model(target, device="meta").state_dict()
        with safe_open(str(tmp / "out.safetensors"), "pt") as f:
            assert set(f.keys()) == set(expected)
            for name, t in expected.items():
                assert tuple(f.get_slice(name).get_shape()) == tuple(t.shape), name
            check = "layers.1.mlp.down_proj.weight"
            assert torch.equal(f.get_tensor(check),
                               grow_tensor(plan, check, SafetensorsSource(tmp / "src.safetensors")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"grow {'(quick) ' if args.quick else ''}{source.param_counts()['total'] / 1e9:.2f}B "
          f"-> {target.param_counts()['total'] / 1e9:.2f}B parameters, bf16, AKI-Pro, "
          f"depth {plan.depth} {plan.layer_map[:6]}...")
    print(f"  write source   {src_bytes / 1e9:6.2f} GB in {src_s:6.1f} s")
    print(f"  grow           {written / 1e9:6.2f} GB in {grow_s:6.1f} s = "
          f"{written / 1e9 / grow_s:.2f} GB/s written")
    print(f"  peak resident  {peak:6.2f} GB while growing (VmHWM), {max_rss:.2f} GB whole process "
          f"(ru_maxrss); limit 4 GB: {'ok' if peak < 4 else 'OVER'}")
    return {"grow_s": grow_s, "bytes": written, "gb_per_s": written / 1e9 / grow_s,
            "peak_gb": peak, "max_rss_gb": max_rss}
