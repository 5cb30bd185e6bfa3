"""minimoe: grow language models the EfficientScale way (AquilaMoE, arXiv 2408.06567).

Preparation -> Scale-Up (FPI, AKI, AKI-Pro) -> Scale-Out (sparse upcycling, LLaMA-MoE
splitting) -> accounting, at toy scale on a CPU and by simulation at full scale.
"""

from minimoe.config import PRESETS, ModelConfig, get_preset

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "get_preset"]
