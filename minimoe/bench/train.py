"""bench train: one AdamW training step of toy-small, ours against transformers' LlamaForCausalLM
holding the same weights, as tokens/s and their ratio (>= 1.0: ours is not slower)."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from minimoe.bench import timeit
from minimoe.config import get_preset
from minimoe.interop import export_llama_state_dict, hf_llama_config
from minimoe.model import build_model


def bench_train(args):
    """Tokens/s of one AdamW training step of toy-small, ours vs HF Llama, same weights."""
    # transformers is imported here, not at the top: it takes seconds, and only this bench
    # (not `minimoe bench sim`, say) needs it
    from transformers import LlamaForCausalLM

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
