"""Generation with the KV cache: the same tokens as the whole sequence every step, dense and MoE,
padded batches, sampling rules and stop strings."""

import pytest
import torch

from minimoe.config import get_preset
from minimoe.generate import cut_at_stop, generate, generate_text, pick_next
from minimoe.model import KVCache, build_model
from minimoe.tokens import byte_tokenizer

# init_std 0.2: logits far enough apart that float rounding cannot flip a greedy choice
DENSE = get_preset("tiny").replace(vocab_size=300, init_std=0.2)
MOE = DENSE.replace(n_experts=4, top_k=2)
PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [8, 250], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


@torch.no_grad()
def _uncached(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
    """The reference: each prompt alone, the whole sequence recomputed every step."""
    generator, rows = torch.Generator().manual_seed(seed), []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(max_new_tokens):
            ids.append(pick_next(model(torch.tensor([ids]))[:, -1], temperature, top_p,
                                 generator).item())
        rows.append(ids[len(prompt):])
    return rows


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_cached_generation_equals_uncached_token_for_token(cfg):
    model = _model(cfg)
    cached = generate(model, PROMPTS, max_new_tokens=24)  # one left-padded batch
    uncached = _uncached(model, PROMPTS, max_new_tokens=24)  # row by row
    assert cached == uncached
    assert generate(model, PROMPTS[1:2], max_new_tokens=24) == cached[1:2]  # alone
    assert all(len(row) == 24 for row in cached) and len({tuple(r) for r in cached}) == 3
    # sampling draws the same numbers in the same order for one row, cached or not
    sample = dict(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=3)
    sampled = generate(model, PROMPTS[:1], **sample)
    assert sampled == _uncached(model, PROMPTS[:1], **sample)
    assert sampled[0] != cached[0][:16]  # it did sample


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_cached_logits_equal_the_full_forward(cfg):
    """Prefill, a chunk of several positions, then one position at a time, padded rows too."""
    model = _model(cfg)
    torch.manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2, 30))
    full = model(x)
    assert torch.equal(model(x, KVCache(cfg, 2, 30)), full)  # the prefill is the training forward
    cache = KVCache(cfg, 2, 30)
    steps = [model(x[:, :10], cache), model(x[:, 10:14], cache)]
    steps += [model(x[:, i:i + 1], cache) for i in range(14, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    # row 0 padded by 5 positions computes what it computes alone
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x[:1, :20]], dim=1)
    cache = KVCache(cfg, 2, 26, pad_B=[5, 0])
    both = torch.cat([padded, x[1:, :25]])
    out = torch.cat([model(both[:, :15], cache)] + [model(both[:, i:i + 1], cache)
                                                    for i in range(15, 25)], dim=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 5:], full[0, :20], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], full[1, :25], atol=1e-4, rtol=1e-4)


def test_sampling_rules():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert pick_next(logits).item() == 0  # temperature 0: greedy
    g = torch.Generator().manual_seed(0)
    drawn = {pick_next(logits, 1.0, 0.6, g).item() for _ in range(300)}
    assert drawn == {0, 1}  # the smallest set holding 60%: 0.5 + 0.3
    assert {pick_next(logits, 1.0, 0.01, g).item() for _ in range(50)} == {0}
    assert {pick_next(logits, 1.0, 1.0, g).item() for _ in range(600)} == {0, 1, 2, 3}
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(_model(DENSE), [[1, 2]], **{"max_new_tokens": 4, **bad})
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(_model(DENSE), [[1] * 100], max_new_tokens=29)


def test_stop_strings_cut_the_completion():
    assert cut_at_stop("abc.def\nx", [".", "\n"]) == "abc"
    assert cut_at_stop("abc", ["z"]) == "abc"
    tok = byte_tokenizer()
    model = _model(get_preset("tiny").replace(vocab_size=tok.vocab_size, init_std=0.2))
    free = generate_text(model, tok, ["In the beginning"], max_new_tokens=20)[0]
    assert len(free) >= 6
    stop = free[3:5]
    cut = generate_text(model, tok, ["In the beginning"], max_new_tokens=20, stop=[stop])[0]
    assert cut == free[:free.index(stop)]
    assert generate_text(model, tok, ["In the beginning"], max_new_tokens=20, stop=["\x00zz"]) == [free]
