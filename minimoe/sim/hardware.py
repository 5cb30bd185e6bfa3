"""The device catalogue (devices.toml beside this file, each figure with its source): every figure
a default to override, `get_device("h100", price_per_hour=3.99)` or a scenario's `[devices.NAME]`
table in the catalogue's keys and units (docs/simulator.md "Hardware")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from minimoe import files
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
    inter_node_bw: float  # network, bytes/s per GPU per direction (one NIC per GPU)
    power_w: float  # board power (TDP), watts
    price_per_hour: float  # $ per GPU-hour
    gpus_per_node: int = 8
    intra_node_eff: float = 0.65  # share of a link's peak a collective reaches
    inter_node_eff: float = 0.9
    sms: int = 132  # streaming multiprocessors: GEMM tiles run in waves of this many
    exp_per_s: float = 3.9e12  # special-function (exp) throughput: the softmax's ceiling
    peak_fp8_flops: float = 0.0  # dense FP8 tensor-core FLOP/s; 0 where the chip has none
    sources: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        check_fields(f"device {self.name}", self, DEVICE_RULES)

    def replace(self, **changes) -> "Device":
        sources = {**self.sources, **dict.fromkeys(changes, "user override")}
        return dataclasses.replace(self, sources=sources, **changes)


DEVICE_RULES = {  # minimoe/checks.py
    **dict.fromkeys(("peak_flops", "hbm_bytes", "hbm_bw", "intra_node_bw", "inter_node_bw",
                     "power_w", "exp_per_s"), ">0"),
    "gpus_per_node": "int>0", "sms": "int>0", "price_per_hour": ">=0", "peak_fp8_flops": ">=0",
    "intra_node_eff": "(0, 1]", "inter_node_eff": "(0, 1]",
}
# What a device table (the catalogue, a scenario's [devices.NAME]) sets: field, unit there.
DEVICE_KEYS = {"peak_tflops": ("peak_flops", TFLOPS), "hbm_gb": ("hbm_bytes", GB),
               "hbm_bw_gbs": ("hbm_bw", GB), "intra_node_bw_gbs": ("intra_node_bw", GB),
               "inter_node_bw_gbs": ("inter_node_bw", GB), "exp_tflops": ("exp_per_s", TFLOPS),
               "peak_fp8_tflops": ("peak_fp8_flops", TFLOPS),
               **{k: (k, 1) for k in ("power_w", "price_per_hour", "gpus_per_node",
                                      "intra_node_eff", "inter_node_eff", "sms")}}
REQUIRED = ("peak_tflops", "hbm_gb", "hbm_bw_gbs", "intra_node_bw_gbs", "inter_node_bw_gbs",
            "power_w", "price_per_hour")
ALIASES = {"a100-80gb": "a100", "a100-sxm-80gb": "a100", "a800-sxm": "a800", "h100-sxm": "h100",
           "h100-sxm-80gb": "h100", "h800-sxm": "h800", "h200-sxm": "h200"}


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
    """A device from a table in DEVICE_KEYS' units: `base = "h100"` plus overrides, or every
    REQUIRED figure; `sources` gives each figure's source. `where` prefixes error messages."""
    figures = {k: v for k, v in known_keys(where, table, {*DEVICE_KEYS, "base", "sources"}).items()
               if k not in ("base", "sources")}
    for key, value in figures.items():
        check(where, key, value, "")
    values = {DEVICE_KEYS[k][0]: v * DEVICE_KEYS[k][1] for k, v in figures.items()}
    missing = [k for k in REQUIRED if k not in figures]
    if "base" not in table and missing:
        raise ValueError(f"{where}.{missing[0]}: missing (or give base = \"h100\")")
    try:
        if "base" in table:
            return get_device(table["base"], catalogue).replace(name=name, **values)
        given = {DEVICE_KEYS[k][0]: text for k, text in table.get("sources", {}).items()}
        return Device(name=name, sources=given or {k: "scenario file" for k in values}, **values)
    except ValueError as err:
        raise ValueError(f"{where}: {str(err).removeprefix(where + ': ')}") from None


def with_devices(tables: dict, where: str) -> dict[str, Device]:
    """CATALOGUE and a file's `[devices.NAME]` tables (names lower-cased)."""
    return {**CATALOGUE, **{name.lower(): device_from_table(name.lower(), table,
                                                           f"{where}devices.{name}", CATALOGUE)
                            for name, table in tables.items()}}


CATALOGUE: dict[str, Device] = {
    name: device_from_table(name, table, f"devices.toml: {name}", {})
    for name, table in files.read_toml(Path(__file__).with_name("devices.toml")).items()}
