"""Fine-tuning a pretrained transformer: which parameters train, and LoRA adapters.

A fine-tune splits the model's parameters into a *trainable* tree (the train state's ``params``, which the optimiser
updates and the checkpoints hold) and a *frozen* tree (an input of the step, never checkpointed: a resume reads it
from the model again, e.g. from the GGUF file). :func:`full_params` puts them back together for the forward pass,
evaluation and export.

* **LoRA** (``lora_rank > 0``; Hu et al. 2021): every targeted weight ``W`` of the blocks at or above
  ``freeze_layers`` gets adapters ``A [in..., r]`` (normal, std ``1/sqrt(fan_in)``) and ``B [r, out...]`` (zeros),
  and the model computes ``x W + (x A) (alpha / r) B`` (the adapters beside the weights, :meth:`Finetune.apply_args`,
  so the frozen weights' gradient is never formed). The trainable tree holds only the adapters; every pretrained
  weight is frozen. Merged into the weights (``W + (alpha / r) A B``, :meth:`Finetune.full_params`), the result is an
  ordinary checkpoint: what ``load_run`` returns and ``tools/export_hf.py`` writes.
* **Full fine-tuning with frozen parts** (``lora_rank = 0``): the blocks below ``freeze_layers`` (and the
  embedding, and the unembedding when untied, with ``freeze_embeddings``) are frozen; the rest trains.

Targets use Hugging Face's module names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
``up_proj``, ``down_proj``), mapped to lmx's weights (attention ``wq/wk/wv [D, heads, E]``, ``wo [heads, E, D]``,
SwiGLU ``w1`` gate, ``w3`` up, ``w2`` down). Mixture-of-experts blocks have no dense FFN weights: their FFN
targets are skipped.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lmx.core.config import ConfigError

# HF module name -> (lmx sub-module, weight, number of leading input axes of the weight)
TARGETS = {
    "q_proj": ("attn", "wq", 1), "k_proj": ("attn", "wk", 1), "v_proj": ("attn", "wv", 1),
    "o_proj": ("attn", "wo", 2), "gate_proj": ("ffn", "w1", 1), "up_proj": ("ffn", "w3", 1),
    "down_proj": ("ffn", "w2", 1),
}
ALL_TARGETS = tuple(TARGETS)


@dataclasses.dataclass(frozen=True)
class Finetune:
  """What trains (see the module docstring); ``n_layers`` is the model's depth."""
  n_layers: int
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = ALL_TARGETS
  freeze_layers: int = 0
  freeze_embeddings: bool = False

  @property
  def lora(self) -> bool:
    return self.lora_rank > 0

  @property
  def scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def trained_layers(self) -> range:
    return range(self.freeze_layers, self.n_layers)

  # --- the trees -------------------------------------------------------------------------------------------

  def split(self, params: dict) -> tuple[dict, dict]:
    """``(trainable, frozen)`` parts of the model's ``params`` (or of any tree of its structure, e.g. its
    shardings). With LoRA everything is frozen (the trainable adapters come from :meth:`init_adapters`)."""
    if self.lora:
      return {}, params
    trainable, frozen = {}, {}
    for k, v in params.items():
      if k == "blocks":
        trainable[k] = {i: b for i, b in v.items() if int(i) >= self.freeze_layers}
        frozen[k] = {i: b for i, b in v.items() if int(i) < self.freeze_layers}
      elif k in ("embed", "unembed") and self.freeze_embeddings:
        frozen[k] = v
      else:
        trainable[k] = v
    empty = lambda v: isinstance(v, dict) and not v  # noqa: E731
    return ({k: v for k, v in trainable.items() if not empty(v)}, {k: v for k, v in frozen.items() if not empty(v)})

  def _targets(self, params: dict):
    """``(layer, module, weight, n_in)`` of every adapted weight present in ``params``."""
    out = []
    for i in self.trained_layers():
      block = params["blocks"][i]
      for t in self.lora_targets:
        mod, w, n_in = TARGETS[t]
        if w in block.get(mod, {}):
          out.append((i, mod, w, n_in))
    return out

  def _adapters(self, abstract_params: dict, make) -> dict:
    """``{"blocks": {layer: {module: {weight: {"a": make(...), "b": make(...)}}}}}``, ``make(kind, shape,
    weight_path, n_in)`` giving each leaf."""
    tree: dict = {}
    for i, mod, w, n_in in self._targets(abstract_params):
      shape = tuple(abstract_params["blocks"][i][mod][w].shape)
      r = self.lora_rank
      tree.setdefault(i, {}).setdefault(mod, {})[w] = {
          "a": make("a", shape[:n_in] + (r,), (i, mod, w), n_in), "b": make("b", (r,) + shape[n_in:], (i, mod, w),
                                                                             n_in)}
    return {"blocks": tree}

  def init_adapters(self, key, abstract_params: dict, dtype=jnp.float32) -> dict:
    """The LoRA adapters at their initial values: ``A`` normal with std ``1/sqrt(fan_in)``, ``B`` zero (so the
    model starts as the pretrained one). Each ``A`` draws from ``key`` folded with its layer and weight."""
    names = {w: j for j, w in enumerate(sorted({w for _, w, _ in TARGETS.values()}))}

    def make(kind, shape, where, n_in):
      if kind == "b":
        return jnp.zeros(shape, dtype)
      i, _, w = where
      k = jax.random.fold_in(jax.random.fold_in(key, i), names[w])
      return jax.random.normal(k, shape, dtype) / math.sqrt(math.prod(shape[:n_in]))

    return self._adapters(abstract_params, make)

  def abstract_trainable(self, abstract_params: dict, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of the trainable tree."""
    if not self.lora:
      return self.split(abstract_params)[0]
    return self._adapters(abstract_params, lambda kind, shape, where, n_in: jax.ShapeDtypeStruct(shape, dtype))

  def trainable_shardings(self, param_shardings: dict, abstract_params: dict) -> dict:
    """The trainable tree's shardings: each ``A`` split like its weight's input axes, each ``B`` like its output
    axes (LoRA); the trainable weights' own shardings otherwise."""
    if not self.lora:
      return self.split(param_shardings)[0]

    def make(kind, shape, where, n_in):
      i, mod, w = where
      sh = param_shardings["blocks"][i][mod][w]
      ndim = abstract_params["blocks"][i][mod][w].ndim
      spec = tuple(sh.spec) + (None,) * (ndim - len(sh.spec))
      return NamedSharding(sh.mesh, P(*spec[:n_in], None) if kind == "a" else P(None, *spec[n_in:]))

    return self._adapters(abstract_params, make)

  def frozen_shardings(self, param_shardings: dict) -> dict:
    return self.split(param_shardings)[1]

  def apply_args(self, trainable: dict, frozen: dict) -> tuple[dict, dict | None]:
    """``(params, lora)`` to call the model with: the frozen weights and the adapters beside them (their ``B``
    scaled by alpha / r; ``Transformer.__call__(..., lora=...)``) for LoRA, the joined parameters and None
    otherwise. Equal to the merged weights' forward, without the frozen weights' gradient."""
    if not self.lora:
      return _union(trainable, frozen), None
    scaled = jax.tree.map(lambda x: x, trainable)
    for mods in scaled["blocks"].values():
      for weights in mods.values():
        for w, ab in weights.items():
          weights[w] = {"a": ab["a"], "b": ab["b"] * self.scale}
    return frozen, scaled

  def full_params(self, trainable: dict, frozen: dict) -> dict:
    """The model's parameters: the adapters merged into the frozen weights (LoRA), or the two parts joined."""
    if not self.lora:
      return _union(trainable, frozen)
    return merge(frozen, trainable, self.scale)


def merge(params: dict, adapters: dict, scale: float) -> dict:
  """``params`` with each adapted weight replaced by ``W + scale · A B`` (in ``W``'s dtype)."""
  blocks = dict(params["blocks"])
  for i, mods in adapters.get("blocks", {}).items():
    block = dict(blocks[i])
    for mod, weights in mods.items():
      m = dict(block[mod])
      for w, ab in weights.items():
        delta = jnp.tensordot(ab["a"], ab["b"], axes=1)
        m[w] = m[w] + (scale * delta).astype(m[w].dtype)
      block[mod] = m
    blocks[i] = block
  return {**params, "blocks": blocks}


def _union(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _union(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def from_config(block, model_cfg) -> Finetune | None:
  """The :class:`Finetune` of a config's ``finetune`` block (None when absent or when everything trains).
  ConfigError for an unknown target, a rank without targets, or more frozen layers than the model has."""
  if block is None:
    return None
  get = block.get
  targets = tuple(get("lora_targets", ALL_TARGETS))
  unknown = [t for t in targets if t not in TARGETS]
  if unknown:
    raise ConfigError(f"finetune.lora_targets: unknown module(s) {unknown}; valid: {list(ALL_TARGETS)}")
  n_layers = int(model_cfg.n_layers)
  ft = Finetune(n_layers=n_layers, lora_rank=int(get("lora_rank", 0)), lora_alpha=float(get("lora_alpha", 16.0)),
                lora_targets=targets, freeze_layers=int(get("freeze_layers", 0)),
                freeze_embeddings=bool(get("freeze_embeddings", False)))
  if ft.freeze_layers > n_layers or (ft.lora and ft.freeze_layers >= n_layers):
    raise ConfigError(f"finetune.freeze_layers={ft.freeze_layers}: the model has {n_layers} layers; "
                      f"{'LoRA needs at least one trained layer' if ft.lora else 'at most all of them'}")
  if ft.lora and not targets:
    raise ConfigError("finetune.lora_targets: empty; name at least one module for lora_rank > 0")
  if not ft.lora and ft.freeze_layers == 0 and not ft.freeze_embeddings:
    return None
  if not ft.lora and ft.freeze_layers == n_layers and ft.freeze_embeddings:
    raise ConfigError("finetune: every parameter would be frozen except the final norm; train something")
  return ft
