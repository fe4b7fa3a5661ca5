"""Plain next-token language-model pretraining on an embedded corpus (the runtime's end-to-end method)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmx.core import data as data_lib
from lmx.core import loop, mesh as mesh_lib, plots
from lmx.core.config import check_keys, require
from lmx.core.metrics import Writer
from lmx.core.optim import make_optimizer
from lmx.datasets import text
from lmx.models.transformer import Transformer, TransformerConfig, num_params

CONFIG_FIELDS = ("method", "variant", "seed", "mesh", "axis_rules", "model", "data", "optim", "train")
DATA_FIELDS = ("corpus", "seq_len", "global_batch", "eval_fraction", "shuffle_seed", "worker_count")
TRAIN_FIELDS = ("steps", "log_every", "eval_every", "eval_batches", "ckpt_every", "ckpt_keep",
                "async_checkpointing", "plot")


def validate(config) -> TransformerConfig:
  """Checks every field before anything is built; returns the model config."""
  check_keys(config, "config", CONFIG_FIELDS)
  check_keys(config.data, "data", DATA_FIELDS)
  check_keys(config.train, "train", TRAIN_FIELDS)
  mcfg = TransformerConfig.from_config(config.model)
  require(config.data.seq_len <= mcfg.max_seq_len, "data.seq_len",
          f"{config.data.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
  require(config.model.vocab_size >= text.VOCAB_SIZE, "model.vocab_size",
          f"must be >= {text.VOCAB_SIZE} for the byte tokenizer")
  for f in ("steps", "log_every", "eval_every", "ckpt_every", "ckpt_keep"):
    require(config.train[f] > 0, f"train.{f}", f"must be > 0, got {config.train[f]}")
  return mcfg


def next_token_loss(logits_BTV, targets_BT):
  """Mean cross-entropy of next-token prediction (float32)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


def build(config, mesh):
  """Model graph, init function and param shardings (shared with methods that train the same LM)."""
  mcfg = TransformerConfig.from_config(config.model)
  abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  shardings = mesh_lib.param_shardings(abstract_params, mesh, config.axis_rules)

  def init_params(key):
    return nnx.to_pure_dict(nnx.split(Transformer(mcfg, rngs=nnx.Rngs(params=key)), nnx.Param)[1])

  return mcfg, graphdef, init_params, shardings


def run(config, workdir: str) -> dict:
  mcfg = validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  mcfg.check_mesh(dict(mesh.shape))
  rules = config.axis_rules
  dcfg = config.data
  divisor = mesh_lib.batch_size_divisor(mesh, rules)
  require(dcfg.global_batch % divisor == 0, "data.global_batch",
          f"{dcfg.global_batch} must be divisible by the batch mesh axes' size {divisor}")
  train_src, eval_src = text.train_eval_windows(dcfg.corpus, dcfg.seq_len, dcfg.eval_fraction)
  ds = data_lib.make_dataset(train_src, global_batch=dcfg.global_batch, seed=dcfg.shuffle_seed)
  bsh = mesh_lib.batch_sharding(mesh, rules)
  batches = data_lib.GlobalBatches(data_lib.make_iterator(ds, worker_count=dcfg.worker_count), bsh)

  _, graphdef, init_params, shardings = build(config, mesh)
  tx, schedule = make_optimizer(config.optim, config.train.steps)

  def loss_fn(params, batch_BT, rng):
    del rng
    model = nnx.merge(graphdef, params)
    logits, aux = model(batch_BT[:, :-1], return_aux=True)
    ce = next_token_loss(logits, batch_BT[:, 1:])
    return ce + aux["aux_loss"], {"ce": ce, **aux["metrics"]}

  # Eval: a fixed set of held-out windows (no shuffle), loss and bits per byte.
  n_eval = min(config.train.eval_batches * dcfg.global_batch, len(eval_src))
  n_eval -= n_eval % divisor
  eval_np = np.stack([eval_src[i] for i in range(n_eval)]) if n_eval else None

  @jax.jit
  def eval_loss(params, batch_BT):
    logits = nnx.merge(graphdef, params)(batch_BT[:, :-1])
    return next_token_loss(logits, batch_BT[:, 1:])

  def eval_fn(params):
    if eval_np is None:
      return {}
    with jax.set_mesh(mesh):
      ce = float(loop.host(eval_loss(params, jax.device_put(eval_np, bsh))))
    return {"ce": ce, "bits_per_byte": ce / np.log(2)}

  os.makedirs(workdir, exist_ok=True)
  # Per-expert routing scalars go to metrics.jsonl and TensorBoard, not to the console line.
  writer = Writer(workdir, total_steps=config.train.steps, console_exclude=r"/(load|mean_prob)/e\d+$")
  with jax.set_mesh(mesh):
    n_params = num_params(jax.eval_shape(init_params, jax.random.key(0)))
  writer.text("config", config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else str(config))
  print(f"lm: {n_params:,} params, mesh {dict(mesh.shape)}, corpus {dcfg.corpus} "
        f"({len(train_src)} train windows of {dcfg.seq_len}), workdir {workdir}", flush=True)
  try:
    res = loop.train(config=config, workdir=workdir, mesh=mesh, init_params=init_params, loss_fn=loss_fn,
                     params_shardings=shardings, tx=tx, schedule=schedule, batches=batches,
                     total_steps=config.train.steps, eval_fn=eval_fn, writer=writer,
                     items_per_step=dcfg.global_batch * dcfg.seq_len)
  finally:
    writer.close()
  results = {
      "method": "lm", "variant": config.variant, "params": n_params, "steps": config.train.steps,
      "resumed_from": res.resumed_from, "final_train": res.last_metrics, "final_eval": res.eval_metrics,
      "steps_per_sec": res.steps_per_sec, "compile_seconds": res.compile_seconds,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    if config.train.plot:
      plots.from_jsonl(os.path.join(workdir, "metrics.jsonl"), ["train/loss", "eval/ce"],
                       os.path.join(workdir, "plots", "loss.png"), title=f"lm {config.variant or 'default'}")
  return results
