"""pisam-jax: Segment Anything, HQ-SAM and Pi-SAM in JAX/Flax NNX.

    import pisam_jax
    predictor = pisam_jax.Predictor(pisam_jax.load_model("checkpoints/sam_vit_b"))
"""

from pisam_jax.models import ModelConfig, build_model, load_model, save_model
from pisam_jax.predictor import Predictor

__all__ = ["ModelConfig", "Predictor", "build_model", "load_model", "save_model"]
