"""The Mixture-of-Experts layer that takes the MLP slot of a Block on Scale-Out: each token goes
to its top-k of E SwiGLU experts, gate-weighted (AquilaMoE §2.3: E=8, k=2); the options and
their sources: docs/method.md#the-moe-layer.

Shape suffixes: T tokens, D model dim, E experts, K = top_k, F expert width, S token-expert
pairs. Expert weights are stacked (E, D, F), the `x @ W` layout `F.grouped_mm` takes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from minimoe.checks import check_fields
from minimoe.config import ModelConfig

GROUPED_MM = True  # False forces the per-expert loop (benchmarks, debugging)
NOISE_EPSILON = 1e-2  # LLaMA-MoE's gate_noise_epsilon: the noise std floor (its released configs)
# The dtypes torch's grouped_mm takes: on CPU (torch 2.13: float64 raises "Expected mat_a to be
# Float32, BFloat16 or Float16"), on CUDA bf16 on sm80+ (its docstring); else the expert loop.
GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}
AUX_NAMES = ("balance", "z", "max_z", "cv2")


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ffn, bias=False)
        self.up_proj = nn.Linear(d_model, d_ffn, bias=False)
        self.down_proj = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Routing(NamedTuple):
    """One forward's routing decision."""

    logits_TE: torch.Tensor  # clean router logits (the z-losses act on these)
    route_logits_TE: torch.Tensor  # the logits the choice was made on (noisy when training)
    noise_std_TE: torch.Tensor | None  # std of the added noise; None without noise
    probs_TE: torch.Tensor  # full softmax of route_logits (the balance loss uses it, Megatron)
    weight_TK: torch.Tensor  # combine weights of the chosen experts
    idx_TK: torch.Tensor  # the chosen experts


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (plus an optional shared expert): (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        E, D, F_ = cfg.n_experts, cfg.d_model, cfg.expert_d_ffn
        self.router = nn.Linear(D, E, bias=False)
        # W_noise of noisy top-k gating; zero-initialised, so the noise std starts at
        # softplus(0) + 0.01 = 0.703 for every expert (LLaMA-MoE's TopKBalancedNoisyGate)
        self.router_noise = nn.Linear(D, E, bias=False) if cfg.router_noise else None
        self.w_gate_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.w_up_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.w_down_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.shared = MLP(D, cfg.shared_d_ffn) if cfg.shared_d_ffn else None
        self.aux: dict[str, torch.Tensor] = {}
        self.register_buffer("load_E", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("dropped_E", torch.zeros(E, dtype=torch.long), persistent=False)
        # The one seam for parallelism, set from outside: a callable (moe, x_SD, count_E) -> y_SD
        # that replaces `experts` (expert parallelism sends each pair to the rank holding its
        # expert and back, minimoe/expert_parallel.py); None runs this layer's own experts.
        self.expert_runner = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, fill=None):
        """Experts and router N(0, init_std), W_noise zero, through reset_parameters' `fill`
        (how we read the paper's router "variance 0.02": router_init_std)."""
        fill = fill or (lambda param, draw, rows=None: draw(param))
        for w in (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD, self.router.weight):
            fill(w, lambda t: t.normal_(0.0, self.cfg.init_std))
        if self.router_noise is not None:
            fill(self.router_noise.weight, torch.Tensor.zero_)

    # --- routing ----------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor) -> Routing:
        """Pick each token's experts and their combine weights."""
        logits_TE = self.router(x_TD).float()  # routing in float32, as Mixtral does
        route_logits_TE, noise_std_TE = logits_TE, None
        if self.router_noise is not None and self.training:
            noise_std_TE = F.softplus(self.router_noise(x_TD).float()) + NOISE_EPSILON
            route_logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        probs_TE = route_logits_TE.softmax(dim=-1)
        if self.cfg.gate == "softmax-topk":
            top_probs_TK, idx_TK = probs_TE.topk(self.top_k, dim=-1)
            weight_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True)
        else:  # "topk-softmax"
            top_logits_TK, idx_TK = route_logits_TE.topk(self.top_k, dim=-1)
            weight_TK = top_logits_TK.softmax(dim=-1)
        return Routing(logits_TE, route_logits_TE, noise_std_TE, probs_TE, weight_TK, idx_TK)

    def capacity(self, n_tokens: int) -> int:
        """Most token-expert pairs one expert takes: ceil(cf * T * k / E) (Megatron's rule)."""
        return math.ceil(self.cfg.capacity_factor * n_tokens * self.top_k / self.n_experts)

    # --- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x_TD = x.reshape(-1, D)
        n_tokens = x_TD.shape[0]
        routing = self.route(x_TD)
        self._record_aux(routing)

        # Sort the T*K (token, expert) pairs by expert, so each expert's tokens are one
        # contiguous slice; a stable sort keeps token order inside an expert, which is the
        # arrival order the capacity rule below drops by.
        expert_S = routing.idx_TK.reshape(-1)
        order_S = torch.argsort(expert_S, stable=True)
        count_E = expert_counts(expert_S, self.n_experts)
        if self.cfg.capacity_factor > 0:
            order_S, kept_E = self._drop_over_capacity(order_S, expert_S, count_E, n_tokens)
        else:
            kept_E = count_E
        self.dropped_E = (count_E - kept_E).detach()
        token_S = order_S // self.top_k  # pair s = token * K + slot
        gate_S = routing.weight_TK.reshape(-1)[order_S].to(x.dtype) * self.cfg.expert_scale

        x_SD = x_TD[token_S]  # one gather of every routed token, already in expert order
        if self.expert_runner is None:
            y_SD = self.experts(x_SD, kept_E)
        else:
            y_SD = self.expert_runner(self, x_SD, kept_E)
        y_SD = y_SD.to(x.dtype) * gate_S[:, None]  # bf16 under autocast
        out = x.new_zeros(B, T, D)  # not a view: FSDP2 hooks a unit's output for backward
        out.view(n_tokens, D).index_add_(0, token_S, y_SD)
        return out if self.shared is None else out + self.shared(x)

    def _drop_over_capacity(self, order_S, expert_S, count_E, n_tokens):
        """Keep each expert's first `capacity` pairs in token order (Megatron's "position" policy)."""
        capacity = self.capacity(n_tokens)
        start_E = torch.cumsum(count_E, 0) - count_E  # where each expert's slice begins
        sorted_expert_S = expert_S[order_S]
        rank_S = torch.arange(len(order_S), device=order_S.device) - start_E[sorted_expert_S]
        return order_S[rank_S < capacity], count_E.clamp(max=capacity)

    def experts(self, x_SD: torch.Tensor, count_E: torch.Tensor) -> torch.Tensor:
        """Run expert e on its slice of x_SD (rows sorted by expert, count_E[e] of them)."""
        return expert_ffn(x_SD, count_E, self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD)

    # --- auxiliary losses and statistics -----------------------------------------------
    def _record_aux(self, r: Routing):
        logits_TE, probs_TE, weight_TK, idx_TK = r.logits_TE, r.probs_TE, r.weight_TK, r.idx_TK
        T, E, K = logits_TE.shape[0], self.n_experts, self.top_k
        load_E = expert_counts(idx_TK.reshape(-1), E)
        self.load_E = load_E.detach()
        # Switch load balancing in its top-k form (Megatron's switch_load_balancing_loss_func):
        # E/(T*K) * sum_e mean_prob_e * count_e, 1 under perfectly balanced routing
        balance = E / (T * K) * (probs_TE.mean(0) * load_E.to(probs_TE.dtype)).sum()
        # LLaMA-MoE: importance = the combine weights summed per expert (moe_gates.py)
        importance_E = torch.zeros(E, device=weight_TK.device, dtype=weight_TK.dtype)
        importance_E = importance_E.scatter_add(0, idx_TK.reshape(-1), weight_TK.reshape(-1))
        self.aux = {
            "balance": balance,
            "z": z_loss(logits_TE),
            "max_z": max_z_loss(logits_TE),
            "cv2": cv_squared(importance_E) + cv_squared(self._smooth_load(r, load_E)),
        }

    def _smooth_load(self, r: Routing, load_E):
        """Load per expert; with noise (training) Shazeer's differentiable estimate,
        sum_t Phi((clean_e - threshold) / noise_std_e) (docs/method.md#auxiliary-losses)."""
        if r.noise_std_TE is None or self.top_k >= self.n_experts:
            return load_E.float()
        K, noisy_TE = self.top_k, r.route_logits_TE
        top_TK1 = noisy_TE.topk(K + 1, dim=-1).values
        threshold_if_in_T1 = top_TK1[:, K:K + 1]  # e is in the top k: it must beat the (k+1)-th
        threshold_if_out_T1 = top_TK1[:, K - 1:K]  # e is out: it must beat the k-th
        is_in_TE = noisy_TE > threshold_if_in_T1
        p_in_TE = torch.special.ndtr((r.logits_TE - threshold_if_in_T1) / r.noise_std_TE)  # Phi
        p_out_TE = torch.special.ndtr((r.logits_TE - threshold_if_out_T1) / r.noise_std_TE)
        return torch.where(is_in_TE, p_in_TE, p_out_TE).sum(0)


def expert_counts(expert_S: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Pairs per expert, without a device-to-host copy (bincount syncs to size its output)."""
    count_E = torch.zeros(n_experts, dtype=expert_S.dtype, device=expert_S.device)
    return count_E.scatter_add_(0, expert_S, torch.ones_like(expert_S))


def to_host(count: torch.Tensor, total: int) -> list[int]:
    """Split sizes on the host: the one device-to-host copy of an MoE layer (torchtitan's one).
    Fake counts (the full-size dry run) have no values: `total` pairs split evenly."""
    if isinstance(count, FakeTensor):
        n = count.numel()
        return [total // n + (i < total % n) for i in range(n)]
    return count.tolist()


def expert_ffn(x_SD: torch.Tensor, count_E: torch.Tensor, w_gate_EDF: torch.Tensor,
               w_up_EDF: torch.Tensor, w_down_EFD: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert e on rows count_E[e] of x_SD (sorted by expert), for any stack of E experts:
    a layer's own, or the slice one expert-parallel rank holds."""
    if _grouped_mm_usable(x_SD, w_gate_EDF):
        # one kernel per projection for all experts, and no host sync
        offs_E = count_E.cumsum(0).to(torch.int32)  # where each expert's rows end
        x_SD = x_SD.to(w_gate_EDF.dtype)
        h_SF = (F.silu(F.grouped_mm(x_SD, w_gate_EDF, offs=offs_E))
                * F.grouped_mm(x_SD, w_up_EDF, offs=offs_E))
        return F.grouped_mm(h_SF, w_down_EFD, offs=offs_E)
    # A loop over experts (not tokens): matmuls on views of the sorted tokens, no copies.
    # unbind, not w[e]: the backward of w[e] writes a full (E, D, F) zero tensor per
    # expert, unbind's stacks the E gradients once.
    outs = []
    weights = zip(w_gate_EDF.unbind(0), w_up_EDF.unbind(0), w_down_EFD.unbind(0))
    for x_ND, (w_gate_DF, w_up_DF, w_down_FD) in zip(x_SD.split(to_host(count_E, len(x_SD))),
                                                     weights):
        outs.append((F.silu(x_ND @ w_gate_DF) * (x_ND @ w_up_DF)) @ w_down_FD)
    return torch.cat(outs)


def _grouped_mm_usable(x_SD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    """torch's grouped matmul wants 16-byte-aligned strides and one of GROUPED_MM_DTYPES, knows
    no autocast, and on CUDA needs sm80+."""
    device, dtype = x_SD.device.type, w_EDF.dtype
    # float64 (or an unknown device) would raise inside the kernel
    if not (GROUPED_MM and hasattr(F, "grouped_mm")) or dtype not in GROUPED_MM_DTYPES.get(device, ()):
        return False
    if torch.is_autocast_enabled(device) or not w_EDF.is_contiguous() or len(x_SD) == 0:
        return False
    # torch 2.13's meta kernel of grouped_mm, which compile and fake tensors run, takes bf16 only
    if torch.compiler.is_compiling() or (isinstance(w_EDF, FakeTensor) and dtype != torch.bfloat16):
        return False
    if device == "cuda" and torch.cuda.get_device_capability(x_SD.device) < (8, 0):
        return False
    per_16_bytes = 16 // w_EDF.element_size()
    E, D, F_ = w_EDF.shape
    return D % per_16_bytes == 0 and F_ % per_16_bytes == 0


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (ST-MoE eq. 5)."""
    return logits.float().logsumexp(dim=-1).square().mean()


def max_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Baichuan 2's max-z loss (eq. 1): the squared maximum logit, averaged over tokens."""
    return logits.float().amax(dim=-1).square().mean()


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var / mean^2 (unbiased var, as LLaMA-MoE computes it)."""
    x = x.float()
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var() / (x.mean().square() + 1e-10)


def router_init_std(value: float = 0.02, convention: str = "std") -> float:
    """The router's init std from the paper's "variance of 0.02" read as a std (the default,
    Megatron/FlagScale's init_method_std) or literally (docs/method.md#router-initialisation)."""
    if convention == "std":
        return value
    if convention == "variance":
        return math.sqrt(value)
    raise ValueError(f"router init convention={convention!r}: must be 'std' or 'variance'")


# --- collecting over a model's MoE layers -----------------------------------------------
def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each raw auxiliary loss of the last forward, SUMMED over the MoE layers as Megatron and
    LLaMA-MoE do (so a perfectly balanced "balance" is n_moe_layers, not 1)."""
    layers = moe_layers(model)
    if not layers or not layers[0].aux:
        return {}
    return {name: torch.stack([m.aux[name] for m in layers]).sum() for name in AUX_NAMES}


def expert_load(model: nn.Module) -> torch.Tensor:
    """Token-expert pairs the router sent to each expert in the last forward: (n_moe_layers, E)."""
    rows = [m.load_E for m in moe_layers(model)]
    return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.long)  # a dense model


@dataclass
class AuxLossConfig:
    """Coefficients of the auxiliary losses; the defaults are AquilaMoE's (§2.3)."""

    balance: float = 0.001  # Switch/Megatron load balancing
    z: float = 0.0  # ST-MoE router z-loss (not in AquilaMoE; ST-MoE: 0.001)
    max_z: float = 0.01  # Baichuan 2 max-z loss
    max_z_on: str = "router"  # or "lm_head": on the LM-head logits passed to `total`
    cv2: float = 0.0  # LLaMA-MoE's CV^2(importance) + CV^2(load) (LLaMA-MoE: 0.01)

    def __post_init__(self):
        check_fields("AuxLossConfig", self, {**dict.fromkeys(("balance", "z", "max_z", "cv2"), ">=0"),
                                             "max_z_on": ("router", "lm_head")})

    def total(self, model: nn.Module, logits: torch.Tensor | None = None):
        """(loss to add to the LM loss, {name: raw uncoefficiented value, detached} to log)."""
        raw = aux_losses(model)
        if self.max_z_on == "lm_head":
            if logits is None:
                raise ValueError("AuxLossConfig.max_z_on='lm_head': total() needs the model's logits")
            raw["max_z"] = max_z_loss(logits)
        device = logits.device if logits is not None else next(model.parameters()).device
        loss = torch.zeros((), device=device)
        for name, value in raw.items():
            coefficient = getattr(self, name)
            if coefficient:
                loss = loss + coefficient * value
        return loss, {name: value.detach() for name, value in raw.items()}
