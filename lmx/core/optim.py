"""Optimizer from config: ``make_optimizer(config.optim, total_steps) -> (optax transform, lr schedule)``."""
from __future__ import annotations

import optax

from lmx.core.config import check_choice, check_keys, finite, require


OPTIM_FIELDS = ("name", "lr", "warmup_steps", "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm",
                "momentum", "schedule")
NUMERIC_FIELDS = ("lr", "warmup_steps", "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm", "momentum")


SCHEDULES = ("cosine", "constant")


def validate(cfg, prefix: str = "optim") -> None:
  """Range checks of an optimiser config (ConfigError naming the field); every numeric field must be finite."""
  check_keys(cfg, prefix, OPTIM_FIELDS)
  check_choice(cfg.name, f"{prefix}.name", ("adamw", "adam", "sgd"))
  check_choice(cfg.get("schedule", "cosine"), f"{prefix}.schedule", SCHEDULES)
  for f in NUMERIC_FIELDS:
    if f in cfg:
      finite(cfg[f], f"{prefix}.{f}")
  require(cfg.lr > 0, f"{prefix}.lr", f"must be > 0, got {cfg.lr!r}")
  require(cfg.get("warmup_steps", 0) >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {cfg.get('warmup_steps')!r}")
  require(0 <= cfg.get("min_lr_ratio", 0.0) <= 1, f"{prefix}.min_lr_ratio",
          f"must be in [0, 1], got {cfg.get('min_lr_ratio')!r}")
  for f in ("b1", "b2", "momentum"):
    if f in cfg:
      require(0 <= cfg[f] < 1, f"{prefix}.{f}", f"must be in [0, 1), got {cfg[f]!r}")
  for f in ("weight_decay", "clip_norm"):
    if f in cfg:
      require(cfg[f] >= 0, f"{prefix}.{f}", f"must be >= 0, got {cfg[f]!r}")
  if "eps" in cfg:
    require(cfg.eps > 0, f"{prefix}.eps", f"must be > 0, got {cfg.eps!r}")


def make_schedule(cfg, total_steps: int):
  """Linear warmup from 0 over ``warmup_steps`` (capped at ``total_steps - 1``), then cosine decay to
  ``lr * min_lr_ratio`` at ``total_steps`` and constant after; ``schedule='constant'`` keeps lr fixed."""
  check_choice(cfg.get("schedule", "cosine"), "optim.schedule", SCHEDULES)
  if cfg.get("schedule", "cosine") == "constant":
    return optax.constant_schedule(cfg.lr)
  warmup = min(int(cfg.get("warmup_steps", 0)), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else cfg.lr, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.get("min_lr_ratio", 0.0))


def make_optimizer(cfg, total_steps: int):
  """AdamW, Adam (AdamW without weight decay) or SGD (with optional momentum) on :func:`make_schedule`, after
  global-norm clipping to ``clip_norm`` (0: off). Unknown fields, names or out-of-range values raise ConfigError."""
  validate(cfg)
  sched = make_schedule(cfg, total_steps)
  if cfg.name == "sgd":
    opt = optax.sgd(sched, momentum=cfg.get("momentum", 0.0) or None)
  else:
    opt = optax.adamw(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                      weight_decay=cfg.get("weight_decay", 0.0) if cfg.name == "adamw" else 0.0)
  clip = cfg.get("clip_norm", 0.0)
  tx = optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt
  return tx, sched
