"""Decoder-only transformer (Flax NNX): RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab``) in
their ``out_sharding`` metadata; ``lmx.core.mesh`` maps them to mesh axes with one list of rules. Models are
used pure-functionally: ``graphdef, params = nnx.split(model, nnx.Param)`` outside jit and
``nnx.merge(graphdef, params)`` inside the step.

Mixture of experts: with ``moe_every=k > 0`` every k-th block (blocks k-1, 2k-1, ...) uses the routed
:class:`lmx.models.moe.MoE` feed-forward instead of SwiGLU; ``aux["aux_loss"]`` is
``lb_loss_coef · LB + z_loss_coef · Z`` with the layers combined by ``moe_aux_layers`` (:func:`moe_aux`):
``sum`` (default) LB = Σ_layers lb_loss, Z = Σ_layers z_loss; ``mean`` the means over layers; ``global``
LB = E · Σ_e mean_layers(f_e) · mean_layers(P_e), Z = mean_layers(z_loss). ``aux["metrics"]`` holds the
per-layer routing statistics (``moe/layer{i}/cv``, ...; per expert ``moe/layer{i}/load/e{j}`` when
``moe_stats_per_expert``), their means over layers (``moe/cv``, ``moe/lb_loss``, ...) and ``moe/aux_loss``.

Tied embeddings (``tie_embeddings``): the one table [V, D] is the input embedding and the unembedding; it is
initialised with std ``init_std`` (as GPT-2 / OLMo do), like the untied unembedding, so the initial logits of a
unit-RMS final hidden state have std ≈ init_std · sqrt(D) either way. (A std-1 table gave std ≈ sqrt(D), 16 at
D = 256, with the input token's own logit ≈ D; scaling the std-1 table by 1/sqrt(D) at the output, as T5 does,
still leaves that own-token logit at ≈ sqrt(D) while the std-1 input embedding dominates the residual stream,
an initial loss far above log V.) The untied input embedding keeps std 1.

Generation: :meth:`Transformer.init_cache` and :meth:`Transformer.decode` run the model incrementally with a
per-layer KV cache [B, S, K, E] (see ``lmx.models.generate``). Capacity-mode MoE layers also carry
``moe_counts`` [B, E], the per-expert choice counts of the prefix, so that the causal capacity decisions
(``lmx.models.moe.capacity_slots``, capacity computed for S tokens) equal the full forward pass over S tokens.

Masks and segments: ``model(tokens_BT, segment_ids_BT=...)`` (int [B, T], 0 = padding) restricts attention to
tokens of the same nonzero id (causal within each segment), through every ``attention_impl`` that takes segment
ids (see :mod:`lmx.kernels.attention`): left-padded rollouts are re-scored and packed sequences trained without
attending across the boundaries. RoPE positions then default to the index within the segment
(:func:`segment_positions`), so a row's first real token has position 0 however much padding precedes it; padding
positions give finite outputs that callers mask (e.g. :func:`lmx.models.generate.token_logprobs`). With MoE
blocks, padding tokens are still routed (capacity-mode layers count them); dropless routing is per token, so real
tokens are unaffected there. ``segment_ids_BT=None`` is the unmasked forward, unchanged.

Shapes in names: B batch, T time, S cache length, D model width, H query heads, K kv heads, E head dim,
F ffn width, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.core import mesh as mesh_lib
from lmx.core.config import ConfigError
from lmx.kernels import attention as attention_lib
from lmx.models import moe as moe_lib


DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "linear", "llama3")  # see rope_inv_freq
MOE_AUX_LAYERS = ("sum", "mean", "global")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static hyperparameters of the decoder. Build from a ConfigDict with :meth:`from_config`."""

  vocab_size: int = 260
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 0  # 0: same as n_heads (plain multi-head attention)
  d_head: int = 0  # 0: d_model // n_heads
  d_ff: int = 512
  max_seq_len: int = 256  # length of the RoPE table; longer inputs are an error
  rope_theta: float = 10_000.0
  # RoPE frequency scaling (rope_inv_freq): none | linear (positions / factor) | llama3 (Llama 3.1's per-band
  # interpolation with low/high frequency factors around the original context length).
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  qkv_bias: bool = False  # learned biases on the q/k/v projections (Qwen2)
  qk_norm: bool = False  # RMSNorm (learned scale over the head dim) on each head's q and k before RoPE (Qwen3)
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"  # activation / compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots (save matmul outputs only)
  attention_impl: str = "xla"  # xla | pallas | cudnn | auto, see lmx.kernels.attention
  # Mesh axes that split activations along the batch (the logical "batch" axis of the axis rules);
  # () = lmx.core.mesh.batch_axes(DEFAULT_AXIS_RULES). Filled from the rules by from_config(axis_rules=...).
  batch_axes: tuple = ()
  init_std: float = 0.02
  # Mixture of experts (lmx.models.moe). moe_every=0: dense; k: every k-th block is MoE.
  moe_every: int = 0
  n_experts: int = 0
  top_k: int = 2
  moe_d_ff: int = 0  # 0: d_ff
  capacity_factor: float = 0.0  # 0: dropless (sort + grouped matmul); > 0: capacity-limited einsum dispatch
  moe_impl: str = "ragged"  # dropless grouped matmul: ragged (jax.lax.ragged_dot) | tiled (pure-jnp tiles)
  # Expert parallelism (a mesh with an ``expert`` axis): rows per (source, destination) all-to-all block. 0: the
  # worst case, no routing can overflow; f > 0: about f·tokens·top_k/ep rows, with an exact rerun at the worst
  # case when any block overflows (still dropless; see lmx.models.moe.ep_buffer_rows).
  moe_ep_buffer_factor: float = 0.0
  router_softmax: str = "before"  # before | after top-k
  norm_topk_prob: bool = False  # renormalise the top-k gates (router_softmax="before")
  lb_loss_norm: str = "assign_frac"  # assign_frac | first_choice_frac | assign_per_token (lmx.models.moe)
  # How the per-layer aux losses combine (see moe_aux). Default "sum": Switch and ST-MoE add every router
  # layer's auxiliary loss to the total loss (so their coefficients, e.g. 0.01 / 0.001, are per layer).
  # "mean": averaged over layers (megablocks / OLMo's training code). "global": one loss from f and P averaged
  # over layers (HF transformers' load_balancing_loss_func on the concatenated router logits of all layers).
  moe_aux_layers: str = "sum"
  lb_loss_coef: float = 0.01
  z_loss_coef: float = 0.001
  moe_stats_per_expert: bool = True  # log per-expert load and mean router prob per layer

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.d_head or self.d_model // self.n_heads

  @property
  def expert_d_ff(self) -> int:
    return self.moe_d_ff or self.d_ff

  @property
  def activation_batch_axes(self) -> tuple[str, ...]:
    """``batch_axes`` with the default filled in: the mesh axes activations are split over along B."""
    return self.batch_axes or mesh_lib.batch_axes(mesh_lib.DEFAULT_AXIS_RULES)

  def is_moe_layer(self, i: int) -> bool:
    """Whether block ``i`` (0-based) has the MoE feed-forward."""
    return self.moe_every > 0 and (i + 1) % self.moe_every == 0

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

  @classmethod
  def from_config(cls, cfg: Any, prefix: str = "model", axis_rules=None) -> "TransformerConfig":
    """Builds from a mapping (ConfigDict or dict); unknown fields and bad shapes raise ConfigError.

    ``axis_rules`` (the config's logical-axis rules, e.g. ``config.axis_rules``) fills ``batch_axes`` with
    the mesh axes of their ``batch`` entry; without it the model uses the default rules' batch axes.
    """
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.pop("name", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"{prefix}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
    if "batch_axes" in d:  # a list from JSON or the command line; the config must stay hashable
      axes = d["batch_axes"]
      d["batch_axes"] = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if axis_rules is not None:
      from_rules = mesh_lib.batch_axes(axis_rules)
      if d.get("batch_axes", from_rules) != from_rules:
        raise ConfigError(f"{prefix}.batch_axes={d['batch_axes']} disagrees with the axis rules' batch axes "
                          f"{from_rules}; set the 'batch' rule in axis_rules and leave {prefix}.batch_axes unset")
      d["batch_axes"] = from_rules
    c = cls(**d)
    c.validate(prefix)
    return c

  def validate(self, prefix: str = "model") -> None:
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
        raise ConfigError(f"{prefix}.{f} must be a positive integer, got {getattr(self, f)!r}")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in DTYPES:
        raise ConfigError(f"{prefix}.{f}={getattr(self, f)!r} is not a known dtype; choose one of {list(DTYPES)}")
    if not self.d_head and self.d_model % self.n_heads:
      raise ConfigError(f"{prefix}.d_model={self.d_model} is not divisible by {prefix}.n_heads={self.n_heads}")
    if self.n_heads % self.kv_heads:
      raise ConfigError(
          f"{prefix}.n_heads={self.n_heads} is not divisible by {prefix}.n_kv_heads={self.kv_heads} (GQA groups)")
    if self.head_dim % 2:
      raise ConfigError(f"{prefix}: head dim {self.head_dim} must be even for RoPE")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ConfigError(f"{prefix}.rope_scaling={self.rope_scaling!r}; choose one of {list(ROPE_SCALINGS)}")
    if self.rope_scaling != "none" and not self.rope_scaling_factor > 0:
      raise ConfigError(f"{prefix}.rope_scaling_factor={self.rope_scaling_factor} must be > 0")
    if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
      raise ConfigError(f"{prefix}: llama3 RoPE scaling needs rope_high_freq_factor > rope_low_freq_factor > 0, "
                        f"got {self.rope_high_freq_factor} and {self.rope_low_freq_factor}")
    if self.remat not in ("none", "full", "dots"):
      raise ConfigError(f"{prefix}.remat={self.remat!r}; choose one of 'none', 'full', 'dots'")
    unknown_axes = sorted(set(self.batch_axes) - set(mesh_lib.MESH_AXES))
    if unknown_axes:
      raise ConfigError(f"{prefix}.batch_axes: unknown mesh axes {unknown_axes}; valid: {list(mesh_lib.MESH_AXES)}")
    if self.attention_impl not in ("xla", "pallas", "cudnn", "auto"):
      raise ConfigError(f"{prefix}.attention_impl={self.attention_impl!r}; choose one of "
                        "'xla', 'pallas', 'cudnn', 'auto'")
    if self.moe_every < 0:
      raise ConfigError(f"{prefix}.moe_every={self.moe_every} must be >= 0 (0 = dense)")
    if self.moe_every > 0:
      if not self.moe_layers:
        raise ConfigError(f"{prefix}.moe_every={self.moe_every} > {prefix}.n_layers={self.n_layers}: "
                          "no block would be MoE")
      if self.n_experts < 1:
        raise ConfigError(f"{prefix}.n_experts={self.n_experts} must be >= 1 when {prefix}.moe_every > 0")
      if not 1 <= self.top_k <= self.n_experts:
        raise ConfigError(f"{prefix}.top_k={self.top_k} must be in [1, {prefix}.n_experts={self.n_experts}]")
      if self.capacity_factor < 0:
        raise ConfigError(f"{prefix}.capacity_factor={self.capacity_factor} must be >= 0 (0 = dropless)")
      if self.router_softmax not in moe_lib.ROUTER_SOFTMAX:
        raise ConfigError(f"{prefix}.router_softmax={self.router_softmax!r}; choose one of "
                          f"{list(moe_lib.ROUTER_SOFTMAX)}")
      if self.moe_impl not in moe_lib.DROPLESS_IMPLS:
        raise ConfigError(f"{prefix}.moe_impl={self.moe_impl!r}; choose one of {list(moe_lib.DROPLESS_IMPLS)}")
      lb_msg = moe_lib.lb_norm_error(self.lb_loss_norm, f"{prefix}.lb_loss_norm")
      if lb_msg:
        raise ConfigError(lb_msg)
      if self.moe_ep_buffer_factor < 0:
        raise ConfigError(f"{prefix}.moe_ep_buffer_factor={self.moe_ep_buffer_factor} must be >= 0 (0 = worst case)")
      if self.moe_aux_layers not in MOE_AUX_LAYERS:
        raise ConfigError(f"{prefix}.moe_aux_layers={self.moe_aux_layers!r}; choose one of {list(MOE_AUX_LAYERS)}")

  def check_mesh(self, axis_sizes, prefix: str = "model", mesh_prefix: str = "mesh") -> None:
    """Checks the model against mesh axis sizes ({name: size}); raises ConfigError naming the fields.

    Experts must divide evenly over the ``expert`` axis. (Other dimensions that do not divide their mesh
    axes are replicated by the sharding rules rather than rejected; a dense model uses an ``expert`` axis
    as one more batch axis.)
    """
    ne = dict(axis_sizes).get("expert", 1)
    if self.moe_every and self.n_experts % ne:
      raise ConfigError(f"{prefix}.n_experts={self.n_experts} is not divisible by the expert mesh axis "
                        f"{mesh_prefix}.expert={ne}")


def shard_batch(x, batch_axes: tuple[str, ...] = ()):
  """Constrains activations [B, ...] to be split over ``batch_axes`` (default: the batch axes of
  ``DEFAULT_AXIS_RULES``, i.e. data, fsdp, expert) that the current mesh (``jax.set_mesh``) has and that
  divide B (dropping axes from the end until they do); a no-op without a mesh. Keeps GSPMD on the FSDP
  layout (weights gathered, activations batch-sharded) instead of resharding activations along the model
  width. Dropless MoE layers then split the tokens over every device and exchange them over ``expert``
  with all-to-alls (expert parallelism, ``lmx.models.moe.expert_parallel_dispatch``)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  batch_axes = batch_axes or mesh_lib.batch_axes(mesh_lib.DEFAULT_AXIS_RULES)
  axes = tuple(a for a in batch_axes if sizes.get(a, 1) > 1 and types[a] == jax.sharding.AxisType.Auto)
  while axes and x.shape[0] % math.prod(sizes[a] for a in axes):
    axes = axes[:-1]
  if not axes:
    return x
  spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0], *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


def _param(rngs: nnx.Rngs, shape, axes, std, dtype) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale (computed in float32)."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs, axis: str = "embed"):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis,), eager_sharding=False)
    self.eps = eps

  def __call__(self, x_BTD):
    x = x_BTD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


def segment_positions(segment_ids_BT):
  """RoPE positions from segment ids: each token's index within its run of equal ids (a new segment starts
  where the id changes), int32 [B, T]. Left padding (id 0) forms its own run, so the first real token is 0."""
  t = segment_ids_BT.shape[1]
  idx_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BT.shape)
  starts_BT = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                               segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  first_BT = jax.lax.cummax(jnp.where(starts_BT, idx_BT, 0), axis=1)  # index of the segment's first token
  return idx_BT - first_BT


def rope_inv_freq(cfg: TransformerConfig):
  """The RoPE inverse frequencies [head_dim // 2] (float32) of ``cfg``, with its ``rope_scaling`` applied.

  ``linear`` divides every frequency by the factor (positions / factor); ``llama3`` (Llama 3.1) divides the
  low frequencies (wavelength > original_max_len / low_freq_factor) by the factor, keeps the high ones
  (wavelength < original_max_len / high_freq_factor) and interpolates smoothly in between, as Hugging Face
  transformers' ``_compute_llama3_parameters`` does.
  """
  e = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling == "linear":
    return inv_freq / factor
  if cfg.rope_scaling == "llama3":
    low, high, old_len = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x_BTHE, positions_BT, theta: float, inv_freq=None):
  """Rotary embedding (rotate-half form) at integer positions; ``inv_freq`` [E // 2] (e.g. from
  :func:`rope_inv_freq`) replaces the plain ``theta`` frequencies when given."""
  e = x_BTHE.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  ang_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(ang_BTF)[:, :, None, :], jnp.cos(ang_BTF)[:, :, None, :]
  x = x_BTHE.astype(jnp.float32)
  x1, x2 = x[..., : e // 2], x[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHE.dtype)


def lora_hidden(x, lora, names, n_in: int) -> dict:
  """``{name: x A}`` for the weights in ``names`` that have adapters in ``lora`` and read the same input ``x``
  (q/k/v; gate/up): one matmul against their ``A``s side by side (fewer, larger matmuls than one per weight). ``A``
  contracts the last ``n_in`` axes of ``x`` (the weight's input axes)."""
  names = [n for n in names if lora and n in lora]
  if not names:
    return {}
  a = [lora[n]["a"].astype(x.dtype) for n in names]
  h = jnp.tensordot(x, jnp.concatenate(a, axis=-1) if len(a) > 1 else a[0], axes=n_in)
  cuts = np.cumsum([m.shape[-1] for m in a])[:-1].tolist()
  return dict(zip(names, jnp.split(h, cuts, axis=-1) if cuts else [h]))


def lora_add(y, hidden: dict, lora, name: str):
  """``y`` plus the LoRA path ``(x A) B`` of weight ``name`` (``hidden[name]`` = ``x A``, :func:`lora_hidden`) when
  it has adapters. The frozen weight's gradient is never formed (what makes LoRA cheaper than merging
  ``W + A B`` inside the step)."""
  if name not in hidden:
    return y
  return y + jnp.tensordot(hidden[name], lora[name]["b"].astype(y.dtype), axes=1)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.wq = _param(rngs, (d, h, e), ("embed", "heads", "head_dim"), cfg.init_std, pd)
    self.wk = _param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    self.wv = _param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    if cfg.qkv_bias:
      self.bq = _param(rngs, (h, e), ("heads", "head_dim"), 0.0, pd)
      self.bk = _param(rngs, (k, e), ("kv_heads", "head_dim"), 0.0, pd)
      self.bv = _param(rngs, (k, e), ("kv_heads", "head_dim"), 0.0, pd)
    self.wo = _param(rngs, (h, e, d), ("heads", "head_dim", "embed"),
                     cfg.init_std / (2 * cfg.n_layers) ** 0.5, pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(e, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs, axis="head_dim")
      self.k_norm = RMSNorm(e, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs, axis="head_dim")

  def _qkv(self, x_BTD, positions_BT, lora=None):
    """Query/key/value projections in the compute dtype, RoPE applied to q and k."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    x = x_BTD.astype(dt)
    h = lora_hidden(x, lora, ("wq", "wk", "wv"), 1)
    q_BTHE = lora_add(jnp.einsum("btd,dhe->bthe", x, self.wq[...].astype(dt)), h, lora, "wq")
    k_BTKE = lora_add(jnp.einsum("btd,dke->btke", x, self.wk[...].astype(dt)), h, lora, "wk")
    v_BTKE = lora_add(jnp.einsum("btd,dke->btke", x, self.wv[...].astype(dt)), h, lora, "wv")
    if cfg.qkv_bias:
      q_BTHE = q_BTHE + self.bq[...].astype(dt)
      k_BTKE = k_BTKE + self.bk[...].astype(dt)
      v_BTKE = v_BTKE + self.bv[...].astype(dt)
    if cfg.qk_norm:
      q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
    inv_freq = None if cfg.rope_scaling == "none" else rope_inv_freq(cfg)
    return (apply_rope(q_BTHE, positions_BT, cfg.rope_theta, inv_freq),
            apply_rope(k_BTKE, positions_BT, cfg.rope_theta, inv_freq), v_BTKE)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT=None, lora=None):
    """Causal self-attention; ``segment_ids_BT`` (optional, 0 = padding) keeps it within equal ids; ``lora``
    (optional) this module's adapters (:func:`lora_hidden`, :func:`lora_add`)."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    q_BTHE, k_BTKE, v_BTKE = self._qkv(x_BTD, positions_BT, lora)
    o_BTHE = attention_lib.attention(q_BTHE, k_BTKE, v_BTKE, causal=True, impl=cfg.attention_impl,
                                     batch_axes=cfg.activation_batch_axes, q_segment_ids_BT=segment_ids_BT)
    return lora_add(jnp.einsum("bthe,hed->btd", o_BTHE, self.wo[...].astype(dt)),
                    lora_hidden(o_BTHE, lora, ("wo",), 2), lora, "wo")

  def decode(self, x_BTD, positions_BT, cache, start, kv_valid_BS):
    """Incremental attention: writes this step's k/v at cache slots [start, start+T) and attends to every
    slot ``<=`` the query's slot that ``kv_valid_BS`` marks as real. Returns ``(y_BTD, new_cache)``."""
    dt = jnp.dtype(self.cfg.dtype)
    t = x_BTD.shape[1]
    q_BTHE, k_BTKE, v_BTKE = self._qkv(x_BTD, positions_BT)
    k_BSKE = jax.lax.dynamic_update_slice(cache["k"], k_BTKE.astype(cache["k"].dtype), (0, start, 0, 0))
    v_BSKE = jax.lax.dynamic_update_slice(cache["v"], v_BTKE.astype(cache["v"].dtype), (0, start, 0, 0))
    s = k_BSKE.shape[1]
    slot_T = start + jnp.arange(t)
    mask_BTS = (jnp.arange(s)[None, None, :] <= slot_T[None, :, None]) & kv_valid_BS[:, None, :]
    o_BTHE = attention_lib.masked_attention(q_BTHE, k_BSKE.astype(dt), v_BSKE.astype(dt), mask_BTS)
    y_BTD = jnp.einsum("bthe,hed->btd", o_BTHE, self.wo[...].astype(dt))
    return y_BTD, {"k": k_BSKE, "v": v_BSKE}


class SwiGLU(nnx.Module):
  """Gated feed-forward: (silu(x W1) * x W3) W2."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    d, f = cfg.d_model, cfg.d_ff
    self.w1 = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd)
    self.w3 = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd)
    self.w2 = _param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / (2 * cfg.n_layers) ** 0.5, pd)

  def __call__(self, x_BTD, lora=None):
    dt = jnp.dtype(self.cfg.dtype)
    x = x_BTD.astype(dt)
    h = lora_hidden(x, lora, ("w1", "w3"), 1)
    h_BTF = jax.nn.silu(lora_add(x @ self.w1[...].astype(dt), h, lora, "w1")) * lora_add(x @ self.w3[...].astype(dt),
                                                                                        h, lora, "w3")
    return lora_add(h_BTF @ self.w2[...].astype(dt), lora_hidden(h_BTF, lora, ("w2",), 1), lora, "w2")


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + ffn(norm(x)). The ffn is SwiGLU or MoE.

  ``block(x, positions)`` returns ``(x, info)``; ``info`` is the MoE routing dict or ``None`` (dense).
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, moe: bool = False):
    pd = jnp.dtype(cfg.param_dtype)
    self.is_moe = moe
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    if moe:
      self.ffn = moe_lib.MoE(
          cfg.d_model, cfg.expert_d_ff, cfg.n_experts, cfg.top_k, capacity_factor=cfg.capacity_factor,
          router_softmax=cfg.router_softmax, norm_topk_prob=cfg.norm_topk_prob, lb_loss_norm=cfg.lb_loss_norm,
          dropless_impl=cfg.moe_impl, dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=cfg.init_std,
          out_std=cfg.init_std / (2 * cfg.n_layers) ** 0.5, batch_axes=cfg.activation_batch_axes,
          ep_buffer_factor=cfg.moe_ep_buffer_factor, rngs=rngs)
    else:
      self.ffn = SwiGLU(cfg, rngs=rngs)

  def _ffn(self, x_BTD, return_routing=False, lora=None):
    if self.is_moe:
      return self.ffn(x_BTD, return_routing=return_routing)
    return self.ffn(x_BTD, lora), None

  def __call__(self, x_BTD, positions_BT, return_routing: bool = False, segment_ids_BT=None, lora=None):
    lora = lora or {}
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT, lora.get("attn"))
    y_BTD, info = self._ffn(self.ffn_norm(x_BTD), return_routing, lora.get("ffn"))
    return x_BTD + y_BTD, info

  def decode(self, x_BTD, positions_BT, cache, start, kv_valid_BS):
    """One incremental step against this block's cache (``k``, ``v``; ``moe_counts`` in capacity mode)."""
    a_BTD, new_cache = self.attn.decode(self.attn_norm(x_BTD), positions_BT, cache, start, kv_valid_BS)
    x_BTD = x_BTD + a_BTD
    if "moe_counts" in cache:
      # Capacity-mode MoE: continue the prefix's per-expert counts; padding slots take no capacity; the capacity
      # is that of a sequence as long as the cache.
      valid_BT = jax.lax.dynamic_slice_in_dim(kv_valid_BS, start, x_BTD.shape[1], axis=1)
      y_BTD, info = self.ffn(self.ffn_norm(x_BTD), counts_BE=cache["moe_counts"], valid_BT=valid_BT,
                             capacity_len=cache["k"].shape[1])
      new_cache = {**new_cache, "moe_counts": info["capacity_counts"]}
    else:
      y_BTD, _ = self._ffn(self.ffn_norm(x_BTD))
    return x_BTD + y_BTD, new_cache


class Transformer(nnx.Module):
  """Decoder-only LM. ``model(tokens_BT)`` returns logits [B, T, V] (float32)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    # Tied: the table is also the unembedding, so it takes the unembedding's init_std (see the module docstring).
    embed_std = cfg.init_std if cfg.tie_embeddings else 1.0
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), embed_std, pd)
    self.blocks = nnx.List([Block(cfg, rngs=rngs, moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd)

  def logits_from_hidden(self, h_BTD):
    """Logits [B, T, V] (float32) of a post-final-norm hidden state ``h_BTD`` (``hiddens["final"]`` of
    ``__call__(..., hidden_layers=...)``): the unembedding (the embedding table's transpose when tied), in the
    compute dtype, exactly as the forward computes its logits."""
    dt = jnp.dtype(self.cfg.dtype)
    w_DV = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
    return jnp.einsum("btd,dv->btv", h_BTD.astype(dt), w_DV.astype(dt)).astype(jnp.float32)

  def _logits(self, x_BTD):
    return self.logits_from_hidden(self.final_norm(x_BTD))

  def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, return_hidden: bool = False,
               return_aux: bool = False, return_routing: bool = False, hidden_layers=None, lora=None):
    """Runs the decoder.

    ``segment_ids_BT`` (optional int [B, T], 0 = padding): attention only between tokens of the same nonzero id
    (left padding, packed sequences); ``positions_BT`` (RoPE) then defaults to :func:`segment_positions`, else
    to 0..T-1. Outputs at padding positions are finite but meaningless.

    Returns ``logits_BTV``; with ``return_hidden`` also ``hidden_LBTD`` (the L+1 residual streams, embeddings
    first); with ``hidden_layers`` (block indices, e.g. ``(0, 2)``; negative counts from the end) also
    ``hiddens = {"block{i}": residual stream [B, T, D] after block i, "final": the post-final-norm state}``
    (``logits == logits_from_hidden(hiddens["final"])``); with ``return_aux`` also ``aux = {"aux_loss": scalar to
    add to the loss, "metrics": {name: scalar}}`` (zero / empty for a dense model). Order:
    ``(logits, hidden, hiddens, aux)`` with the requested ones present.
    ``return_routing`` (needs ``return_aux``) adds ``aux["routing"] = {"layer{i}": {"experts" [B,T,K],
    "gates" [B,T,K], "router_logits" [B,T,E], "probs" [B,T,E] (softmax of the logits), "kept" [B,T,K] bool
    (False for choices dropped by capacity; all True when dropless)}}`` for every MoE layer, for analysis.
    ``lora`` (optional): LoRA adapters beside the weights, ``{"blocks": {i: {"attn" | "ffn": {weight: {"a", "b"}}}}}``
    (``lmx.models.finetune``; ``b`` already scaled by alpha / r): each adapted projection adds ``(x A) B``.
    """
    cfg = self.cfg
    if tokens_BT.ndim != 2:
      raise ValueError(f"tokens must be [batch, time], got shape {tokens_BT.shape}")
    if return_routing and not return_aux:
      raise ValueError("return_routing=True needs return_aux=True (the records are returned in aux['routing'])")
    b, t = tokens_BT.shape
    if t > cfg.max_seq_len:
      raise ConfigError(f"sequence length {t} exceeds model.max_seq_len={cfg.max_seq_len} (the RoPE table)")
    if segment_ids_BT is not None and segment_ids_BT.shape != (b, t):
      raise ValueError(f"segment_ids_BT must be [batch, time]={(b, t)}, got shape {segment_ids_BT.shape}")
    if positions_BT is None and segment_ids_BT is not None:
      positions_BT = segment_positions(segment_ids_BT)
    elif positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    keep_layers = ()
    if hidden_layers is not None:
      keep_layers = tuple(sorted({int(i) % cfg.n_layers for i in hidden_layers}))
      bad = [i for i in hidden_layers if not -cfg.n_layers <= int(i) < cfg.n_layers]
      if bad:
        raise ValueError(f"hidden_layers {bad} out of range for model.n_layers={cfg.n_layers}")
    hiddens = {}
    dt = jnp.dtype(cfg.dtype)
    x_BTD = shard_batch(jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt), cfg.activation_batch_axes)
    hidden = [x_BTD]
    infos = {}
    policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    for i, block in enumerate(self.blocks):
      lo = None if lora is None else lora.get("blocks", {}).get(i)
      if cfg.remat == "none":
        x_BTD, info = block(x_BTD, positions_BT, return_routing, segment_ids_BT, lo)
      else:
        x_BTD, info = nnx.remat(lambda blk, x, p, sg, lo: blk(x, p, return_routing, sg, lo),
                                policy=policy[cfg.remat])(block, x_BTD, positions_BT, segment_ids_BT, lo)
      x_BTD = shard_batch(x_BTD, cfg.activation_batch_axes)
      if info is not None:
        infos[i] = info
      if return_hidden:
        hidden.append(x_BTD)
      if i in keep_layers:
        hiddens[f"block{i}"] = x_BTD
    if hidden_layers is None:
      logits_BTV = self._logits(x_BTD)
    else:
      hiddens["final"] = self.final_norm(x_BTD)
      logits_BTV = self.logits_from_hidden(hiddens["final"])
    out = (logits_BTV,)
    if return_hidden:
      out += (jnp.stack(hidden),)
    if hidden_layers is not None:
      out += (hiddens,)
    if return_aux:
      aux = moe_aux(infos, cfg)
      if return_routing:
        aux["routing"] = {f"layer{i}": {k: info[k] for k in ("experts", "gates", "router_logits", "probs", "kept")}
                          for i, info in infos.items()}
      out += (aux,)
    return out[0] if len(out) == 1 else out

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """An empty KV cache: one ``{"k", "v"}`` dict of [batch, max_len, K, E] arrays per block, plus
    ``"moe_counts"`` (int32 [batch, n_experts] zeros) in capacity-mode MoE blocks."""
    cfg = self.cfg
    if max_len > cfg.max_seq_len:
      raise ConfigError(f"cache length {max_len} (prompt + new tokens) exceeds model.max_seq_len="
                        f"{cfg.max_seq_len} (the RoPE table)")
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
    cache = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]
    if cfg.capacity_factor > 0:
      for i in cfg.moe_layers:
        cache[i]["moe_counts"] = jnp.zeros((batch, cfg.n_experts), jnp.int32)
    return cache

  def decode(self, tokens_BT, cache, *, start, positions_BT, kv_valid_BS):
    """Runs T new tokens at cache slots [start, start+T) (shared by all rows) against the cache.

    ``positions_BT`` are the RoPE positions of the new tokens (per row, so left-padded rows can start at 0);
    ``kv_valid_BS`` marks the cache slots that hold real tokens (False for padding). A query at slot i sees
    valid slots <= i. Attention here is the masked jnp path whatever ``attention_impl`` says (decoding is
    memory-bound; the mask is per row). Returns ``(logits_BTV, new_cache)``.
    """
    dt = jnp.dtype(self.cfg.dtype)
    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x_BTD, layer_cache = block.decode(x_BTD, positions_BT, layer_cache, start, kv_valid_BS)
      new_cache.append(layer_cache)
    return self._logits(x_BTD), new_cache


def moe_aux(infos: dict, cfg: TransformerConfig) -> dict:
  """Combines per-layer MoE infos into ``{"aux_loss", "metrics"}``; ``cfg.moe_aux_layers`` says how the layers'
  losses combine (see the module docstring)."""
  if not infos:
    return {"aux_loss": jnp.zeros((), jnp.float32), "metrics": {}}
  metrics = {}
  scalars = ("lb_loss", "z_loss", "cv", "max_over_mean", "maxvio", "entropy", "dead")
  if cfg.capacity_factor > 0:
    scalars += ("dropped_frac",)
  for i, info in infos.items():
    for name in scalars:
      metrics[f"moe/layer{i}/{name}"] = info[name]
    if cfg.moe_stats_per_expert:
      for j in range(cfg.n_experts):
        metrics[f"moe/layer{i}/load/e{j}"] = info["load"][j]
        metrics[f"moe/layer{i}/mean_prob/e{j}"] = info["mean_prob"][j]
  for name in scalars:
    metrics[f"moe/{name}"] = jnp.mean(jnp.stack([info[name] for info in infos.values()]))
  lb_L = jnp.stack([info["lb_loss"] for info in infos.values()])
  z_L = jnp.stack([info["z_loss"] for info in infos.values()])
  if cfg.moe_aux_layers == "sum":  # Switch / ST-MoE: every router layer adds its own loss
    lb, z = jnp.sum(lb_L), jnp.sum(z_L)
  elif cfg.moe_aux_layers == "mean":
    lb, z = jnp.mean(lb_L), jnp.mean(z_L)
  else:  # global: f and P over all layers' tokens (every layer sees the same N tokens, so a mean over layers)
    f_E = jnp.mean(jnp.stack([info["lb_frac"] for info in infos.values()]), axis=0)
    p_E = jnp.mean(jnp.stack([info["lb_prob"] for info in infos.values()]), axis=0)
    lb, z = cfg.n_experts * jnp.sum(f_E * p_E), jnp.mean(z_L)
  aux_loss = cfg.lb_loss_coef * lb + cfg.z_loss_coef * z
  metrics["moe/aux_loss"] = aux_loss
  return {"aux_loss": aux_loss, "metrics": metrics}


def num_params(params) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
