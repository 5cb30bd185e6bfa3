"""Scale-Out: a dense model into a Mixture of Experts. `upcycle`: every expert a copy of the MLP,
a new router (AquilaMoE §2.3); `split`: the MLP's neurons divided among the experts (LLaMA-MoE).
Both end in one per-tensor function, `expert_tensor`, run in memory (`build_moe`) or between
files (`upcycle_checkpoint`). Provenance: docs/method.md#scale-out-upcycling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from minimoe.config import ModelConfig
from minimoe.model import Transformer, build_model
from minimoe.moe import router_init_std
from minimoe.stream import transform_file

LAYER_CHOICES = {"all": 1, "every-other": 2}  # -> moe_layer_freq (layer i is MoE when i % freq == 0)
MOE_OPTIONS = ("gate", "router_noise", "capacity_factor", "expert_scale")
SPLIT_METHODS = ("random", "cluster", "importance", "importance-shared")
SCALE_OUT_METHODS = ("upcycle",) + tuple(f"split-{m}" for m in SPLIT_METHODS)


def scale_out(dense: Transformer, method: str, n_experts: int = 8, top_k: int = 2, calib=None,
              seed: int = 0, **options) -> Transformer:
    """One entry point for the CLI and recipes: "upcycle" or "split-<split method>"."""
    if method == "upcycle":
        return upcycle(dense, n_experts, top_k, seed=seed, **options)
    assert method in SCALE_OUT_METHODS, method  # the CLI's choices
    return split(dense, n_experts, top_k, method.removeprefix("split-"), calib, seed=seed, **options)


# --- Sparse Upcycling -----------------------------------------------------------------------
def upcycle(dense: Transformer, n_experts: int = 8, top_k: int = 2, **options) -> Transformer:
    """A new MoE model: every expert a copy of the dense MLP (options: upcycle_plan's)."""
    return build_moe(upcycle_plan(dense.cfg, n_experts, top_k, **options), dense)


def upcycle_checkpoint(src_path, dense_cfg: ModelConfig, out_path, n_experts: int = 8,
                       top_k: int = 2, **options) -> tuple[ModelConfig, int]:
    """`upcycle` between .safetensors files, one tensor in memory at a time: (MoE config, bytes)."""
    plan = upcycle_plan(dense_cfg, n_experts, top_k, **options)

    def dtype_of(source, name):  # a new tensor takes the dtype of its layer's dense MLP
        return source.dtype(name if name in source else name.split(".mlp.")[0] + ".mlp.gate_proj.weight")

    written = transform_file(src_path, dense_cfg, out_path, plan.cfg,
                             lambda name, source: expert_tensor(plan, name, source), dtype_of)
    return plan.cfg, written


def upcycle_plan(dense_cfg: ModelConfig, n_experts: int = 8, top_k: int = 2, layers: str = "all",
                 router_std: float = 0.02, router_init: str = "std", seed: int = 0,
                 **moe_options) -> "ExpertPlan":
    """Every expert all of the MLP's neurons, the router N(0, router_std) from `seed`; layers: "all"
    (AquilaMoE) or "every-other" (Sparse Upcycling); router_init: moe.router_init_std's."""
    cfg = _moe_config(dense_cfg, n_experts, top_k, layers, moe_options)
    every_neuron = torch.arange(cfg.d_ffn)
    return ExpertPlan(cfg, {i: [every_neuron] * cfg.n_experts for i in _moe_layer_ids(cfg)}, {},
                      _routers(cfg, router_std, router_init, seed))


# --- LLaMA-MoE expert construction ------------------------------------------------------------
def split(dense: Transformer, n_experts: int, top_k: int, method: str = "random", calib=None,
          scale: float | None = None, seed: int = 0, layers: str = "all",
          shared_d_ffn: int | None = None, router_std: float = 0.02, router_init: str = "std",
          **moe_options) -> Transformer:
    """Divide each dense FFN into n_experts experts of d_ffn / n_experts neurons
    (docs/method.md#splitting). method:
      "random"             a random equal partition (the released LLaMA-MoE models')
      "cluster"            balanced k-means on the L2-normalised rows of up_proj
      "importance"         expert c: the neurons of highest Taylor importance |h * dL/dh| on
                           the c-th group of `calib` (x, y) batches (LLaMA-MoE Sharing_Inner)
      "importance-shared"  as "importance", the most shared neurons moved into an always-on
                           block of shared_d_ffn (default: one expert's width; Sharing_Inter)
    scale: the expert output scale; default n_experts / top_k, LLaMA-MoE's choice."""
    d_ffn = dense.cfg.d_ffn
    if method not in SPLIT_METHODS:
        raise ValueError(f"method={method!r}: must be one of {', '.join(SPLIT_METHODS)}")
    if "expert_scale" in moe_options:
        raise ValueError(f"expert_scale={moe_options['expert_scale']!r}: split takes it as scale=")
    cfg = _moe_config(dense.cfg, n_experts, top_k, layers, moe_options)  # validates n_experts
    if d_ffn % n_experts:
        raise ValueError(f"n_experts={n_experts!r}: must divide the dense d_ffn={d_ffn} "
                         "(a split gives every expert d_ffn / n_experts neurons)")
    expert_d_ffn = d_ffn // n_experts
    if method == "importance-shared":
        shared_d_ffn = expert_d_ffn if shared_d_ffn is None else shared_d_ffn
        if not 0 < shared_d_ffn <= d_ffn - expert_d_ffn:
            raise ValueError(f"shared_d_ffn={shared_d_ffn}: must be in 1..{d_ffn - expert_d_ffn} "
                             f"(d_ffn={d_ffn} minus one expert's {expert_d_ffn} neurons)")
    elif shared_d_ffn:
        raise ValueError(f"shared_d_ffn={shared_d_ffn}: only method='importance-shared' has a shared block")
    if method.startswith("importance") and calib is None:
        raise ValueError(f"method={method!r}: needs calib, an iterable of (x, y) token batches")
    scale = n_experts / top_k if scale is None else scale
    cfg = cfg.replace(expert_d_ffn=expert_d_ffn, expert_scale=scale, shared_d_ffn=shared_d_ffn or 0)
    layer_ids = _moe_layer_ids(cfg)
    generator = torch.Generator().manual_seed(seed)
    experts, shared = {}, {}
    if method == "random":
        for i in layer_ids:  # LLaMA-MoE's RandomSplit: shuffled equal-size labels, per layer
            experts[i] = list(torch.randperm(d_ffn, generator=generator).view(n_experts, expert_d_ffn))
    elif method == "cluster":
        for i in layer_ids:
            rows = F.normalize(dense.layers[i].mlp.up_proj.weight.detach().float(), dim=1)
            labels = balanced_kmeans(rows, n_experts, generator=generator)
            experts[i] = [torch.nonzero(labels == e).flatten() for e in range(n_experts)]
    else:
        scores = group_importance(dense, calib, n_experts, layer_ids, generator)
        for i in layer_ids:
            if method == "importance":
                experts[i] = [_top_neurons(s, expert_d_ffn) for s in scores[i]]
            else:
                shared[i], experts[i] = residual_split(scores[i], expert_d_ffn, shared_d_ffn)
    routers = _routers(cfg, router_std, router_init, seed)
    return build_moe(ExpertPlan(cfg, experts, shared, routers), dense)


def balanced_kmeans(points_ND: torch.Tensor, n_clusters: int, n_iter: int = 20,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels (N,) of a k-means whose clusters differ in size by at most one (equal when
    n_clusters divides N), as LLaMA-MoE's KMeansConstrained(size_min = size_max) gives."""
    N = len(points_ND)
    assert N >= n_clusters, (N, n_clusters)
    sizes = [N // n_clusters + (c < N % n_clusters) for c in range(n_clusters)]
    centroids_CD = points_ND[torch.randperm(N, generator=generator)[:n_clusters]].clone()
    labels_N = None
    for _ in range(n_iter):
        new_labels_N = _assign_with_capacity(torch.cdist(points_ND, centroids_CD), sizes)
        if labels_N is not None and torch.equal(new_labels_N, labels_N):
            break
        labels_N = new_labels_N
        centroids_CD = torch.stack([points_ND[labels_N == c].mean(0) for c in range(n_clusters)])
    return labels_N


def _assign_with_capacity(dist_NC: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Greedy balanced assignment: the closest (point, cluster) pairs first, full clusters skipped."""
    N, C = dist_NC.shape
    labels, room, left = [-1] * N, list(sizes), N
    for flat in torch.argsort(dist_NC.flatten(), stable=True).tolist():
        n, c = divmod(flat, C)
        if labels[n] < 0 and room[c] > 0:
            labels[n], room[c], left = c, room[c] - 1, left - 1
            if left == 0:
                break
    return torch.tensor(labels)


def group_importance(dense: Transformer, calib, n_groups: int, layer_ids: list[int],
                     generator: torch.Generator | None = None) -> dict[int, torch.Tensor]:
    """Per layer, (n_groups, d_ffn) Taylor importance, a row per group of calibration sequences
    (LLaMA-MoE groups by sentence embeddings; we by k-means on the mean token embedding)."""
    batches = list(calib)  # (x, y) windows of one length, built by the recipe
    x_all, y_all = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    if len(x_all) < n_groups:  # --calib-batches too few for --n-experts
        raise ValueError(f"calib: {len(x_all)} sequences; need at least n_experts={n_groups}")
    with torch.no_grad():
        seq_embed = F.normalize(dense.embed(x_all).float().mean(1), dim=1)
    group_of_seq = balanced_kmeans(seq_embed, n_groups, generator=generator)
    batch_size = len(batches[0][0])
    scores = {i: torch.zeros(n_groups, dense.cfg.d_ffn) for i in layer_ids}
    for c in range(n_groups):
        seqs = torch.nonzero(group_of_seq == c).flatten()
        group_batches = [(x_all[s], y_all[s]) for s in seqs.split(batch_size)]
        for i, score in taylor_importance(dense, group_batches, layer_ids).items():
            scores[i][c] = score
    return scores


def taylor_importance(dense: Transformer, batches, layer_ids: list[int]) -> dict[int, torch.Tensor]:
    """Mean over tokens of |h_j * dL/dh_j| per FFN neuron j (h: the down_proj input): how much the
    loss changes if j is zeroed, to first order (LLaMA-MoE's "feature_change", "l1_norm")."""
    hidden = []
    hooks = [dense.layers[i].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: hidden.append(args[0])) for i in layer_ids]
    # the graph must exist even when the dense model's parameters are frozen
    hooks.append(dense.embed.register_forward_hook(
        lambda module, args, out: out.detach().requires_grad_()))
    score = {i: torch.zeros(dense.cfg.d_ffn) for i in layer_ids}
    n_tokens = 0
    try:
        with torch.enable_grad():
            for x, y in batches:
                hidden.clear()
                grads = torch.autograd.grad(dense(x, targets=y), hidden)  # of the mean loss
                for i, h, g in zip(layer_ids, hidden, grads):  # hooks fire in layer order
                    score[i] += (h * g).abs().flatten(0, -2).sum(0).float().cpu()
                n_tokens += x.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return {i: s / max(n_tokens, 1) for i, s in score.items()}


def residual_split(scores_CN: torch.Tensor, expert_d_ffn: int, shared_d_ffn: int):
    """(shared neurons, expert neuron lists), after LLaMA-MoE's GradientSplitResidual: the neurons
    in most experts' top lists move to the shared block; the experts take their top of the rest."""
    n_neurons = scores_CN.shape[1]
    remaining = torch.ones(n_neurons, dtype=torch.bool)
    total_N = scores_CN.sum(0)
    shared = []
    while len(shared) < shared_d_ffn:
        lists = torch.cat([_top_neurons(s.masked_fill(~remaining, -1.0), expert_d_ffn)
                           for s in scores_CN])
        repeats_N = torch.bincount(lists, minlength=n_neurons)
        most = torch.nonzero((repeats_N == repeats_N.max()) & remaining).flatten()
        most = most[torch.argsort(total_N[most], descending=True)][: shared_d_ffn - len(shared)]
        shared.extend(most.tolist())
        remaining[most] = False
    experts = [_top_neurons(s.masked_fill(~remaining, -1.0), expert_d_ffn) for s in scores_CN]
    return torch.tensor(sorted(shared)), experts


def _top_neurons(score_N: torch.Tensor, n: int) -> torch.Tensor:
    return torch.topk(score_N, n).indices.sort().values


# --- shared machinery ---------------------------------------------------------------------------
def _moe_config(dense_cfg: ModelConfig, n_experts, top_k, layers, moe_options) -> ModelConfig:
    """The dense config with MoE layers; ModelConfig itself validates n_experts and top_k."""
    if dense_cfg.is_moe:
        raise ValueError(f"n_experts={dense_cfg.n_experts}: the model is already an MoE; "
                         "scale-out starts from a dense model")
    if n_experts == 0:  # a valid ModelConfig (a dense one), but not a scale-out
        raise ValueError("n_experts=0: scale-out needs at least one expert")
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers={layers!r}: must be one of {', '.join(LAYER_CHOICES)}")
    for name in moe_options:
        if name not in MOE_OPTIONS:
            raise ValueError(f"{name}={moe_options[name]!r}: not an MoE option; "
                             f"choose from {', '.join(MOE_OPTIONS)}")
    return dense_cfg.replace(n_experts=n_experts, top_k=top_k, moe_layer_freq=LAYER_CHOICES[layers],
                             **moe_options)


def _moe_layer_ids(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]


def _routers(cfg: ModelConfig, router_std: float, router_init: str, seed: int) -> dict:
    """Each MoE layer's new router weight (E, D), N(0, std), drawn in layer order."""
    std = router_init_std(router_std, router_init)
    generator = torch.Generator().manual_seed(seed)
    return {i: torch.randn(cfg.n_experts, cfg.d_model, generator=generator) * std
            for i in _moe_layer_ids(cfg)}


@dataclass(frozen=True)
class ExpertPlan:
    """Per MoE layer: the dense FFN neurons of expert e (experts[layer][e]) and of the shared
    expert (shared[layer]), and the new router."""

    cfg: ModelConfig
    experts: dict
    shared: dict
    routers: dict


_EXPERT_WEIGHTS = {"w_gate_EDF": "gate_proj", "w_up_EDF": "up_proj", "w_down_EFD": "down_proj"}


def expert_tensor(plan: ExpertPlan, name: str, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """MoE tensor `name`, cut from the dense model's tensors (a state dict, or a file read on
    demand): an expert of neurons idx is rows idx of gate_proj and up_proj and columns idx of
    down_proj (LLaMA-MoE's convert_llama_moe.py), stored (in, out)."""
    if name in dense:  # attention, norms, embeddings, head, MLPs that stay dense
        return dense[name]
    _, layer, _, rest = name.split(".", 3)  # layers.{i}.mlp.{rest}
    i, mlp = int(layer), f"layers.{layer}.mlp."
    dtype = dense[mlp + "gate_proj.weight"].dtype
    if rest == "router.weight":
        return plan.routers[i].to(dtype)
    if rest == "router_noise.weight":  # W_noise starts at zero (minimoe/moe.py)
        return torch.zeros(plan.cfg.n_experts, plan.cfg.d_model, dtype=dtype)
    if rest.startswith("shared."):
        proj = rest.split(".")[1]
        weight, idx = dense[f"{mlp}{proj}.weight"], plan.shared[i]
        return weight[:, idx] if proj == "down_proj" else weight[idx]
    proj = _EXPERT_WEIGHTS[rest]
    weight = dense[f"{mlp}{proj}.weight"]
    if proj == "down_proj":  # (D, F) columns -> (F_e, D)
        return torch.stack([weight[:, idx].T for idx in plan.experts[i]])
    return torch.stack([weight[idx].T for idx in plan.experts[i]])  # (F, D) rows -> (D, F_e)


@torch.no_grad()
def build_moe(plan: ExpertPlan, dense: Transformer) -> Transformer:
    """A new MoE Transformer whose every tensor is `expert_tensor` of the dense model's."""
    ref = next(dense.parameters())
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the global RNG
        moe = build_model(plan.cfg, device=ref.device, dtype=ref.dtype)
    source = dense.state_dict()
    for name, tensor in moe.state_dict().items():
        tensor.copy_(expert_tensor(plan, name, source))
    return moe.train(dense.training)
