"""jaxprompt: vision prompt learning (CLIP-ReID, LPT, VPT, CoOp/CoCoOp) in JAX/Flax."""

__version__ = "0.1.0"
