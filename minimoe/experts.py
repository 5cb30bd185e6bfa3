"""What the experts learned: each domain's share per expert (LLaMA-MoE's heatmaps), a
Jensen-Shannon specialisation score, top tokens, and each token's experts (`token_routes`).
Definitions: docs/method.md#what-the-experts-specialise-in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from minimoe import files
from minimoe.moe import MoE, Routing
from minimoe.tokens import TokenData


def domain_batches(data: TokenData, batch_size: int = 8, seq_len: int = 128,
                   n_batches: int = 4) -> dict[str, list[torch.Tensor]]:
    """The same number of fixed validation windows (B, T) of every domain."""
    if not data.val_domains:
        raise ValueError("data: no domain has validation documents")
    return {domain: [x for x, _ in data.val_batches(batch_size, seq_len, n_batches, lang=domain)]
            for domain in data.val_domains}


def _moe_layers(model) -> dict[int, MoE]:
    layers = {i: block.mlp for i, block in enumerate(model.layers) if isinstance(block.mlp, MoE)}
    if not layers:
        raise ValueError("model: has no MoE layer (a dense model routes nothing)")
    return layers


@torch.no_grad()
def _routes(model, layers: dict[int, MoE], idx_BT) -> dict[int, Routing]:
    """Each MoE layer's routing in one forward at evaluation (no noise): MoE.route itself, on
    the hidden state that reaches the layer, so exactly the forward's choice."""
    routes: dict[int, Routing] = {}

    def record(layer):
        return lambda moe, args: routes.__setitem__(layer, moe.route(args[0].flatten(0, -2)))

    hooks = [moe.register_forward_pre_hook(record(i)) for i, moe in layers.items()]
    was_training = model.training
    model.eval()
    try:
        model(idx_BT.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return routes


def route_counts(model, batches: dict[str, list[torch.Tensor]]):
    """Router choices of every MoE layer: (layer ids, pairs (L, D, E), pairs by token (L, E, V),
    token occurrences (V,))."""
    layers = _moe_layers(model)
    L, D, E, V = len(layers), len(batches), model.cfg.n_experts, model.cfg.vocab_size
    pairs_LDE = torch.zeros(L, D, E, dtype=torch.long)
    by_token_LEV = torch.zeros(L, E, V, dtype=torch.long)
    seen_V = torch.zeros(V, dtype=torch.long)
    for d, windows in enumerate(batches.values()):
        for x in windows:
            routes = _routes(model, layers, x)
            tokens_T = x.reshape(-1).cpu()
            seen_V += torch.bincount(tokens_T, minlength=V)
            for slot, (i, moe) in enumerate(layers.items()):
                expert_S = routes[i].idx_TK.reshape(-1).cpu()
                pairs_LDE[slot, d] += torch.bincount(expert_S, minlength=E)
                token_S = tokens_T.repeat_interleave(moe.top_k)  # pair s = token * K + slot
                by_token_LEV[slot].index_put_((expert_S, token_S), torch.ones_like(token_S),
                                              accumulate=True)
    return list(layers), pairs_LDE, by_token_LEV, seen_V


def token_routes(model, idx) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Where each token of one sequence goes: {MoE layer: (experts (T, K), combine weights
    (T, K))}, each token's experts in order of weight. idx: the token ids, (T,) or (1, T)."""
    layers = _moe_layers(model)
    routes = _routes(model, layers, torch.as_tensor(idx).reshape(1, -1))
    return {i: (routes[i].idx_TK.cpu(), routes[i].weight_TK.cpu()) for i in layers}


def js_specialisation(pairs_DE) -> float:
    """Jensen-Shannon divergence of the domains' expert distributions (equal weights), in bits
    over log2(domains): 0 for identical rows, 1 for rows with disjoint experts."""
    rows = [torch.as_tensor(row, dtype=torch.float64) for row in pairs_DE]
    rows = [row / row.sum() for row in rows if row.sum() > 0]
    if len(rows) < 2:
        raise ValueError(f"pairs: {len(rows)} domain(s) with routed tokens; need at least 2")

    def entropy(p):
        p = p[p > 0]
        return float(-(p * p.log2()).sum())

    mixture = torch.stack(rows).mean(0)
    js = entropy(mixture) - sum(entropy(row) for row in rows) / len(rows)
    return max(0.0, js / math.log2(len(rows)))


def expert_specialisation(model, batches: dict[str, list[torch.Tensor]], top: int = 10) -> dict:
    """Per MoE layer: pairs by domain and expert, both shares, the JS score, top tokens."""
    layer_ids, pairs_LDE, by_token_LEV, seen_V = route_counts(model, batches)
    result = {"domains": list(batches), "n_experts": pairs_LDE.shape[2], "layers": []}
    for slot, layer in enumerate(layer_ids):
        pairs = pairs_LDE[slot].double()
        per_expert = pairs.sum(0, keepdim=True).clamp(min=1)
        top_tokens = {}
        for e in range(pairs.shape[1]):
            counts = by_token_LEV[slot, e]
            best = counts.topk(min(top, int((counts > 0).sum()))).indices.tolist()
            top_tokens[e] = [[t, int(counts[t]), int(counts[t]) / int(seen_V[t])] for t in best]
        result["layers"].append({
            "layer": layer, "pairs": pairs_LDE[slot].tolist(),
            "expert_given_domain": (pairs / pairs.sum(1, keepdim=True).clamp(min=1)).tolist(),
            "domain_given_expert": (pairs / per_expert).tolist(),
            "js": js_specialisation(pairs_LDE[slot]), "top_tokens": top_tokens})
    result["mean_js"] = sum(r["js"] for r in result["layers"]) / len(result["layers"])
    return result


def plot_specialisation(result: dict, path: Path, title: str = ""):
    """One heatmap per MoE layer, domains x experts, of each domain's share per expert."""
    plt = files.pyplot()
    layers = result["layers"]
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.6 * len(result["domains"]) * rows + 1.4 * rows),
                             squeeze=False, layout="constrained")  # room for the shared colorbar
    for ax, layer in zip(axes.flat, layers):
        image = ax.imshow(layer["expert_given_domain"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {layer['layer']}: JS {layer['js']:.3f}", fontsize=9)
        ax.set_yticks(range(len(result["domains"])), result["domains"], fontsize=8)
        ax.set_xticks(range(result["n_experts"]))
        ax.set_xlabel("expert", fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of the domain's pairs")
    fig.suptitle(title or f"routing by domain; mean JS {result['mean_js']:.3f}")
    files.save_figure(fig, path)


def write_specialisation(result: dict, out_dir, tokenizer=None, title: str = ""):
    """specialisation.json, .png and top_tokens.md (decoded given a tokenizer) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(out_dir / "specialisation.json", result)
    plot_specialisation(result, out_dir / "specialisation.png", title)
    lines = ["# Top tokens per expert", "",
             "Token (times routed to the expert, share of the token's occurrences).", ""]
    for layer in result["layers"]:
        lines += [f"## Layer {layer['layer']} (JS {layer['js']:.3f})", ""]
        for e, tokens in layer["top_tokens"].items():
            shown = ", ".join(f"{_shown(tokenizer, t)} ({n}, {share:.0%})" for t, n, share in tokens)
            lines.append(f"- expert {e}: {shown}")
        lines.append("")
    files.write_text(out_dir / "top_tokens.md", "\n".join(lines))


def _shown(tokenizer, token_id: int) -> str:
    return json.dumps(tokenizer.decode([token_id]), ensure_ascii=False) if tokenizer else str(token_id)
