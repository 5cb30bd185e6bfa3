"""bench train: one AdamW training step of toy-small, ours against transformers' LlamaForCausalLM
holding the same weights, as tokens/s and their ratio (>= 1.0: ours is not slower); then the
achieved model FLOP/s of toy-small, toy-large and the upcycled MoE as a fraction of this CPU's
physical limit, the FLOP/s of a large fp32 matmul measured in the same process. --compile adds
each model with torch.compile on every block, against its eager step."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from minimoe.bench import timeit
from minimoe.config import get_preset
from minimoe.flops import flops_per_token
from minimoe.interop import hf_model
from minimoe.model import build_model
from minimoe.upcycle import upcycle

GEMM_N = 2048  # a 2048^3 fp32 matmul (17 GFLOP): large enough for the BLAS kernel's peak


def bench_train(args):
    """Tokens/s of one AdamW training step of toy-small, ours vs HF Llama, same weights."""
    torch.manual_seed(0)
    cfg = get_preset("toy-small")
    batch, seq = (8, 128) if args.quick else (16, 256)
    ours = build_model(cfg)
    theirs = hf_model(ours, "llama")  # transformers' LlamaForCausalLM, our weights
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
    return {"tokens_per_s": tps, "ratio": ratio,
            "flops": bench_model_flops(batch, seq, args.quick, getattr(args, "compile", False))}


def gemm_seconds(a, b) -> float:
    """Seconds of one large fp32 matmul on this process's threads (median of 3 after warm-up)."""
    return timeit(lambda: a @ b, warmup=1, repeats=3)


def _models(compiled: bool) -> dict:
    """toy-small, toy-large and toy-large upcycled into 8 experts, top-2 (28M parameters);
    with compiled, each also as a copy with torch.compile on every block."""
    torch.manual_seed(0)
    large = build_model(get_preset("toy-large"))
    models = {"toy-small": build_model(get_preset("toy-small")), "toy-large": large,
              "upcycled MoE": upcycle(large, 8, 2)}
    out = {}
    for name, model in models.items():
        out[name] = {"eager": model}
        if compiled:
            copy = copy_module(model)
            for block in copy.layers:
                block.compile()
            out[name]["compiled"] = copy
    return out


def copy_module(model):
    clone = build_model(model.cfg)
    clone.load_state_dict(model.state_dict())
    return clone


def _step(model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_model_flops(batch: int, seq: int, quick: bool, compiled: bool) -> dict:
    """Model FLOP/s of a training step (forward + backward matmuls, attention counted causal:
    minimoe.flops' MFU convention) over the fp32 GEMM peak. The machine is shared and noisy,
    so the matmul and every model's step are interleaved in rounds and each takes its best
    round: the capability of the code, not the load of the moment."""
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    x = torch.randint(0, 2048, (batch, seq))
    y = torch.randint(0, 2048, (batch, seq))
    models = _models(compiled)
    steps = {(name, kind): _step(model, x, y) for name, kinds in models.items()
             for kind, model in kinds.items()}
    for fn in steps.values():  # warm-up (and compilation) before any round is timed
        fn()
    gemm, times = [], {key: [] for key in steps}
    for _ in range(3 if quick else 6):
        gemm.append(gemm_seconds(a, b))
        for key, fn in steps.items():
            times[key].append(timeit(fn, warmup=1, repeats=3))
    peak = 2 * GEMM_N**3 / min(gemm)
    rows = {}
    for (name, kind), t in times.items():
        per_token = flops_per_token(models[name][kind].cfg, seq).model
        rows.setdefault(name, {})[kind] = batch * seq * per_token / min(t)
    print(f"model FLOP/s of a training step ({batch} x {seq} tokens) against the fp32 GEMM "
          f"peak measured here: {peak / 1e9:.1f} GFLOP/s ({GEMM_N}^3 matmul, "
          f"{torch.get_num_threads()} threads; best of interleaved rounds)")
    for name, flops in rows.items():
        line = f"  {name:13s} {flops['eager'] / 1e9:6.1f} GFLOP/s = {flops['eager'] / peak:4.0%} of peak"
        if "compiled" in flops:
            line += (f"; compiled {flops['compiled'] / 1e9:6.1f} GFLOP/s = "
                     f"{flops['compiled'] / peak:4.0%} ({flops['compiled'] / flops['eager']:.2f}x eager)")
        print(line)
    return {"peak": peak, "models": rows}
