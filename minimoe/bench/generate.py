"""bench generate: tokens/s of greedy generation with a KV cache for toy-large, ours against
transformers' LlamaForCausalLM.generate holding the same weights (same prompt, same number of
new tokens, in one run); >= 1.0 means ours is not slower."""

from __future__ import annotations

import statistics
import time

import torch

from minimoe.config import get_preset
from minimoe.generate import generate
from minimoe.interop import hf_model
from minimoe.model import build_model


def bench_generate(args):
    """Greedy generation of toy-large (random weights), batch 1, ours vs HF Llama."""
    torch.manual_seed(0)
    cfg = get_preset("toy-large")
    prompt_len, new_tokens = (32, 64) if args.quick else (32, 192)
    ours = build_model(cfg).eval()
    theirs = hf_model(ours, "llama").eval()  # transformers' LlamaForCausalLM, our weights
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len))

    def run_ours():
        return generate(ours, prompt.tolist(), max_new_tokens=new_tokens)[0]

    def run_theirs():
        with torch.no_grad():
            out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, use_cache=True, pad_token_id=0)
        return out[0, prompt_len:].tolist()

    runs = {"minimoe": run_ours, "transformers": run_theirs}
    tokens = {name: fn() for name, fn in runs.items()}  # warm-up, and the tokens to compare
    same = tokens["minimoe"] == tokens["transformers"]
    times = {name: [] for name in runs}
    for _ in range(3 if args.quick else 5):  # interleaved, so drifts in machine load hit both
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tps = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    ratio = tps["minimoe"] / tps["transformers"]
    print(f"bench generate: toy-large ({cfg.param_counts()['total']:,} params, random weights), "
          f"greedy, batch 1, prompt {prompt_len} + {new_tokens} new tokens, KV cache, "
          f"{torch.get_num_threads()} threads")
    for name, v in tps.items():
        print(f"  {name:13s} {v:10,.0f} tokens/s")
    print(f"  same tokens: {'yes' if same else 'NO'}")
    print(f"  ratio minimoe / transformers = {ratio:.2f} (>= 1.0 means ours is not slower)")
    return {"tokens_per_s": tps, "ratio": ratio, "same_tokens": same}
