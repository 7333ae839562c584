"""spin_jax: SPIN (Self-Play Fine-Tuning, arXiv 2401.01335) in JAX/Flax."""

__version__ = "0.1.0"
