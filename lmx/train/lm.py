"""Next-token language-model pretraining: the ``lm`` method, and the shared stage other methods build on.

``run(config, workdir)`` trains one LM run (the ``lm`` method). Other methods use the pieces: ``stage_config`` +
``pretrain_stage`` train a base or teacher LM as a named stage of their own run (skipped when finished),
``load_base`` gives a base model from that pretraining, another lmx run or a Hugging Face checkpoint,
``training`` the data, step and validation hook of one LM training, ``lm_loss`` / ``make_step`` the step.
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from lmx.core import data as data_lib
from lmx.core import loop, mesh as mesh_lib, plots
from lmx.core import schema
from lmx.core.config import ConfigError, require
from lmx.core.losses import next_token_loss
from lmx.core.metrics import Writer
from lmx.core import optim as optim_lib
from lmx.core.optim import make_optimizer
from lmx.core.results import plot_path, summary_line, write_results
from lmx.core.rng import rng_stream
from lmx.datasets import text
from lmx.models import finetune
from lmx.models.registry import build_model
from lmx.models.transformer import num_params

STEPS_FIELD = "train.steps"


def validate(config):
  """Checks the config (its fields against ``configs/lm.py``'s declarations, then what relates fields: the corpus,
  the sequence length against the model's, the vocabulary against the tokenizer's, the fine-tuning block against
  the model) before anything is built; returns the built model (no parameters yet)."""
  schema.validate(config)
  d = config.data
  if not d.get("text_file", ""):
    text.check_corpus(d.corpus)
  optim_lib.validate(config.optim)
  model = build_model(config.model, axis_rules=config.axis_rules)
  require(d.seq_len <= model.cfg.max_seq_len, "data.seq_len",
          f"{d.seq_len} exceeds model.max_seq_len={model.cfg.max_seq_len}")
  if d.get("tokenizer", "bytes") == "model":
    tok = model_tokenizer(config.model)
    require(tok.vocab_size <= model.cfg.vocab_size, "data.tokenizer",
            f"the model's tokenizer has {tok.vocab_size} ids, more than model.vocab_size={model.cfg.vocab_size}")
  else:
    # the built model's vocabulary: a Hugging Face model (model.name='hf') states it in its config.json, not here
    require(model.cfg.vocab_size >= text.VOCAB_SIZE, "model.vocab_size",
            f"must be >= {text.VOCAB_SIZE} for the byte tokenizer, got {model.cfg.vocab_size}")
  finetune.from_config(config.get("finetune"), model.cfg)
  return model


def model_tokenizer(model_cfg):
  """The tokenizer of a config's pretrained model (``data.tokenizer='model'``): SmolLM2's for
  ``smollm2-135m-instruct`` and its stand-in ``smollm2-tiny``, the checkpoint's ``tokenizer.json`` for ``hf``;
  ConfigError for a model without one."""
  from lmx.models import chat

  name = model_cfg.get("name", "transformer")
  if name in ("smollm2-135m-instruct", "smollm2-tiny"):
    return chat.load_tokenizer("smollm2-135m-instruct")
  if name == "hf":
    return chat.load_tokenizer(model_cfg.hf_path)
  raise ConfigError(f"data.tokenizer='model': model.name={name!r} has no tokenizer of its own; use "
                    "smollm2-135m-instruct, smollm2-tiny or hf, or data.tokenizer='bytes'")


def lm_loss(model, ft: finetune.Finetune | None = None):
  """``loss(params, frozen, tokens_BT, rng) -> (loss, metrics)``: next-token CE plus the MoE auxiliary losses.
  With a fine-tune ``ft`` the model runs on ``ft.apply_args(params, frozen)`` (LoRA adapters beside the frozen
  weights, or the trainable and frozen parts joined)."""

  def loss_fn(params, frozen, tokens_BT, rng):
    del rng
    full, lora = (params, None) if ft is None else ft.apply_args(params, frozen)
    logits, aux = model.apply(full, tokens_BT[:, :-1], return_aux=True, **({"lora": lora} if lora else {}))
    ce = next_token_loss(logits, tokens_BT)
    return ce + aux["aux_loss"], {"ce": ce, **aux["metrics"]}

  return loss_fn


def make_step(config, model, mesh):
  """The LM train step users run (``loop.optax_step`` of :func:`lm_loss`), its init and state shardings."""
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  abstract = model.abstract_params()
  shardings = loop.optax_shardings(model.shardings(mesh, config.axis_rules), tx, abstract, mesh)
  return loop.optax_step(lm_loss(model), tx, schedule), (lambda key: loop.optax_state(model.init(key), tx)), \
      shardings


def finetune_step(config, model, mesh, ft: finetune.Finetune) -> dict:
  """The step of a fine-tune (:mod:`lmx.models.finetune`): ``step_fn``, the trainable state's ``init_fn`` (LoRA:
  adapters from the loop's key) or ``init_state`` (the pretrained weights that train), its ``shardings``, and the
  ``frozen`` parameters (the model's ``init`` from ``rng_stream(seed, "base")``: a pretrained model's weights;
  the same on every resume) with their ``frozen_shardings``."""
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  abstract = model.abstract_params()
  param_sh = model.shardings(mesh, config.axis_rules)
  abstract_tr = ft.abstract_trainable(abstract)
  shardings = loop.optax_shardings(ft.trainable_shardings(param_sh, abstract), tx, abstract_tr, mesh)
  with jax.set_mesh(mesh):
    base = jax.jit(model.init, out_shardings=param_sh)(rng_stream(config.seed, "base"))
    trainable, frozen = ft.split(base)
    out = dict(step_fn=loop.optax_step(lm_loss(model, ft), tx, schedule), shardings=shardings, frozen=frozen,
               frozen_shardings=ft.frozen_shardings(param_sh), init_fn=None, init_state=None)
    if ft.lora:
      out["init_fn"] = lambda key: loop.optax_state(ft.init_adapters(key, abstract), tx)
    else:
      out["init_state"] = jax.jit(lambda t: loop.optax_state(t, tx), out_shardings=shardings)(trainable)
  return out


def training(config, model, mesh, *, eval_name: str = "eval") -> dict:
  """What one LM training needs, from an ``lm`` config: ``batches`` (the checkpointable data iterator),
  ``evaluate`` (the held-out hook, logged under ``<eval_name>/``), ``step_fn``, ``init_fn`` (or ``init_state``),
  ``shardings``, ``frozen`` / ``frozen_shardings`` (a fine-tune's frozen parameters; else None), ``finetune``
  (the :class:`~lmx.models.finetune.Finetune` or None), ``split_info`` and ``train_windows``."""
  rules, dcfg = config.axis_rules, config.data
  divisor = mesh_lib.batch_size_divisor(mesh, rules)
  require(dcfg.global_batch % divisor == 0, "data.global_batch",
          f"{dcfg.global_batch} must be divisible by the batch mesh axes' size {divisor}")
  encode_fn = None
  if dcfg.get("tokenizer", "bytes") == "model":
    tok = model_tokenizer(config.model)
    encode_fn = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
  train_src, eval_src, split_info = text.train_eval_windows(dcfg.corpus, dcfg.seq_len, dcfg.eval_fraction,
                                                            split=dcfg.split, seed=dcfg.split_seed,
                                                            encode_fn=encode_fn, text_file=dcfg.get("text_file", ""))
  ds = data_lib.make_dataset(train_src, global_batch=dcfg.global_batch, seed=dcfg.shuffle_seed)
  bsh = mesh_lib.batch_sharding(mesh, rules)
  batches = data_lib.GlobalBatches(data_lib.make_iterator(ds, worker_count=dcfg.worker_count), bsh)
  ft = finetune.from_config(config.get("finetune"), model.cfg)
  if ft is None:
    step_fn, init_fn, shardings = make_step(config, model, mesh)
    parts = dict(step_fn=step_fn, init_fn=init_fn, init_state=None, shardings=shardings, frozen=None,
                 frozen_shardings=None)
  else:
    parts = finetune_step(config, model, mesh, ft)
  bytes_per_token = split_info["eval_bytes"] / max(split_info["eval_tokens"], 1)
  evaluate = heldout_eval(model, eval_src, n_windows=config.train.eval_batches * dcfg.global_batch,
                          divisor=divisor, batch_sharding=bsh, bytes_per_token=bytes_per_token,
                          finetune=ft, frozen=parts["frozen"])
  return dict(parts, batches=batches, evaluate=loop.every(config.train.eval_every, evaluate, name=eval_name),
              split_info=split_info, train_windows=len(train_src), finetune=ft)


def stage_config(parent, *, variant: str, model, optim, data: dict, steps: int, seed: int):
  """The ``lm`` run config of an in-process pretraining stage of another method (LET's teacher, the stability
  gap's base): ``parent``'s mesh and rules, the given model / optimiser / data fields, ``steps`` steps with one
  evaluation and one checkpoint at the end, logging as often as ``parent.train.log_every``."""
  c = ml_collections.ConfigDict()
  c.method, c.variant, c.seed = "lm", variant, int(seed)
  c.mesh = ml_collections.ConfigDict(parent.mesh.to_dict())
  c.axis_rules = parent.axis_rules
  c.model = ml_collections.ConfigDict(model.to_dict())
  c.data = ml_collections.ConfigDict(dict(data))
  c.optim = ml_collections.ConfigDict(optim.to_dict())
  t = int(steps)
  c.train = ml_collections.ConfigDict(dict(
      steps=t, log_every=max(1, min(int(parent.train.log_every), t)), eval_every=t,
      eval_batches=int(parent.train.eval_batches), ckpt_every=t, ckpt_keep=1, async_checkpointing=False,
      plot=False))
  return c


def unprefixed(metrics: dict, prefix: str) -> dict:
  """``metrics`` with the ``prefix`` of its keys removed (a stage's scalars, as a stage's outputs report them)."""
  return {k.removeprefix(prefix): v for k, v in metrics.items()}


def pretrain_stage(stage, workdir: str, name: str, *, writer, mesh=None):
  """``(model, params, info)`` of the :func:`stage_config` run ``stage`` trained as the stage ``name`` of another
  method's run in ``workdir``: checkpoints in ``checkpoints/<name>/``, scalars under ``<name>/`` in the method's
  ``writer`` (held-out CE under ``<name>/eval/``). A finished stage is not trained again: its parameters are read
  back from its last checkpoint; an interrupted one resumes from its newest."""
  from lmx.core import stages
  from lmx.models.registry import load_run

  model = validate(stage)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(stage.mesh)
  trained = {}

  def train() -> dict:
    parts, t = training(stage, model, mesh, eval_name=f"{name}/eval"), stage.train
    res = stages.train(workdir, name, writer=writer, total_steps=t.steps, step_fn=parts["step_fn"],
                       init_fn=parts["init_fn"], state_shardings=parts["shardings"], mesh=mesh, seed=stage.seed,
                       data=parts["batches"], config=stage, hooks=[parts["evaluate"]], log_every=t.log_every,
                       ckpt_every=t.ckpt_every, ckpt_keep=t.ckpt_keep, async_checkpointing=t.async_checkpointing,
                       items_per_step=stage.data.global_batch * stage.data.seq_len)
    trained["params"] = res.state["params"]
    return {"steps": int(t.steps), "final_train": unprefixed(res.last_metrics, f"{name}/"),
            "final_eval": unprefixed(res.hook_metrics.get(f"{name}/eval", {}), f"{name}/eval/"),
            "data_split": parts["split_info"]}

  info = stages.run_stage(workdir, name, train)
  params = trained.get("params")
  if params is None:  # finished earlier: the parameters of its last checkpoint
    _, _, params = load_run(workdir, mesh=mesh, axis_rules=stage.axis_rules,
                            ckpt_dir=stages.checkpoint_dir(workdir, name))
  return model, params, {"source": "pretrain", "stage": name, "steps": info["steps"],
                         "final_eval": info["final_eval"]}


def run_checkpoints(run_dir: str, name: str) -> str:
  """The checkpoints folder of the lmx run in ``run_dir`` to read a model from: its stage ``name``'s
  (``checkpoints/<name>/``: a teacher or base trained as a stage of another method's run) when it has one, else the
  run's own ``checkpoints/``."""
  from lmx.core import stages

  stage = stages.checkpoint_dir(run_dir, name)
  return stage if os.path.isdir(stage) else os.path.join(run_dir, "checkpoints")


def load_base(source: str, *, mesh, axis_rules, stage=None, workdir: str | None = None, writer=None,
              run_dir: str | None = None, model=None, seed: int = 0, name: str = "base"):
  """``(model, params, info)`` of a base (or teacher) LM by ``source``:

  ``"pretrain"``  the :func:`stage_config` run ``stage``, trained as the stage ``name`` of the run in ``workdir``
                  (:func:`pretrain_stage`, logging to ``writer``);
  ``"run"``       the newest checkpoint of the lmx run in ``run_dir`` (of its stage ``name`` when it has one:
                  :func:`run_checkpoints`);
  ``"hf"`` / ``"init"``  ``model`` (built by the caller, e.g. ``model.name='hf'``, whose init reads the checkpoint's
                  weights) initialised on ``mesh`` from ``rng_stream(seed, name)``.
  """
  from lmx.core.rng import rng_stream
  from lmx.models.registry import load_run

  if source == "pretrain":
    return pretrain_stage(stage, workdir, name, writer=writer, mesh=mesh)
  if source == "run":
    d = os.path.expanduser(run_dir)
    _, model, params = load_run(d, mesh=mesh, axis_rules=axis_rules, ckpt_dir=run_checkpoints(d, name))
    return model, params, {"source": "run", "workdir": d}
  if source in ("hf", "init"):
    with jax.set_mesh(mesh):
      params = jax.jit(model.init, out_shardings=model.shardings(mesh, axis_rules))(rng_stream(seed, name))
    return model, params, {"source": source}
  raise ValueError(f"unknown base source {source!r}: 'pretrain', 'run', 'hf' or 'init'")


def heldout_eval(model, eval_src, *, n_windows: int, divisor: int, batch_sharding, bytes_per_token: float = 1.0,
                 finetune=None, frozen=None):
  """The validation hook: next-token CE and bits per byte of ``model`` on a fixed set of held-out windows (the
  first ``n_windows`` of ``eval_src``, rounded down to a multiple of the batch axes' size ``divisor``; no
  shuffle). ``hook(step, state, writer) -> {"ce", "bits_per_byte"}`` (``{}`` when no window fits);
  ``hook.ce(params)`` is the CE alone (None when no window fits), e.g. for a frozen teacher. ``bytes_per_token``
  (text bytes per token of the validation text; 1 for the byte tokenizer) converts nats per token to bits per
  byte. With a fine-tune (``finetune``, ``frozen``: :mod:`lmx.models.finetune`) ``params`` are the trainable part.
  """
  n = min(n_windows, len(eval_src))
  n -= n % divisor
  eval_np = np.stack([eval_src[i] for i in range(n)]) if n else None

  def ce_of(params, frozen, tokens_BT):
    full, lora = (params, None) if finetune is None else finetune.apply_args(params, frozen)
    return next_token_loss(model.apply(full, tokens_BT[:, :-1], **({"lora": lora} if lora else {})), tokens_BT)

  loss = jax.jit(ce_of)

  def ce(params):
    if eval_np is None:
      return None
    return float(loop.host(loss(params, frozen, jax.device_put(eval_np, batch_sharding))))

  def hook(step, state, writer):
    del step, writer
    c = ce(state["params"])
    return {} if c is None else {"ce": c, "bits_per_byte": c / np.log(2) / bytes_per_token}

  hook.ce = ce
  return hook


def describe(ft: finetune.Finetune) -> str:
  """One line: what a fine-tune trains."""
  parts = [f"LoRA r={ft.lora_rank} alpha={ft.lora_alpha:g} on {','.join(ft.lora_targets)}"] if ft.lora else \
      ["full"]
  if ft.freeze_layers:
    parts.append(f"layers < {ft.freeze_layers} frozen")
  if ft.freeze_embeddings and not ft.lora:
    parts.append("embeddings frozen")
  return ", ".join(parts)


def run(config, workdir: str) -> dict:
  t_start = time.time()
  model = validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  model.cfg.check_mesh(dict(mesh.shape))
  dcfg, t = config.data, config.train
  parts = training(config, model, mesh)
  os.makedirs(workdir, exist_ok=True)
  # Per-expert routing scalars go to metrics.jsonl and TensorBoard, not to the console line.
  writer = Writer(workdir, total_steps=t.steps, console_exclude=r"/(load|mean_prob)/e\d+$")
  try:
    n_params = num_params(model.abstract_params())
    ft = parts["finetune"]
    n_trainable = n_params if ft is None else num_params(ft.abstract_trainable(model.abstract_params()))
    writer.text("config", config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else str(config))
    source = dcfg.get("text_file", "") or f"corpus {dcfg.corpus}"
    tuned = "" if ft is None else f" ({n_trainable:,} trainable: {describe(ft)})"
    print(f"lm: {n_params:,} params{tuned}, mesh {dict(mesh.shape)}, {source} "
          f"({parts['train_windows']} train windows of {dcfg.seq_len} "
          f"{'tokens' if dcfg.get('tokenizer', 'bytes') == 'model' else 'bytes'}), workdir {workdir}", flush=True)
    res = loop.train(step_fn=parts["step_fn"], init_fn=parts["init_fn"], init_state=parts["init_state"],
                     frozen=parts["frozen"], frozen_shardings=parts["frozen_shardings"],
                     state_shardings=parts["shardings"], mesh=mesh, workdir=workdir, total_steps=t.steps, seed=config.seed, data=parts["batches"],
                     config=config, writer=writer, hooks=[parts["evaluate"]], log_every=t.log_every,
                     ckpt_every=t.ckpt_every, ckpt_keep=t.ckpt_keep, async_checkpointing=t.async_checkpointing,
                     desc="lm train", items_per_step=dcfg.global_batch * dcfg.seq_len)
    results = {
        "method": "lm", "variant": config.variant, "params": n_params, "trainable_params": n_trainable,
        "finetune": None if ft is None else describe(ft), "steps": t.steps,
        "resumed_from": res.resumed_from, "final_train": res.last_metrics,
        "final_eval": res.hook_metrics.get("eval", {}), "steps_per_sec": res.steps_per_sec,
        "compile_wall_s": res.compile_seconds, "data_split": parts["split_info"], "wall_s": time.time() - t_start,
    }
    path = write_results(workdir, results)
    if jax.process_index() == 0 and t.plot:
      png = plots.from_jsonl(os.path.join(workdir, "metrics.jsonl"), ["train/loss", "eval/ce"],
                             plot_path(workdir, "loss"), title=f"lm {config.variant or 'default'}")
      writer.image("plots/loss", png, t.steps)
  finally:
    writer.close()
  summary_line("lm", {"train loss": res.last_metrics.get("train/loss"),
                      f"eval CE (nats/{'token' if dcfg.get('tokenizer', 'bytes') == 'model' else 'byte'})":
                          results["final_eval"].get("eval/ce"),
                      "eval bits/byte": results["final_eval"].get("eval/bits_per_byte"),
                      "wall s": round(results["wall_s"])}, path)
  return results
