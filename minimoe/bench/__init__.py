"""Benchmarks (`minimoe bench NAME`): speed measured against a peer or a physical limit in the
same process, printed as ratios. Never a timed test: CI does not run these.

Each benchmark is a function taking the parsed CLI args and printing its table; `BENCHES`
maps the CLI name to it.
"""

from __future__ import annotations

import os
import statistics
import time


def timeit(fn, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


BENCHES = {}


# --- bench train: our training step against transformers' LlamaForCausalLM ----------------
def bench_train(args):
    """Tokens/s of one AdamW training step of toy-small, ours vs HF Llama, same weights."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from minimoe.config import get_preset
    from minimoe.interop import export_llama_state_dict, hf_llama_config
    from minimoe.model import build_model

    torch.manual_seed(0)
    cfg = get_preset("toy-small")
    batch, seq = (8, 128) if args.quick else (16, 256)
    ours = build_model(cfg)
    theirs = LlamaForCausalLM(hf_llama_config(cfg))
    theirs.load_state_dict(export_llama_state_dict(ours.state_dict()))
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step_fn(model, forward):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = F.cross_entropy(forward(x).flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {"minimoe": step_fn(ours, ours), "transformers": step_fn(theirs, lambda i: theirs(i).logits)}
    times = {name: [] for name in steps}
    rounds = 3 if args.quick else 7
    for _ in range(rounds):  # interleave the two so drifts in machine load hit both alike
        for name, fn in steps.items():
            times[name].append(timeit(fn, warmup=1, repeats=3))
    tokens = batch * seq
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    ratio = tps["minimoe"] / tps["transformers"]
    print(f"bench train: toy-small ({cfg.param_counts()['total']:,} params), batch {batch} x {seq} "
          f"tokens, AdamW step, {torch.get_num_threads()} threads")
    for name, v in tps.items():
        print(f"  {name:13s} {v:10,.0f} tokens/s")
    print(f"  ratio minimoe / transformers = {ratio:.2f} (>= 1.0 means ours is not slower)")
    return {"tokens_per_s": tps, "ratio": ratio}


BENCHES["train"] = bench_train


# --- bench moe: our MoE layer against the FLOP-equal dense MLP and transformers' Mixtral ----
def bench_moe(args):
    """Forward + backward of one MoE layer (8 experts, top-2, expert width F) against a dense
    SwiGLU of width 2F (the same FLOPs per token: a ratio of 1.0 is the physical limit) and
    transformers' MixtralSparseMoeBlock holding the same weights."""
    import torch
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    import minimoe.moe as moe_module
    from minimoe.config import get_preset
    from minimoe.model import MLP
    from minimoe.interop import hf_mixtral_config

    torch.manual_seed(0)
    d_model, width, tokens = (256, 512, 4096) if args.quick else (512, 1024, 4096)
    cfg = get_preset("toy-large").replace(d_model=d_model, n_experts=8, top_k=2, expert_d_ffn=width)
    ours, dense = moe_module.MoE(cfg), MLP(d_model, 2 * width)
    mixtral = {}
    for implementation in ("eager", "grouped_mm"):
        hf_cfg = hf_mixtral_config(cfg)
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


BENCHES["moe"] = bench_moe


# --- bench sim: the vectorised layout search against a plain loop over the same layouts --------
def bench_sim(args):
    """Candidate layouts priced per second by plan.search_layouts, vs simulate() in a loop."""
    import itertools

    from minimoe.config import get_preset
    from minimoe.sim.hardware import get_device
    from minimoe.sim.search import iter_layouts, search_layouts
    from minimoe.sim.cost import Workload, simulate

    workload = Workload.from_tokens(get_preset("aquilamoe-8x16b"), 24 * 2**20)
    device = get_device("h100")
    search = search_layouts(workload, device, 1024)
    seconds = timeit(lambda: search_layouts(workload, device, 1024), warmup=1,
                     repeats=2 if args.quick else 5)
    loop_layouts = list(itertools.islice(iter_layouts(workload, 1024), 100 if args.quick else 400))
    loop_seconds = timeit(lambda: [simulate(workload, lay, device) for lay in loop_layouts],
                          warmup=0, repeats=1 if args.quick else 3)
    vector_rate = search.n_candidates / seconds
    loop_rate = len(loop_layouts) / loop_seconds
    print(f"bench sim: aquilamoe-8x16b on up to 1024 H100, 24M-token batch: "
          f"{search.n_candidates:,} candidate layouts ({search.n_valid:,} valid, "
          f"{search.n_feasible:,} fit)")
    print(f"  vectorised search  {seconds:8.3f} s   {vector_rate:12,.0f} candidates/s "
          f"(goal: >= 100,000 candidates in 1 s)")
    print(f"  simulate() loop    {loop_seconds / len(loop_layouts) * 1e3:8.3f} ms/layout "
          f"{loop_rate:10,.0f} layouts/s over {len(loop_layouts)} layouts")
    print(f"  ratio vectorised / loop = {vector_rate / loop_rate:,.0f}x")
    return {"seconds": seconds, "candidates": search.n_candidates,
            "candidates_per_s": vector_rate, "loop_layouts_per_s": loop_rate}


BENCHES["sim"] = bench_sim


# --- bench grow: Scale-Up of a real-size checkpoint, streamed tensor by tensor -------------
def _vm_hwm_gb() -> float:
    """Peak resident memory of this process (VmHWM), in GB."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024 / 1e9


def _reset_vm_hwm():
    try:  # Linux: writing 5 to clear_refs resets VmHWM, so one phase can be measured alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def bench_grow(args):
    """aquila-1.3b (16 heads) -> aquila-7b with AKI-Pro, bf16 random weights, between
    safetensors files with one tensor in memory at a time: time, bytes, GB/s and peak resident
    memory, against the 4 GB the streaming must stay under. --quick: 32k vocabulary, 4 -> 6
    layers."""
    import resource
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    from safetensors import safe_open

    from minimoe.config import get_preset
    from minimoe.grow import grow_checkpoint, grow_tensor
    from minimoe.model import build_model
    from minimoe.stream import SafetensorsSource, write_safetensors

    source = get_preset("aquila-1.3b")
    target = get_preset("aquila-7b")
    if args.quick:
        source = source.replace(vocab_size=32000, n_layers=4)
        target = target.replace(vocab_size=32000, n_layers=6)
    tmp = Path(tempfile.mkdtemp(prefix="minimoe-bench-grow-"))
    try:
        specs = {name: (torch.bfloat16, tuple(t.shape))
                 for name, t in build_model(source, device="meta").state_dict().items()}
        generator = torch.Generator().manual_seed(0)

        def random_tensor(name):
            shape = specs[name][1]
            if name.endswith("norm.weight"):
                return torch.ones(shape, dtype=torch.bfloat16)
            return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)

        t0 = time.perf_counter()
        src_bytes = write_safetensors(tmp / "src.safetensors", specs, random_tensor)
        src_s = time.perf_counter() - t0

        _reset_vm_hwm()
        t0 = time.perf_counter()
        plan, written = grow_checkpoint(tmp / "src.safetensors", source, target,
                                        tmp / "out.safetensors", method="aki-pro")
        grow_s = time.perf_counter() - t0
        peak = _vm_hwm_gb()

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


BENCHES["grow"] = bench_grow
