"""Evaluation: validation loss, perplexity and bits per byte, multiple-choice and generative tasks.

The paper follows OpenCompass (AquilaMoE §3.3): discriminative tasks join the context with each
candidate and pick the most likely one; generative tasks let the model complete the answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, data, tc, n_batches: int | None = None) -> dict[str, float]:
    """Mean validation loss over a fixed set of batches, overall, per language and per domain
    (val_<domain>; a domain whose tokens are a language's gets that language's number).

    `tc` is the run's TrainConfig: its batch_size, seq_len and eval_batches set the batches.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = n_batches or tc.eval_batches
    result = {}
    for lang in [None, *data.langs, *data.val_domains]:
        stored = data.stored_as["val" if lang is None else f"val_{lang}"]
        if stored in result:  # the same tokens under another name: measured once
            result[f"val_{lang}"] = result[stored]
            continue
        losses = []
        for x, y in data.val_batches(tc.batch_size, tc.seq_len, n, lang=lang):
            logits = model(x.to(device))
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten()).item())
        if losses:
            result["val_loss" if lang is None else f"val_{lang}"] = sum(losses) / len(losses)
    model.train(was_training)
    return result
