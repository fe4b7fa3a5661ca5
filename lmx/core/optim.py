"""Optimizer from config: ``make_optimizer(config.optim, total_steps) -> (optax transform, lr schedule)``."""
from __future__ import annotations

import optax

from lmx.core import blocks, schema
from lmx.core.blocks import SCHEDULES
from lmx.core.config import check_choice


def validate(cfg, prefix: str = "optim") -> None:
  """Checks an optimiser block against its declaration (:data:`lmx.core.blocks.OPTIM`): unknown fields, names,
  finite numbers in range; ConfigError naming the field."""
  schema.check_block(cfg, blocks.OPTIM, prefix)


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
