"""opd: on-policy distillation of language models in JAX/Flax (see README.md)."""

__version__ = "0.1.0"
