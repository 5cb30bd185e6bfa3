"""The hardware catalogue: peak compute, memory, links, power and price of a GPU, each with its
source (`Device.sources`, docs/simulator.md "Hardware"). Every figure is a default to override
(`get_device("h100", price_per_hour=3.99)`, or a `[devices.NAME]` table in a scenario file).
Bandwidths are per GPU and per direction, bytes/s; a link delivers `*_eff` of its peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from minimoe.checks import check, check_fields, known_keys

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense BF16 tensor-core FLOP/s (no 2:4 sparsity)
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    intra_node_bw: float  # NVLink, bytes/s per GPU per direction
    inter_node_bw: float  # network, bytes/s per GPU per direction
    power_w: float  # board power (TDP), watts
    price_per_hour: float  # $ per GPU-hour
    gpus_per_node: int = 8
    intra_node_eff: float = 0.65
    inter_node_eff: float = 0.9
    sms: int = 132  # streaming multiprocessors: GEMM tiles run in waves of this many
    exp_per_s: float = 3.9e12  # special-function (exp) throughput: the softmax's ceiling
    peak_fp8_flops: float = 0.0  # dense FP8 tensor-core FLOP/s; 0 where the chip has none
    sources: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        check_fields(f"device {self.name}", self, DEVICE_RULES)

    def replace(self, **changes) -> "Device":
        sources = dict(self.sources)
        for key in changes:
            sources[key] = "user override"
        return dataclasses.replace(self, sources=sources, **changes)

    def table(self) -> list[dict]:
        """Each figure with its source, for printing."""
        return [{"field": f.name, "value": getattr(self, f.name),
                 "source": self.sources.get(f.name, "")}
                for f in dataclasses.fields(self) if f.name not in ("name", "sources")]


DEVICE_RULES = {  # minimoe/checks.py
    **dict.fromkeys(("peak_flops", "hbm_bytes", "hbm_bw", "intra_node_bw", "inter_node_bw",
                     "power_w"), ">0"),
    "gpus_per_node": "int>0", "sms": "int>0", "price_per_hour": ">=0", "exp_per_s": ">0",
    "peak_fp8_flops": ">=0", "intra_node_eff": "(0, 1]", "inter_node_eff": "(0, 1]",
}
_CALCULON = "Calculon (calculon-ai/calculon) systems/h100_80g_nvl8.json link efficiency"
_GK = "glennklockwood.com/garden/processors/"
_IB_NDR = "ConnectX-7 NDR 400 Gb/s = 50 GB/s, one NIC per GPU on HGX/DGX H100 nodes (NVIDIA DGX H100 user guide)"
_IB_HDR = "HDR InfiniBand 200 Gb/s = 25 GB/s per NIC, one per GPU (NVIDIA DGX A100 user guide)"
_DEEPSEEK = "DeepSeek-V3 report (arXiv 2412.19437 §3.2.2) and deepseek-ai/DeepEP docs"
# 16 exp results per clock per SM on sm_80 and sm_90 (CUDA C++ Programming Guide, arithmetic
# instruction throughput), x SMs x the clock at which the BF16 peak is quoted
_EXP = "16/clock/SM (CUDA Programming Guide throughput table) x SMs x clock of the BF16 peak"
_FA3 = "3.9 TFLOPS of special functions on H100 SXM5 (FlashAttention-3, arXiv 2407.08608 §3.1)"

CATALOGUE: dict[str, Device] = {
    "a100": Device(
        "a100", 312 * TFLOPS, 80 * GB, 2039 * GB, 300 * GB, 25 * GB, 400, 1.99,
        sms=108, exp_per_s=16 * 108 * 1.41e9,
        sources={
            "peak_flops": f"312 TFLOPS BF16 dense, NVIDIA A100 datasheet ({_GK}A100)",
            "hbm_bytes": f"80 GB HBM2e, NVIDIA A100 datasheet ({_GK}A100)",
            "hbm_bw": f"2,039 GB/s, NVIDIA A100 datasheet ({_GK}A100)",
            "intra_node_bw": "NVLink3 600 GB/s bidirectional = 300 per direction, NVIDIA A100 datasheet",
            "inter_node_bw": _IB_HDR,
            "power_w": "400 W SXM TDP, NVIDIA A100 datasheet",
            "price_per_hour": "midpoint of $1.49-2.49 on tier-2 clouds, pricegpu.pages.dev, early 2026",
            "intra_node_eff": _CALCULON, "inter_node_eff": _CALCULON,
            "sms": "108 SMs, NVIDIA A100 Tensor Core GPU Architecture whitepaper",
            "exp_per_s": f"{_EXP} (108 x 1.41 GHz)", "peak_fp8_flops": "no FP8 tensor cores"}),
    "a800": Device(
        "a800", 312 * TFLOPS, 80 * GB, 2039 * GB, 200 * GB, 25 * GB, 400, 1.99,
        sms=108, exp_per_s=16 * 108 * 1.41e9,
        sources={
            "peak_flops": "the A100's GA100 compute, unchanged (NVIDIA statement to Reuters, 2022-11-07; tweakers.net/nieuws/203182)",
            "hbm_bytes": "80 GB HBM2e, as A100 (same source)", "hbm_bw": "as A100 (same source)",
            "intra_node_bw": "NVLink cut to 400 GB/s bidirectional = 200 per direction (NVIDIA statement to Reuters, 2022-11-07)",
            "inter_node_bw": _IB_HDR,
            "power_w": "400 W SXM, as A100 (tweakers.net/nieuws/203182)",
            "price_per_hour": "assumed equal to A100: no public rental price",
            "intra_node_eff": _CALCULON, "inter_node_eff": _CALCULON, "sms": "as A100 (108)",
            "exp_per_s": "as A100", "peak_fp8_flops": "no FP8 tensor cores"}),
    "h100": Device(
        "h100", 989.4 * TFLOPS, 80 * GB, 3350 * GB, 450 * GB, 50 * GB, 700, 2.49,
        peak_fp8_flops=1978.9 * TFLOPS,
        sources={
            "peak_flops": f"989.4 TFLOPS BF16 dense, NVIDIA H100 SXM datasheet ({_GK}h100)",
            "hbm_bytes": f"80 GB HBM3, NVIDIA H100 SXM datasheet ({_GK}h100)",
            "hbm_bw": f"3.35 TB/s, NVIDIA H100 SXM datasheet ({_GK}h100)",
            "intra_node_bw": "NVLink4 900 GB/s bidirectional = 450 per direction, NVIDIA H100 datasheet",
            "inter_node_bw": _IB_NDR,
            "power_w": "700 W SXM TDP, NVIDIA H100 datasheet",
            "price_per_hour": "$2.49 Lambda on-demand (computespec.pages.dev); tier-2 range $2.49-3.99",
            "intra_node_eff": _CALCULON, "inter_node_eff": _CALCULON,
            "sms": "132 SMs, NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5)",
            "exp_per_s": _FA3, "peak_fp8_flops": "1,978.9 TFLOPS FP8 dense, NVIDIA H100 datasheet"}),
    "h800": Device(
        "h800", 989.4 * TFLOPS, 80 * GB, 3350 * GB, 160 * GB, 50 * GB, 700, 2.00,
        intra_node_eff=1.0, peak_fp8_flops=1978.9 * TFLOPS,
        sources={
            "peak_flops": "same GH100 compute as H100 (NVIDIA H800 datasheet; DeepSeek-V3 report arXiv 2412.19437)",
            "hbm_bytes": "80 GB HBM3, as H100", "hbm_bw": "3.35 TB/s, as H100",
            "intra_node_bw": f"~160 GB/s achieved NVLink maximum, {_DEEPSEEK}",
            "inter_node_bw": f"CX7 InfiniBand 400 Gb/s (~50 GB/s), {_DEEPSEEK}",
            "power_w": "assumed equal to H100 SXM (700 W)",
            "price_per_hour": "$2 per H800 GPU-hour, DeepSeek-V3's rental assumption (arXiv 2412.19437 Table 1)",
            "intra_node_eff": "1.0: the 160 GB/s is already an achieved figure",
            "inter_node_eff": _CALCULON, "sms": "as H100", "exp_per_s": "as H100",
            "peak_fp8_flops": "as H100 (DeepSeek-V3 trains in FP8 on H800s)"}),
    "h200": Device(
        "h200", 989.4 * TFLOPS, 141 * GB, 4800 * GB, 450 * GB, 50 * GB, 700, 3.50,
        peak_fp8_flops=1978.9 * TFLOPS,
        sources={
            "peak_flops": "same GH100 die as H100 (NVIDIA H200 product page)",
            "hbm_bytes": "141 GB HBM3e (NVIDIA H200 product page)",
            "hbm_bw": "4.8 TB/s (NVIDIA H200 product page)",
            "intra_node_bw": "NVLink4 900 GB/s bidirectional, as H100",
            "inter_node_bw": _IB_NDR,
            "power_w": "700 W SXM (NVIDIA H200 product page)",
            "price_per_hour": "placeholder, no verified price: override it",
            "intra_node_eff": _CALCULON, "inter_node_eff": _CALCULON, "sms": "as H100",
            "exp_per_s": "as H100", "peak_fp8_flops": "as H100"}),
    "b200": Device(
        "b200", 2250 * TFLOPS, 192 * GB, 8000 * GB, 900 * GB, 50 * GB, 1000, 5.00,
        sms=148, exp_per_s=16 * 148 * 1.86e9, peak_fp8_flops=4500 * TFLOPS,
        sources={
            "peak_flops": f"2,250 TFLOPS BF16 dense, HGX B200 at 1,000 W, {_GK}B200",
            "hbm_bytes": f"192 GB HBM3e, {_GK}B200 (HGX boards expose ~180 GB)",
            "hbm_bw": f"8 TB/s, {_GK}B200",
            "intra_node_bw": f"NVLink5 1.8 TB/s bidirectional = 900 per direction, {_GK}B200",
            "inter_node_bw": _IB_NDR,
            "power_w": f"1,000 W maximum, {_GK}B200",
            "price_per_hour": "placeholder, no verified price: override it",
            "intra_node_eff": _CALCULON, "inter_node_eff": _CALCULON,
            "sms": f"148 SMs, {_GK}B200", "peak_fp8_flops": f"4,500 TFLOPS FP8 dense, {_GK}B200",
            "exp_per_s": f"{_EXP}: an assumption, the clock (1.86 GHz) back-computed from the peak"}),
}
ALIASES = {"a100-80gb": "a100", "a100-sxm-80gb": "a100", "a800-sxm": "a800", "h100-sxm": "h100",
           "h100-sxm-80gb": "h100", "h800-sxm": "h800", "h200-sxm": "h200"}

# What a scenario file may set for a device, and the unit it is written in there.
DEVICE_KEYS = {"peak_tflops": ("peak_flops", TFLOPS), "hbm_gb": ("hbm_bytes", GB),
               "hbm_bw_gbs": ("hbm_bw", GB), "intra_node_bw_gbs": ("intra_node_bw", GB),
               "inter_node_bw_gbs": ("inter_node_bw", GB), "power_w": ("power_w", 1),
               "price_per_hour": ("price_per_hour", 1), "gpus_per_node": ("gpus_per_node", 1),
               "sms": ("sms", 1), "peak_fp8_tflops": ("peak_fp8_flops", TFLOPS),
               "exp_tflops": ("exp_per_s", TFLOPS),
               "intra_node_eff": ("intra_node_eff", 1), "inter_node_eff": ("inter_node_eff", 1)}


def get_device(name: str, catalogue: dict[str, Device] | None = None, **overrides) -> Device:
    """A catalogue device by name (case-insensitive), with optional field overrides."""
    catalogue = CATALOGUE if catalogue is None else catalogue
    key = ALIASES.get(name.lower(), name.lower())
    if key not in catalogue:
        raise ValueError(f"gpu={name!r}: unknown; choose one of {', '.join(catalogue)}")
    device = catalogue[key]
    return device.replace(**overrides) if overrides else device


def device_from_table(name: str, table: dict, where: str,
                      catalogue: dict[str, Device] | None = None) -> Device:
    """A device from a scenario table: `base = "h100"` plus overrides, or every field given.

    Keys are in human units (see DEVICE_KEYS); `where` is the key path used in error messages.
    """
    table = dict(table)
    base = table.pop("base", None)
    known_keys(where, table, set(DEVICE_KEYS) | {"base"})
    values = {}
    for key, value in table.items():
        attr, unit = DEVICE_KEYS[key]
        check(where, key, value, "")
        values[attr] = value * unit
    try:
        if base is not None:
            return get_device(base, catalogue).replace(name=name, **values)
        missing = [k for k in ("peak_tflops", "hbm_gb", "hbm_bw_gbs", "intra_node_bw_gbs",
                               "inter_node_bw_gbs", "power_w", "price_per_hour")
                   if DEVICE_KEYS[k][0] not in values]
        if missing:
            raise ValueError(f"{where}.{missing[0]}: missing (or give base = \"h100\")")
        return Device(name=name, sources={k: "scenario file" for k in values}, **values)
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: {err}") from None
