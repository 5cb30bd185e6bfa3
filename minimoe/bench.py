"""Benchmarks (`minimoe bench NAME`): speed measured against a peer or a physical limit in the
same process, printed as ratios. Never a timed test: CI does not run these.

Each benchmark is a function taking the parsed CLI args and printing its table; `BENCHES`
maps the CLI name to it.
"""

from __future__ import annotations

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
