"""hybridmoe: hybrid Mamba-2 / attention / LatentMoE language models (the Nemotron 3 family), readable and fast."""

from .cache import HybridCache
from .config import HybridMoEConfig
from .modeling import CausalLMOutput, HybridMoEForCausalLM

__all__ = ["HybridMoEConfig", "HybridMoEForCausalLM", "HybridCache", "CausalLMOutput"]
__version__ = "0.1.0"
