"""bench moe: forward + backward of one MoE layer against the FLOP-equal dense SwiGLU (the
physical limit) and transformers' MixtralSparseMoeBlock holding the same weights."""

from __future__ import annotations

import os
import statistics

import torch

import minimoe.moe as moe_module
from minimoe.bench import timeit
from minimoe.config import get_preset
from minimoe.interop import hf_config
from minimoe.moe import MLP


def bench_moe(args):
    """Forward + backward of one MoE layer (8 experts, top-2, expert width F) against a dense
    SwiGLU of width 2F (the same FLOPs per token: a ratio of 1.0 is the physical limit) and
    transformers' MixtralSparseMoeBlock holding the same weights."""
    # transformers is imported here, not at the top: it takes seconds, and only this bench
    # (not `minimoe bench sim`, say) needs it
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    d_model, width, tokens = (256, 512, 4096) if args.quick else (512, 1024, 4096)
    cfg = get_preset("toy-large").replace(d_model=d_model, n_experts=8, top_k=2, expert_d_ffn=width)
    ours, dense = moe_module.MoE(cfg), MLP(d_model, 2 * width)
    mixtral = {}
    for implementation in ("eager", "grouped_mm"):
        hf_cfg = hf_config(cfg, "mixtral")
        hf_cfg._experts_implementation = implementation
        block = mixtral[implementation] = MixtralSparseMoeBlock(hf_cfg)
        with torch.no_grad():
            block.gate.weight.copy_(ours.router.weight)
            block.experts.gate_up_proj.copy_(torch.cat([ours.w_gate_EDF, ours.w_up_EDF], 2).transpose(1, 2))
            block.experts.down_proj.copy_(ours.w_down_EFD.transpose(1, 2))
    x = torch.randn(1, tokens, d_model, requires_grad=True)
    grad = torch.randn(1, tokens, d_model)

    def step_fn(module, grouped=True):
        def step():
            moe_module.GROUPED_MM = grouped
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).backward(grad)
            moe_module.GROUPED_MM = True
        return step

    steps = {
        "dense SwiGLU, width 2F": step_fn(dense),
        "minimoe MoE": step_fn(ours),
        "minimoe MoE, expert loop": step_fn(ours, grouped=False),
        "Mixtral block, eager": step_fn(mixtral["eager"]),
        "Mixtral block, grouped_mm": step_fn(mixtral["grouped_mm"]),
    }
    times = {name: [] for name in steps}
    for _ in range(3 if args.quick else 7):  # interleaved, so drifts in machine load hit all alike
        for name, fn in steps.items():
            times[name].append(timeit(fn, warmup=1, repeats=3))
    median = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    best = {name: 1e3 * min(t) for name, t in times.items()}
    dense_name = "dense SwiGLU, width 2F"
    print(f"bench moe: forward + backward, T={tokens} tokens, D={d_model}, 8 experts x F={width}, "
          f"top-2, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"  {'':27s} {'median':>9s} {'x dense':>8s} {'best':>9s} {'x dense':>8s}")
    for name in steps:
        print(f"  {name:27s} {median[name]:7.1f}ms {median[name] / median[dense_name]:8.2f} "
              f"{best[name]:7.1f}ms {best[name] / best[dense_name]:8.2f}")
    ratios = {"moe/dense": median["minimoe MoE"] / median[dense_name],
              "moe/mixtral_eager": median["minimoe MoE"] / median["Mixtral block, eager"],
              "moe/mixtral_grouped_mm": median["minimoe MoE"] / median["Mixtral block, grouped_mm"]}
    print(f"  medians: minimoe / dense = {ratios['moe/dense']:.2f} (goal <= 1.3); minimoe / Mixtral "
          f"= {ratios['moe/mixtral_eager']:.2f} eager, {ratios['moe/mixtral_grouped_mm']:.2f} grouped_mm "
          "(< 1: ours is faster)")
    print("  (on a busy machine multi-threaded matmuls wait for descheduled threads, and the MoE's "
          "8 smaller matmuls suffer most; OMP_NUM_THREADS=1 gives steadier ratios)")
    return {"ms": median, "ratios": ratios}
