"""Decoder-only transformer (Flax NNX): RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab``) in
their ``out_sharding`` metadata; ``lmx.core.mesh`` maps them to mesh axes with one list of rules. Models are
used pure-functionally: ``graphdef, params = nnx.split(model, nnx.Param)`` outside jit and
``nnx.merge(graphdef, params)`` inside the step.

Shapes in names: B batch, T time, D model width, H query heads, K kv heads, E head dim, F ffn width,
V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.core.config import ConfigError


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
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"  # activation / compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots (save matmul outputs only)
  attention_impl: str = "xla"  # see lmx.kernels.attention
  init_std: float = 0.02

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.d_head or self.d_model // self.n_heads

  @classmethod
  def from_config(cls, cfg: Any, prefix: str = "model") -> "TransformerConfig":
    """Builds from a mapping (ConfigDict or dict); unknown fields and bad shapes raise ConfigError."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.pop("name", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"{prefix}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
    c = cls(**d)
    c.validate(prefix)
    return c

  def validate(self, prefix: str = "model") -> None:
    if not self.d_head and self.d_model % self.n_heads:
      raise ConfigError(f"{prefix}.d_model={self.d_model} is not divisible by {prefix}.n_heads={self.n_heads}")
    if self.n_heads % self.kv_heads:
      raise ConfigError(
          f"{prefix}.n_heads={self.n_heads} is not divisible by {prefix}.n_kv_heads={self.kv_heads} (GQA groups)")
    if self.head_dim % 2:
      raise ConfigError(f"{prefix}: head dim {self.head_dim} must be even for RoPE")
    if self.remat not in ("none", "full", "dots"):
      raise ConfigError(f"{prefix}.remat={self.remat!r}; choose one of 'none', 'full', 'dots'")


def _param(rngs: nnx.Rngs, shape, axes, std, dtype) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale (computed in float32)."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",), eager_sharding=False)
    self.eps = eps

  def __call__(self, x_BTD):
    x = x_BTD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


def rope_tables(max_len: int, head_dim: int, theta: float):
  """sin/cos tables of shape [max_len, head_dim // 2]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  ang = jnp.arange(max_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.sin(ang), jnp.cos(ang)


def apply_rope(x_BTHE, positions_BT, theta: float):
  """Rotary embedding (rotate-half form) at integer positions."""
  e = x_BTHE.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  ang_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(ang_BTF)[:, :, None, :], jnp.cos(ang_BTF)[:, :, None, :]
  x = x_BTHE.astype(jnp.float32)
  x1, x2 = x[..., : e // 2], x[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHE.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.wq = _param(rngs, (d, h, e), ("embed", "heads", "head_dim"), cfg.init_std, pd)
    self.wk = _param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    self.wv = _param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    self.wo = _param(rngs, (h, e, d), ("heads", "head_dim", "embed"),
                     cfg.init_std / (2 * cfg.n_layers) ** 0.5, pd)

  def __call__(self, x_BTD, positions_BT):
    from lmx.kernels import attention as attention_lib  # local import: kernels import models lazily

    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    x = x_BTD.astype(dt)
    q_BTHE = jnp.einsum("btd,dhe->bthe", x, self.wq[...].astype(dt))
    k_BTKE = jnp.einsum("btd,dke->btke", x, self.wk[...].astype(dt))
    v_BTKE = jnp.einsum("btd,dke->btke", x, self.wv[...].astype(dt))
    q_BTHE = apply_rope(q_BTHE, positions_BT, cfg.rope_theta)
    k_BTKE = apply_rope(k_BTKE, positions_BT, cfg.rope_theta)
    o_BTHE = attention_lib.attention(q_BTHE, k_BTKE, v_BTKE, causal=True, impl=cfg.attention_impl)
    return jnp.einsum("bthe,hed->btd", o_BTHE, self.wo[...].astype(dt))


class SwiGLU(nnx.Module):
  """Gated feed-forward: (silu(x W1) * x W3) W2."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    d, f = cfg.d_model, cfg.d_ff
    self.w1 = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd)
    self.w3 = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd)
    self.w2 = _param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / (2 * cfg.n_layers) ** 0.5, pd)

  def __call__(self, x_BTD):
    dt = jnp.dtype(self.cfg.dtype)
    x = x_BTD.astype(dt)
    h_BTF = jax.nn.silu(x @ self.w1[...].astype(dt)) * (x @ self.w3[...].astype(dt))
    return h_BTF @ self.w2[...].astype(dt)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + ffn(norm(x))."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.ffn = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x_BTD, positions_BT):
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT)
    return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class Transformer(nnx.Module):
  """Decoder-only LM. ``model(tokens_BT)`` returns logits [B, T, V] (float32)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1.0, pd)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd)

  def __call__(self, tokens_BT, *, positions_BT=None, return_hidden: bool = False):
    """Returns logits_BTV, or (logits_BTV, hidden_LBTD) with the L+1 residual streams (embeddings first)."""
    cfg = self.cfg
    b, t = tokens_BT.shape
    if t > cfg.max_seq_len:
      raise ConfigError(f"sequence length {t} exceeds model.max_seq_len={cfg.max_seq_len} (the RoPE table)")
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    dt = jnp.dtype(cfg.dtype)
    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
    hidden = [x_BTD]
    policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    for block in self.blocks:
      if cfg.remat == "none":
        x_BTD = block(x_BTD, positions_BT)
      else:
        x_BTD = nnx.remat(lambda blk, x, p: blk(x, p), policy=policy[cfg.remat])(block, x_BTD, positions_BT)
      if return_hidden:
        hidden.append(x_BTD)
    h_BTD = self.final_norm(x_BTD)
    w_DV = self.embed[...].T if cfg.tie_embeddings else self.unembed[...]
    logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, w_DV.astype(dt)).astype(jnp.float32)
    if return_hidden:
      return logits_BTV, jnp.stack(hidden)
    return logits_BTV


def num_params(params) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
