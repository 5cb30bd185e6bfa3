"""Scale-Up: grow a trained dense model wider and deeper (AquilaMoE §2.2, arXiv 2408.06567).

Width: bert2BERT's FPI and AKI, and AKI-Pro's rule for grouped-query attention; depth: stack,
stack-top, interpolate or identity. `grow_tensor` makes each target tensor from the few source
tensors it needs, in memory (`grow_model`) or between files (`grow_checkpoint`). Sources and
our choices where the papers are silent: docs/method.md#scale-up-width."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Mapping

import torch

from minimoe.config import ModelConfig
from minimoe.model import Transformer, build_model
from minimoe.stream import transform_file

METHODS = ("fpi", "aki", "aki-pro")
DEPTHS = ("stack", "stack-top", "interpolate", "identity")
MAPPINGS = ("cyclic", "random")
KV_OPTIONS = ("keep", "mean-pool")


# --- the operators on tensors ----------------------------------------------------------------
# A weight is (out, in), as in nn.Linear. rows[j] is the source row that target row j copies;
# cols[i] the source column of target column i, and col_copies[i] how often that source
# column is copied (the original included).
def fpi(weight: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None,
        col_copies: torch.Tensor | None) -> torch.Tensor:
    """bert2BERT's EXPN(W; g_in, g_out): copy rows (eq. 8); copy columns and divide each by
    its copy count (eq. 7), so a neuron copied C times and read C times still sums once."""
    grown = weight if rows is None else weight[rows]
    if cols is not None:
        grown = grown[:, cols]
        # in place (the indexing made a new tensor), in the weight's dtype: copy counts are
        # small integers, exact in any float type, and bf16 / bf16 is 15x faster than mixed
        grown.div_(col_copies.to(grown.dtype))
    return grown


def aki(weight: torch.Tensor, weight_above: torch.Tensor, rows: torch.Tensor,
        new_rows: torch.Tensor, cols: torch.Tensor | None,
        col_copies: torch.Tensor | None) -> torch.Tensor:
    """bert2BERT's AKI (AquilaMoE eq. 2): as fpi, but a *new* output neuron j (new_rows[j]) takes
    row rows[j] of the layer above, column-expanded: W = [w1; w2; w3] and W_above = [v1; v2; v3]
    grow to [w1; w2; w3; v1]."""
    grown = fpi(weight, rows, cols, col_copies)
    grown[new_rows] = fpi(weight_above, rows[new_rows], cols, col_copies)
    return grown


def mean_pool_heads(weight: torch.Tensor, pool: int, head_dim: int) -> torch.Tensor:
    """Fewer KV heads: target head h is the mean of source heads h*pool .. h*pool+pool-1
    (GQA uptraining, Ainslie et al. 2023 §2.1), whose query heads form its group."""
    return weight.unflatten(0, (-1, pool, head_dim)).mean(1).flatten(0, 1)


# --- the maps ---------------------------------------------------------------------------------
def neuron_map(n_source: int, n_target: int, mapping: str, generator: torch.Generator) -> list[int]:
    """g for one dimension: old neurons keep their place; a new one copies a source neuron left to
    right ("cyclic", AquilaMoE Fig. 1: j copies j mod n_source) or at random (bert2BERT's f)."""
    if mapping == "cyclic":
        return [j % n_source for j in range(n_target)]
    new = torch.randint(n_source, (n_target - n_source,), generator=generator).tolist()
    return list(range(n_source)) + new


def depth_map(n_source: int, n_target: int, depth: str) -> list[int]:
    """The source layer each target layer is built from (docs/method.md#depth)."""
    if depth == "stack":
        return [l % n_source for l in range(n_target)]
    if depth == "stack-top":
        whole, rest = divmod(n_target, n_source)
        return list(range(n_source)) * whole + list(range(n_source - rest, n_source))
    return [l * n_source // n_target for l in range(n_target)]  # interpolate and identity


def is_new(g) -> list[bool]:
    """True where g(j) was already copied at an earlier j: the neurons AKI takes from above."""
    seen, new = set(), []
    for source in g:
        new.append(source in seen)
        seen.add(source)
    return new


# --- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrowthPlan:
    """The options and every map of one growth: for each target index, the source index it
    copies. Old neurons keep their place (query heads: within their KV group)."""

    source: ModelConfig
    target: ModelConfig
    method: str
    depth: str
    mapping: str
    seed: int
    kv: str
    d_model_map: tuple[int, ...]   # residual-stream feature j copies source feature g(j)
    d_ffn_map: tuple[int, ...]     # MLP feature
    head_map: tuple[int, ...]      # query head
    kv_head_map: tuple[int, ...]   # KV head (of the pooled source heads when kv_pool > 1)
    kv_pool: int                   # mean-pool: each pooled KV head averages this many source heads
    layer_map: tuple[int, ...]     # target layer l is built from source layer layer_map[l]
    zeroed_layers: tuple[int, ...]  # identity depth: layers whose o_proj and down_proj are zero

    @functools.cached_property
    def axes(self) -> dict[str, "_Axis"]:
        """The width maps as index tensors, built once per plan."""
        hd = self.source.head_dim
        return {"d_model": _Axis.of(self.d_model_map), "d_ffn": _Axis.of(self.d_ffn_map),
                "heads": _Axis.of(self.head_map, hd), "kv_heads": _Axis.of(self.kv_head_map, hd)}


def plan_growth(source: ModelConfig, target: ModelConfig, method: str = "fpi",
                depth: str | None = None, mapping: str = "cyclic", seed: int = 0,
                kv: str = "keep") -> GrowthPlan:
    """Check the request and draw every map; `depth=None`: interpolate for aki-pro, else stack."""
    depth = depth or ("interpolate" if method == "aki-pro" else "stack")
    _check(source, target, method, depth, mapping, kv)
    generator = torch.Generator().manual_seed(seed)
    d_model_map = neuron_map(source.d_model, target.d_model, mapping, generator)
    d_ffn_map = neuron_map(source.d_ffn, target.d_ffn, mapping, generator)

    kv_s, kv_t = source.n_kv_heads, target.n_kv_heads
    if kv_s != kv_t and kv_s == source.n_heads and kv_t == target.n_heads:
        # multi-head on both sides: plain bert2BERT, a K and V head travel with their query head
        head_map = neuron_map(source.n_heads, target.n_heads, mapping, generator)
        kv_head_map, kv_pool = head_map, 1
    else:
        # GQA (AquilaMoE §2.2.1): the groups stay; each is a multi-head block growing its own
        # queries. With mean-pool the source is first regrouped into the target's kv_t groups.
        kv_pool = kv_s // kv_t
        per_group_s, per_group_t = source.n_heads // kv_t, target.n_heads // kv_t
        head_map = []
        for group in range(kv_t):
            local = neuron_map(per_group_s, per_group_t, mapping, generator)
            head_map += [group * per_group_s + h for h in local]
        kv_head_map = list(range(kv_t))

    layer_map = depth_map(source.n_layers, target.n_layers, depth)
    zeroed = [l for l, dup in enumerate(is_new(layer_map)) if dup] if depth == "identity" else []
    return GrowthPlan(source, target, method, depth, mapping, seed, kv,
                      tuple(d_model_map), tuple(d_ffn_map), tuple(head_map), tuple(kv_head_map),
                      kv_pool, tuple(layer_map), tuple(zeroed))


def _check(source: ModelConfig, target: ModelConfig, method, depth, mapping, kv):
    for option, value, choices in (("method", method, METHODS), ("depth", depth, DEPTHS),
                                   ("mapping", mapping, MAPPINGS), ("kv", kv, KV_OPTIONS)):
        if value not in choices:
            raise ValueError(f"{option}={value!r}: must be one of {', '.join(choices)}")
    for name, cfg in (("source", source), ("target", target)):
        if cfg.is_moe:
            raise ValueError(f"{name}.n_experts={cfg.n_experts}: scale-up grows dense models "
                             "(Scale-Out upcycles afterwards)")
        if cfg.tie_embeddings:
            raise ValueError(f"{name}.tie_embeddings=True: scale-up needs an untied LM head "
                             "(the embedding copies, the head divides)")
    # each of these changes what the model computes, so a growth cannot preserve it
    for field in ("vocab_size", "qkv_bias", "rope_theta", "norm_eps"):
        if getattr(target, field) != getattr(source, field):
            raise ValueError(f"target.{field}={getattr(target, field)!r}: must equal "
                             f"source {field}={getattr(source, field)!r}")
    for field in ("n_layers", "d_model", "n_heads", "d_ffn"):
        if getattr(target, field) < getattr(source, field):
            raise ValueError(f"target.{field}={getattr(target, field)}: must be >= "
                             f"source {field}={getattr(source, field)}")
    if target.head_dim != source.head_dim:
        raise ValueError(f"target.head_dim={target.head_dim} (d_model/n_heads): must equal source "
                         f"head_dim={source.head_dim}; a head is one neuron and keeps its size")
    kv_s, kv_t = source.n_kv_heads, target.n_kv_heads
    mha = kv_s == source.n_heads and kv_t == target.n_heads
    if kv_s == kv_t or mha:
        return
    if kv != "mean-pool":
        raise ValueError(f"target.n_kv_heads={kv_t}: must equal source n_kv_heads={kv_s} "
                         "(AKI-Pro keeps the KV groups); kv='mean-pool' averages KV heads instead")
    if kv_t > kv_s or kv_s % kv_t:
        raise ValueError(f"target.n_kv_heads={kv_t}: kv='mean-pool' needs it to divide source "
                         f"n_kv_heads={kv_s}")


# --- state-dict names: which tensors, which maps ----------------------------------------------
@dataclass
class _Axis:
    """A width map at element level: position j of the target copies position index[j]."""

    index: torch.Tensor   # (n_target,) long
    copies: torch.Tensor  # (n_target,) how often index[j] is copied; readers divide by it
    new: torch.Tensor     # (n_target,) bool: not the first copy, so AKI takes it from above

    @staticmethod
    def of(g, size: int = 1) -> "_Axis":
        """A neuron map g; each neuron spans `size` elements (head_dim for heads)."""
        g = torch.tensor(g, dtype=torch.long)
        copies = torch.bincount(g)[g].float()
        new = torch.tensor(is_new(g.tolist()))
        index = (g[:, None] * size + torch.arange(size)).flatten()  # every element of a neuron
        return _Axis(index, copies.repeat_interleave(size), new.repeat_interleave(size))


# which width map runs along the output (rows) and the input (columns) of each layer weight
_AXES = {
    "attn.q_proj.weight": ("heads", "d_model"), "attn.q_proj.bias": ("heads", None),
    "attn.k_proj.weight": ("kv_heads", "d_model"), "attn.k_proj.bias": ("kv_heads", None),
    "attn.v_proj.weight": ("kv_heads", "d_model"), "attn.v_proj.bias": ("kv_heads", None),
    "attn.o_proj.weight": ("d_model", "heads"),
    "mlp.gate_proj.weight": ("d_ffn", "d_model"), "mlp.up_proj.weight": ("d_ffn", "d_model"),
    "mlp.down_proj.weight": ("d_model", "d_ffn"),
}
_ZEROED = ("attn.o_proj.weight", "mlp.down_proj.weight")  # identity depth: LLaMA-Pro's choice


def source_name(plan: GrowthPlan, name: str) -> str:
    """The source tensor that target tensor `name` is grown from (its layer via the depth map)."""
    if not name.startswith("layers."):
        return name
    _, layer, rest = name.split(".", 2)
    return f"layers.{plan.layer_map[int(layer)]}.{rest}"


def grow_tensor(plan: GrowthPlan, name: str, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Target tensor `name`, built from the few tensors of `source` it needs."""
    d_model = plan.axes["d_model"]
    if name == "embed.weight":  # (vocab, d_model): a token's vector is written, not read
        return source[name][:, d_model.index]
    if name == "lm_head.weight":  # reads the residual stream: divided
        return fpi(source[name], None, d_model.index, d_model.copies)
    if name.endswith("norm.weight"):
        # a norm weight scales one feature; it sums nothing, so copies are not divided
        return source[source_name(plan, name)][d_model.index]

    _, layer, rest = name.split(".", 2)
    out, inp = (plan.axes[a] if a else None for a in _AXES[rest])
    cols, col_copies = (inp.index, inp.copies) if inp is not None else (None, None)
    here = plan.layer_map[int(layer)]
    above = here + 1
    if plan.method == "fpi" or above == plan.source.n_layers:  # the top layer stays FPI
        grown = fpi(_read(plan, source, here, rest), out.index, cols, col_copies)
    else:
        grown = aki(_read(plan, source, here, rest), _read(plan, source, above, rest),
                    out.index, out.new, cols, col_copies)
    if int(layer) in plan.zeroed_layers and rest in _ZEROED:
        grown.zero_()
    return grown


def _read(plan: GrowthPlan, source, layer: int, rest: str) -> torch.Tensor:
    weight = source[f"layers.{layer}.{rest}"]
    if plan.kv_pool > 1 and rest.startswith(("attn.k_proj", "attn.v_proj")):
        weight = mean_pool_heads(weight, plan.kv_pool, plan.source.head_dim)
    return weight


# --- whole models and checkpoints -------------------------------------------------------------
def grow_state_dict(plan: GrowthPlan, source: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    names = build_model(plan.target, device="meta").state_dict()
    return {name: grow_tensor(plan, name, source) for name in names}


def grow_model(plan: GrowthPlan, model: Transformer) -> Transformer:
    """A new Transformer of plan.target grown from `model` (left untouched) by `plan`."""
    grown = build_model(plan.target, device="meta")  # no random init to throw away
    grown.load_state_dict(grow_state_dict(plan, model.state_dict()), assign=True)
    return grown


def scale_up(model: Transformer, target: ModelConfig, method: str = "fpi",
             **options) -> Transformer:
    """A Transformer of config `target` grown from `model` (untouched); options: plan_growth's."""
    return grow_model(plan_growth(model.cfg, target, method, **options), model)


def growth_report(plan: GrowthPlan) -> dict:
    """What a growth did, JSON-ready: parameter counts, the options and every map."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(plan).items()}
    return {"source_params": plan.source.param_counts()["total"],
            "target_params": plan.target.param_counts()["total"], **fields}


def grow_checkpoint(src_path, src_cfg: ModelConfig, tgt_cfg: ModelConfig, out_path,
                    **options) -> tuple[GrowthPlan, int]:
    """Growth between .safetensors files, one tensor in memory at a time: (plan, bytes written)."""
    plan = plan_growth(src_cfg, tgt_cfg, **options)
    written = transform_file(src_path, src_cfg, out_path, plan.target,
                             lambda name, source: grow_tensor(plan, name, source),
                             lambda source, name: source.dtype(source_name(plan, name)))
    return plan, written
