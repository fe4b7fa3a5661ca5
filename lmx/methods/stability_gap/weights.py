"""The paper's weight evidence: per-layer relative update ``|w_t − w_0| / |w_0|`` and the bottom-k/top-k ratio.

A *layer* is a transformer block (every parameter under ``blocks/<i>/``); the embedding, unembedding and final
norm are groups of their own. A group's relative update is the mean, over its parameter tensors, of
``||w_t − w_0||_F / ||w_0||_F`` (the paper's "mean |w_t − w_0|/|w_0|" per layer). The ratio is the mean over the
``k`` lowest blocks divided by the mean over the ``k`` highest: above 1 when the bottom layers move more.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _group(path) -> str:
  keys = [getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))) for p in path]
  if keys and keys[0] == "blocks" and len(keys) > 1:
    return f"block{int(keys[1])}"
  return str(keys[0]) if keys else "params"


@jax.jit
def _norms(params_t, params_0):
  """Per-leaf ``(||w_t − w_0||, ||w_0||)`` (float32)."""
  return jax.tree.map(lambda a, b: (jnp.linalg.norm((a - b).astype(jnp.float32).ravel()),
                                    jnp.linalg.norm(b.astype(jnp.float32).ravel())), params_t, params_0)


def relative_update(params_t, params_0) -> dict[str, float]:
  """``{group: mean over its tensors of ||w_t − w_0|| / ||w_0||}`` (see the module docstring)."""
  norms = jax.device_get(_norms(params_t, params_0))
  flat = jax.tree_util.tree_flatten_with_path(norms, is_leaf=lambda x: isinstance(x, tuple))[0]
  groups: dict[str, list[float]] = {}
  for path, (d, w) in flat:
    groups.setdefault(_group(path), []).append(float(d) / max(float(w), 1e-12))
  return {g: float(np.mean(v)) for g, v in sorted(groups.items())}


def bottom_top_ratio(rel: dict[str, float], k: int) -> float:
  """Mean relative update of the ``k`` lowest blocks over that of the ``k`` highest (nan when they are 0)."""
  blocks = sorted((int(g[len("block"):]), v) for g, v in rel.items() if g.startswith("block"))
  if len(blocks) < 2 * k or k < 1:
    raise ValueError(f"bottom/top k={k} needs at least {2 * k} blocks, got {len(blocks)}")
  vals = [v for _, v in blocks]
  top = float(np.mean(vals[-k:]))
  return float(np.mean(vals[:k])) / top if top > 0 else float("nan")
