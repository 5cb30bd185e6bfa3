"""Generation with a KV cache, greedy or temperature / top-p sampling, prompts left-padded into
one batch, text in and out through `generate_text` (docs/method.md#evaluation)."""

from __future__ import annotations

import torch

from minimoe.checks import check
from minimoe.model import KVCache


def pick_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0, else a sample at that temperature from
    the smallest set of tokens holding top_p of the probability (nucleus sampling, Holtzman 2020)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    # shifted to a maximum of 0 before the division: a tiny temperature gives -inf, never nan
    logits_BV = logits_BV.double()  # float64: a temperature as small as 1e-300 stays nonzero
    probs_BV = ((logits_BV - logits_BV.amax(dim=-1, keepdim=True)) / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass of the tokens ranked above
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)  # the first always stays
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.inference_mode()  # a little faster than no_grad: no version counters
def generate(model, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             stop=None) -> list[list[int]]:
    """The new tokens of each prompt (token ids), at most max_new_tokens each. A row ends after
    eos_id (included) or once stop(its new tokens) is true."""
    for name, value, rule in (("max_new_tokens", max_new_tokens, "int>0"),
                              ("temperature", temperature, ">=0"), ("top_p", top_p, "(0, 1]")):
        check("generate", name, value, rule)
    assert prompts and all(prompts), "every prompt needs a token (generate_text gives each one)"
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens}: more than "
                         f"the model's max_seq_len={model.cfg.max_seq_len}")
    weight, B = next(model.parameters()), len(prompts)
    pad_B = [longest - len(p) for p in prompts]
    idx = torch.tensor([[0] * pad + p for pad, p in zip(pad_B, prompts)], device=weight.device)
    cache = KVCache(model.cfg, B, longest + max_new_tokens, pad_B=pad_B, device=weight.device,
                    dtype=weight.dtype)
    generator = torch.Generator().manual_seed(seed)
    new, done = [[] for _ in range(B)], [False] * B
    was_training = model.training
    model.eval()  # no router noise
    try:
        logits_BV = model(idx, cache)[:, -1]  # the prefill: the whole prompt at once
        for step in range(max_new_tokens):
            next_B = pick_next(logits_BV, temperature, top_p, generator)
            for b, token in enumerate(next_B.tolist()):
                if not done[b]:
                    new[b].append(token)
                    done[b] = token == eos_id or (stop is not None and stop(new[b]))
            if all(done) or step == max_new_tokens - 1:
                break
            logits_BV = model(next_B[:, None], cache)[:, -1]  # one position per row
    finally:
        model.train(was_training)
    return new


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string in it (all of it if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, stop: list[str] = (),
                  seed: int = 0, batch_size: int = 16, truncate: bool = False) -> list[str]:
    """Each prompt's completion, cut at the first stop string; truncate=True keeps the end of a
    prompt too long for the model (as lm-evaluation-harness does), else it is refused."""
    stop = [s for s in stop if s]

    def stopped(new_ids):
        text = tokenizer.decode(new_ids)
        return any(s in text for s in stop)

    room = model.cfg.max_seq_len - max_new_tokens
    encoded = [[tokenizer.start_id] + tokenizer.encode(p) for p in prompts]
    if truncate and room > 0:
        encoded = [ids[-room:] for ids in encoded]
    texts = []
    for i in range(0, len(encoded), batch_size):  # a sampled completion depends on its batch
        rows = generate(model, encoded[i:i + batch_size], max_new_tokens, temperature, top_p,
                        seed + i, tokenizer.eos_id, stopped if stop else None)
        for row in rows:
            if row and row[-1] == tokenizer.eos_id:
                row = row[:-1]
            texts.append(cut_at_stop(tokenizer.decode(row), stop))
    return texts
