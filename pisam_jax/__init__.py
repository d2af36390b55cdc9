"""pisam-jax: Segment Anything, HQ-SAM and Pi-SAM in JAX/Flax NNX."""
