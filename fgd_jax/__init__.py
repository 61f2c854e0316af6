"""fgd-jax: Focal and Global Knowledge Distillation for detectors in JAX/Flax."""

__version__ = "0.1.0"
