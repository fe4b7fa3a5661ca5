"""Config blocks several methods share, declared once (:mod:`lmx.core.schema`): the optimiser, the mesh, the LM
data and training cadence. A config file uses them as ``optim=blocks.optim(lr=3e-3, warmup_steps=50)``: every field
of the block with the given defaults, each checked the same way in every method."""
from __future__ import annotations

from lmx.core.schema import F, open_block

SCHEDULES = ("cosine", "constant")

# The optimiser (lmx.core.optim.make_optimizer reads it): name, peak lr, linear warmup then cosine decay to
# lr · min_lr_ratio (or constant), Adam's b1/b2/eps, decoupled weight decay (adamw), SGD momentum, global-norm
# clipping (0: off).
OPTIM = dict(
    name=F("adamw", choices=("adamw", "adam", "sgd")),
    lr=F(1e-3, gt=0),
    warmup_steps=F(0, ge=0, integer=True),
    min_lr_ratio=F(0.0, ge=0, le=1),
    b1=F(0.9, ge=0, lt=1),
    b2=F(0.999, ge=0, lt=1),
    eps=F(1e-8, gt=0),
    weight_decay=F(0.0, ge=0),
    clip_norm=F(0.0, ge=0),
    momentum=F(0.0, ge=0, lt=1),
    schedule=F("cosine", choices=SCHEDULES),
)

# Mesh axis sizes (-1: the remaining devices). Checkpoints restore onto any mesh, so a resume may change them.
MESH = dict(data=F(-1, ge=-1, integer=True, safe=True), fsdp=F(1, ge=-1, integer=True, safe=True),
            model=F(1, ge=-1, integer=True, safe=True), expert=F(1, ge=-1, integer=True, safe=True))

# The training cadence of an LM run (steps and when to log, evaluate, checkpoint, plot).
LM_TRAIN = dict(
    steps=F(600, ge=1, integer=True),
    log_every=F(25, ge=1, integer=True, safe=True),
    eval_every=F(200, ge=1, integer=True, safe=True),
    eval_batches=F(4, ge=1, integer=True, safe=True),
    ckpt_every=F(200, ge=1, integer=True, safe=True),
    ckpt_keep=F(3, ge=1, integer=True, safe=True),
    async_checkpointing=F(True, safe=True),
    plot=F(True, safe=True),
)


# Numerics-neutral implementation choices of a transformer (lmx.models.transformer): a resume may change them.
TRANSFORMER_SAFE_KEYS = ("attention_impl", "remat", "moe_impl")


def transformer(**fields):
  """A transformer model block (its keys are checked by ``lmx.models.transformer.TransformerConfig``)."""
  return open_block(fields, safe_keys=TRANSFORMER_SAFE_KEYS)


def _with(declarations: dict, defaults: dict, name: str) -> dict:
  unknown = sorted(set(defaults) - set(declarations))
  if unknown:
    raise KeyError(f"{name} block has no field(s) {unknown}; fields: {sorted(declarations)}")
  import dataclasses

  return {k: (dataclasses.replace(spec, default=defaults[k]) if k in defaults else spec)
          for k, spec in declarations.items()}


def optim(**defaults) -> dict:
  """Every optimiser field, with ``defaults`` replacing the block's defaults."""
  return _with(OPTIM, defaults, "optim")


def mesh(**defaults) -> dict:
  return _with(MESH, defaults, "mesh")


def lm_train(**defaults) -> dict:
  return _with(LM_TRAIN, defaults, "train")
