"""lmx: one JAX/Flax runtime for eight training methods."""
__version__ = "0.1.0"
