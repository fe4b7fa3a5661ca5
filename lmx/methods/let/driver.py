"""LET driver: a frozen teacher's late features align an early student layer during steps [0, S_stop), then CE.

The run's stages (see ``configs/let.py``), each a resumable stage of the one workdir (:mod:`lmx.core.stages`):
  ``teacher``   pretrained in-process as an ``lm`` training (``teacher.source='pretrain'``; its checkpoints in
                ``checkpoints/teacher/``), or restored params-only from another lmx run, or read from a Hugging Face
                checkpoint; frozen and passed to the loop as a frozen input;
  ``baseline``  with ``let.with_baseline``: the same student, seed and data order with λ0 = 0;
  ``let``       the LET student.
A student stage has two phases on one train state and one data stream (``checkpoints/<stage>/``): ``<stage>/align``
runs the LET step (CE + λ(s)·align, the teacher's forward inside jit) up to S_stop, ``<stage>/ce`` the plain CE step
(no teacher, a second compiled step) from the alignment phase's last checkpoint to the end. results.json reports
each phase's steps/s (the teacher's forward is the difference) and the comparison with the baseline.

A teacher read from disk (``teacher.hf_path``, or ``teacher.workdir``'s newest checkpoint) is fingerprinted when
the run starts (``<workdir>/teacher_fingerprint.json``: each file's size, time and a hash); a resume whose teacher
files differ stops with a message naming the path and what changed, since other weights at the same path would
silently change what the student is aligned to.
"""
from __future__ import annotations

import copy
import datetime
import functools
import hashlib
import json
import os
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmx.core import data as data_lib
from lmx.core import loop, mesh as mesh_lib, plots, stages
from lmx.core import metrics as metrics_lib
from lmx.core import workdir as wd
from lmx.core import schema
from lmx.core.config import ConfigError, require
from lmx.core.losses import next_token_loss
from lmx.core.metrics import Writer
from lmx.core.optim import make_optimizer
from lmx.core.results import plot_path, summary_line, write_results
from lmx.datasets import text
from lmx.methods.let import compare, losses
from lmx.models.registry import build_model
from lmx.models.transformer import num_params
from lmx.train.lm import heldout_eval, load_base, run_checkpoints, stage_config, unprefixed

# S_stop, the lr schedule and the finished stages are tied to train.steps: a finished run is not continued
STEPS_FIELD = None
# The fields LET's data block adds to configs/lm.py's (data.source='tfds': lmx.datasets.tfds_text); the teacher's lm
# pretraining stage gets the others.
TFDS_DATA_FIELDS = ("source", "tfds_name", "tfds_split", "tfds_eval_split", "data_dir", "text_key", "tokenizer")


def s_stop(config) -> int:
  """S_stop in steps: ``let.s_stop`` when > 0, else ``round(let.s_stop_fraction · train.steps)`` (at least 1)."""
  if config.let.s_stop > 0:
    return int(config.let.s_stop)
  return max(1, int(round(config.let.s_stop_fraction * config.train.steps)))


def teacher_model(config):
  """The teacher's registry Model (no parameters): its architecture from ``teacher.model`` (pretrain), the
  run's saved config (run) or the checkpoint's config.json (hf)."""
  t = config.teacher
  if t.source == "pretrain":
    return build_model(t.model, axis_rules=config.axis_rules)
  if t.source == "hf":
    require(bool(t.hf_path), "teacher.hf_path", "is required for teacher.source='hf' (a local HF checkpoint dir)")
    path = os.path.expanduser(t.hf_path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"teacher.hf_path={t.hf_path!r} is not a directory; download the checkpoint there "
                              "or set teacher.source='pretrain'")
    return build_model(ml_collections.ConfigDict(dict(name="hf", hf_path=path)), axis_rules=config.axis_rules)
  require(bool(t.workdir), "teacher.workdir", "is required for teacher.source='run' (an lmx run's workdir)")
  if not os.path.isdir(os.path.join(t.workdir, "checkpoints")):
    raise FileNotFoundError(f"teacher.workdir={t.workdir!r} has no checkpoints/; name the workdir of an lmx run")
  from lmx.core.checkpoint import Checkpointer

  with Checkpointer(run_checkpoints(t.workdir, "teacher"), async_save=False) as ckpt:
    steps = ckpt.all_steps()
    raw = ckpt.restore_config(steps[-1]) if steps else None
  if raw is None:
    raise FileNotFoundError(f"teacher.workdir={t.workdir!r}: no readable checkpoint with a config")
  return build_model(ml_collections.ConfigDict(raw).model, axis_rules=config.axis_rules)


def validate(config, *, check_teacher_source: bool = True):
  """Checks the config (each field against its declaration in ``configs/let.py``, then what relates fields or
  needs the built models: the corpus, S_stop against the steps, the layers against the models' depths, the
  vocabularies and sequence lengths); returns ``(student, teacher)`` Models (no parameters yet)."""
  schema.validate(config)
  compare.validate_block(config.compare)
  d, t, lc = config.data, config.teacher, config.let
  if d.source == "embedded":
    text.check_corpus(d.corpus)
  else:
    require(bool(d.tfds_name), "data.tfds_name", "is required for data.source='tfds'")
  require(lc.s_stop > 0 or 0 < lc.s_stop_fraction <= 1, "let.s_stop_fraction",
          f"must be in (0, 1] when let.s_stop is 0, got {lc.s_stop_fraction}")
  require(s_stop(config) <= config.train.steps, "let.s_stop",
          f"{s_stop(config)} exceeds train.steps={config.train.steps}")
  student = build_model(config.model, axis_rules=config.axis_rules)
  require(student.name == "transformer", "model.name", "the LET student must be the lmx transformer")
  require(d.seq_len <= student.cfg.max_seq_len, "data.seq_len",
          f"{d.seq_len} exceeds model.max_seq_len={student.cfg.max_seq_len}")
  if d.source == "embedded" or not d.tokenizer:
    require(config.model.vocab_size >= text.VOCAB_SIZE, "model.vocab_size",
            f"must be >= {text.VOCAB_SIZE} for the byte tokenizer")
  n = student.cfg.n_layers
  require(0 <= lc.student_layer < n, "let.student_layer", f"must be a block index in [0, {n}), got "
          f"{lc.student_layer}")
  teacher = teacher_model(config) if (check_teacher_source or t.source == "pretrain") else None
  if teacher is not None:
    nt = teacher.cfg.n_layers
    require(-1 <= lc.teacher_layer < nt, "let.teacher_layer",
            f"must be -1 (final, after the final norm) or a block index in [0, {nt}), got {lc.teacher_layer}")
    require(teacher.cfg.vocab_size == student.cfg.vocab_size, "teacher.model.vocab_size",
            f"the teacher's vocabulary ({teacher.cfg.vocab_size}) must be the student's "
            f"({student.cfg.vocab_size}): LET aligns positions one to one, so both share one tokenizer")
    require(d.seq_len <= teacher.cfg.max_seq_len, "teacher.model.max_seq_len",
            f"{teacher.cfg.max_seq_len} is shorter than data.seq_len={d.seq_len}")
  return student, teacher


# ------------------------------------------------------------------------------------------ the two steps


def student_forward(model, params, x_BT, layer: int):
  """``(logits_BTV, h_BTD after block layer, aux_loss)`` of the student."""
  logits, hiddens, aux = model.apply(params, x_BT, hidden_layers=(layer,), return_aux=True)
  return logits, hiddens[f"block{layer}"], aux["aux_loss"]


def teacher_features(model, params, x_BT, layer: int):
  """The teacher's hidden state [B, T, dT]: ``layer=-1`` the post-final-norm state, else after block ``layer``."""
  i = model.cfg.n_layers - 1 if layer == -1 else layer
  _, hiddens = model.apply(params, x_BT, hidden_layers=(i,))
  return jax.lax.stop_gradient(hiddens["final"] if layer == -1 else hiddens[f"block{i}"])


def weight_fn(config):
  """``step -> λ(step)`` (traced), by ``let.schedule``."""
  lc, stop = config.let, s_stop(config)
  if lc.schedule == "constant":
    return lambda step: jnp.where(jnp.asarray(step) < stop, jnp.float32(lc.lam0), jnp.float32(0.0))
  return lambda step: losses.let_weight(step, lc.lam0, stop)


def make_losses(config, student, teacher):
  """``(let_loss, ce_loss)``, each ``loss(trainable, frozen, tokens_BT, step) -> (loss, metrics)``;
  ``trainable = {"params": student params[, "proj": projector]}``, ``frozen = {"teacher": params}``."""
  lc = config.let
  k, weight = int(lc.student_layer), weight_fn(config)

  def let_loss(trainable, frozen, tokens_BT, step):
    x_BT = tokens_BT[:, :-1]
    logits, h_s, aux_loss = student_forward(student, trainable["params"], x_BT, k)
    ce = next_token_loss(logits, tokens_BT)
    h_t = teacher_features(teacher, frozen["teacher"], x_BT, int(lc.teacher_layer))
    mask_BT = x_BT != text.PAD
    align = losses.align_loss(h_s, h_t, mask_BT, mode=lc.align, proj=trainable.get("proj"))
    lam = weight(step)
    return ce + aux_loss + lam * align, {"ce": ce, "align": align, "lambda": lam}

  def ce_loss(trainable, frozen, tokens_BT, step):
    del frozen, step
    logits, aux = student.apply(trainable["params"], tokens_BT[:, :-1], return_aux=True)
    ce = next_token_loss(logits, tokens_BT)
    return ce + aux["aux_loss"], {"ce": ce, "lambda": jnp.float32(0.0)}

  return let_loss, ce_loss


def make_steps(config, student, teacher, mesh):
  """``(let_step, ce_step, init_fn, state_shardings)``: two loop steps on one train state
  ``{"params", ["proj",] "opt_state"}`` (the projector trained with the student by the same optimiser)."""
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  rules = config.axis_rules
  use_proj = config.let.align == "project"
  d_s = student.cfg.d_model
  d_t = teacher.cfg.d_model if teacher is not None else config.teacher.model.d_model
  abstract = {"params": student.abstract_params()}
  tr_sh = {"params": student.shardings(mesh, rules)}
  if use_proj:
    abstract["proj"] = jax.eval_shape(lambda: losses.init_projector(d_s, d_t))
    tr_sh["proj"] = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract["proj"])
  sh = loop.optax_shardings(tr_sh, tx, abstract, mesh)
  shardings = {**sh["params"], "opt_state": sh["opt_state"]}

  def init_fn(key):
    trainable = {"params": student.init(key)}
    if use_proj:
      trainable["proj"] = losses.init_projector(d_s, d_t)
    return {**trainable, "opt_state": tx.init(trainable)}

  let_loss, ce_loss = make_losses(config, student, teacher)
  as_step = functools.partial(loop.optax_step, tx=tx, schedule=schedule, trainable=tuple(abstract), pass_step=True)
  return as_step(let_loss), as_step(ce_loss), init_fn, shardings


# ------------------------------------------------------------------------------------------ the teacher


def teacher_lm_config(config):
  """The ``lm`` run config that pretrains the teacher in-process on the student's corpus and split."""
  data = {f: v for f, v in config.data.items() if f not in TFDS_DATA_FIELDS}
  return stage_config(config, variant="let_teacher", model=config.teacher.model, optim=config.teacher.optim,
                      data=data, steps=config.teacher.steps, seed=config.seed)


def load_teacher(config, workdir: str, mesh, writer):
  """``(teacher Model, params on mesh, info dict)`` by ``teacher.source`` (``'pretrain'``: the stage ``teacher``
  of the run in ``workdir``, logging to ``writer``)."""
  t = config.teacher
  model, params, info = load_base(
      t.source, mesh=mesh, axis_rules=config.axis_rules, workdir=workdir, writer=writer,
      stage=teacher_lm_config(config) if t.source == "pretrain" else None, run_dir=t.workdir,
      model=teacher_model(config) if t.source == "hf" else None, seed=config.seed, name="teacher")
  if t.source == "hf":
    info["hf_path"] = t.hf_path
  return model, params, info


# ------------------------------------------------------------------------------------------ the teacher's files

TEACHER_RECORD = "teacher_fingerprint.json"
_HF_WEIGHT_FILES = (".safetensors", ".safetensors.index.json")
_WHOLE_HASH_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones by 16 spread 1 MiB blocks


def _file_hash(path: str, size: int) -> str:
  """sha256 of the file, or for a large one of its size and 16 evenly spread 1 MiB blocks (new weights of the same
  architecture have the same size and header but differ throughout)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= _WHOLE_HASH_BYTES:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    else:
      h.update(str(size).encode())
      for i in range(16):
        f.seek((size - (1 << 20)) * i // 15)
        h.update(f.read(1 << 20))
  return h.hexdigest()


def _fingerprint_files(root: str, rels: list[str]) -> dict:
  out = {}
  for rel in rels:
    path = os.path.join(root, rel)
    st = os.stat(path)
    out[rel] = {"size": st.st_size, "mtime": st.st_mtime, "sha256": _file_hash(path, st.st_size)}
  return out


def teacher_fingerprint(config) -> dict | None:
  """``{"source", "path", "step", "files": {name: {size, mtime, sha256}}}`` of the teacher's weights on disk:
  ``teacher.hf_path``'s safetensors and config.json, or every file of ``teacher.workdir``'s newest checkpoint (the
  one ``load_run`` reads). None for ``teacher.source='pretrain'`` (the teacher is this run's own stage)."""
  t = config.teacher
  if t.source == "hf":
    root = os.path.expanduser(t.hf_path or "")
    if not os.path.isdir(root):
      return None  # load_teacher says what is wrong with the path
    rels = sorted(f for f in os.listdir(root) if f.endswith(_HF_WEIGHT_FILES) or f == "config.json")
    return {"source": "hf", "path": t.hf_path, "step": None, "files": _fingerprint_files(root, rels)}
  if t.source == "run":
    step = wd.newest_checkpoint_step(t.workdir)
    root = os.path.join(t.workdir, "checkpoints")
    rels = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(os.path.join(root, str(step)))
                  for f in fs) if step is not None else []
    return {"source": "run", "path": t.workdir, "step": step, "files": _fingerprint_files(root, rels)}
  return None


def _when(mtime) -> str:
  return datetime.datetime.fromtimestamp(mtime).isoformat(timespec="seconds") if mtime else "?"


def teacher_changes(old: dict, new: dict) -> list[str]:
  """What differs between two :func:`teacher_fingerprint` s, one phrase per change."""
  if old.get("step") != new.get("step"):
    return [f"its newest checkpoint is step {new.get('step')}, not step {old.get('step')}"]
  a, b = old.get("files", {}), new.get("files", {})
  out = [f"{n}: removed" for n in sorted(set(a) - set(b))] + [f"{n}: added" for n in sorted(set(b) - set(a))]
  for n in sorted(set(a) & set(b)):
    if a[n].get("size") != b[n]["size"]:
      out.append(f"{n}: {a[n].get('size')} bytes → {b[n]['size']}, modified {_when(b[n]['mtime'])}")
    elif a[n].get("sha256") != b[n]["sha256"]:
      out.append(f"{n}: other contents (same size), modified {_when(a[n].get('mtime'))} → {_when(b[n]['mtime'])}")
  return out


def check_teacher(config, workdir: str) -> dict | None:
  """The teacher's fingerprint, to record with :func:`record_teacher` when this run starts; None when the workdir
  recorded one already and it still holds. Raises ConfigError, naming the path and the changes, when the teacher's
  files differ from those this run started with."""
  new = teacher_fingerprint(config)
  if new is None:
    return None
  try:
    with open(os.path.join(workdir, TEACHER_RECORD)) as f:
      old = json.load(f)
  except (OSError, ValueError):  # none yet (or a torn one): this run's teacher is the one to record
    return new
  changes = teacher_changes(old, new) if old.get("path") == new["path"] else [
      f"it was {old.get('source')} {old.get('path')!r}"]
  if not changes:
    return None
  field = "teacher.hf_path" if new["source"] == "hf" else "teacher.workdir"
  raise ConfigError(
      f"{field}={new['path']!r} holds other teacher weights than when this run started in {workdir} "
      f"({'; '.join(changes[:4])}{'; ...' if len(changes) > 4 else ''}): resuming would align the student to another "
      f"teacher. Put the original teacher back, or start a new --workdir (nothing was changed; the record is "
      f"{os.path.join(workdir, TEACHER_RECORD)})")


def record_teacher(workdir: str, fingerprint: dict | None) -> None:
  if fingerprint is not None and jax.process_index() == 0:
    tmp = os.path.join(workdir, TEACHER_RECORD + ".tmp")
    with open(tmp, "w") as f:
      json.dump(fingerprint, f, indent=1)
    os.replace(tmp, os.path.join(workdir, TEACHER_RECORD))


# ------------------------------------------------------------------------------------------ the data


def make_data(config, batch_sharding, n_eval_windows: int, *, vocab_size: int):
  """``(train batches, eval windows, split info)``: the embedded corpus split by document, or a prepared tfds
  text data set (train split shuffled and packed; the first windows of the eval split as validation)."""
  d = config.data
  if d.source == "embedded":
    train_src, eval_src, split_info = text.train_eval_windows(d.corpus, d.seq_len, d.eval_fraction, split=d.split,
                                                              seed=d.split_seed)
    ds = data_lib.make_dataset(train_src, global_batch=d.global_batch, seed=d.shuffle_seed)
    return data_lib.GlobalBatches(data_lib.make_iterator(ds, worker_count=d.worker_count), batch_sharding), \
        eval_src, split_info
  from lmx.datasets import tfds_text
  from lmx.datasets.tokenizer import load_tokenizer

  if d.tokenizer:
    tok = load_tokenizer(os.path.expanduser(d.tokenizer))
    require(tok.vocab_size <= vocab_size, "data.tokenizer",
            f"its vocabulary ({tok.vocab_size}) exceeds model.vocab_size={vocab_size}")
    tokenize = tfds_text.hf_tokenize(tok)
  else:
    tokenize = tfds_text.byte_tokenize
  data_dir = d.data_dir or None
  train = tfds_text.packed_windows(tfds_text.open_source(d.tfds_name, d.tfds_split, data_dir=data_dir),
                                   seq_len=d.seq_len, global_batch=d.global_batch, seed=d.shuffle_seed,
                                   tokenize=tokenize, text_key=d.text_key)
  if d.worker_count > 0:
    train = train.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  eval_np = tfds_text.eval_windows(tfds_text.open_source(d.tfds_name, d.tfds_eval_split, data_dir=data_dir),
                                   seq_len=d.seq_len, n_windows=n_eval_windows, tokenize=tokenize,
                                   text_key=d.text_key)
  split_info = {"split": "tfds", "tfds_name": d.tfds_name, "train_split": d.tfds_split,
                "eval_split": d.tfds_eval_split, "eval_windows": int(len(eval_np)),
                "tokenizer": d.tokenizer or "bytes"}
  return data_lib.GlobalBatches(iter(train), batch_sharding), eval_np, split_info


# ------------------------------------------------------------------------------------------ the run


def baseline_config(config):
  """The paired baseline of a run: the same config, seed and data order with λ0 = 0 (same steps, same teacher
  input, so its step time is comparable)."""
  c = copy.deepcopy(config)
  c.let.lam0, c.let.with_baseline = 0.0, False
  return c


def train_student(config, workdir: str, name: str, *, student, teacher, teacher_params, mesh, writer) -> dict:
  """The student of ``config`` trained as the stage ``name`` of the run in ``workdir``: the phases
  ``<name>/align`` (steps [0, S_stop), the LET step with the frozen teacher) and ``<name>/ce`` (plain CE to the
  end) on one train state and data stream, checkpoints in ``checkpoints/<name>/``, scalars under ``<name>/`` and
  the held-out CE under ``<name>/eval/``. Returns each phase's outputs (finished phases are read back) and the
  validation curve ``eval_steps``/``eval_ce``."""
  d, t = config.data, config.train
  divisor = mesh_lib.batch_size_divisor(mesh, config.axis_rules)
  bsh = mesh_lib.batch_sharding(mesh, config.axis_rules)
  n_windows = t.eval_batches * d.global_batch
  batches, eval_src, _ = make_data(config, bsh, n_windows, vocab_size=student.cfg.vocab_size)
  let_step, ce_step, init_fn, shardings = make_steps(config, student, teacher, mesh)
  evaluate = heldout_eval(student, eval_src, n_windows=n_windows, divisor=divisor, batch_sharding=bsh)
  common = dict(writer=writer, init_fn=init_fn, state_shardings=shardings, mesh=mesh, seed=config.seed,
                data=batches, config=config, hooks=[loop.every(t.eval_every, evaluate, name=f"{name}/eval")],
                log_every=t.log_every, ckpt_every=t.ckpt_every, ckpt_keep=t.ckpt_keep,
                async_checkpointing=t.async_checkpointing, items_per_step=d.global_batch * d.seq_len)
  stop = s_stop(config)

  def phase(step_fn, total: int, what: str, frozen=None):
    def fn() -> dict:
      res = stages.train(workdir, name, total_steps=total, step_fn=step_fn, frozen=frozen, desc=f"{name} ({what})",
                         **common)
      return {"steps_per_sec": res.steps_per_sec, "compile_wall_s": res.compile_seconds,
              "final_train": unprefixed(res.last_metrics, f"{name}/"),
              "final_eval": unprefixed(res.hook_metrics.get(f"{name}/eval", {}), f"{name}/eval/")}
    return fn

  out = {"align": stages.run_stage(workdir, f"{name}/align", phase(let_step, stop, "with the teacher",
                                                                     {"teacher": teacher_params}))}
  if stop < t.steps:
    out["ce"] = stages.run_stage(workdir, f"{name}/ce", phase(ce_step, t.steps, "CE only"))
  steps, ce = metrics_lib.curves(os.path.join(workdir, "metrics.jsonl"), prefix=f"{name}/eval/")["ce"]
  out["eval_steps"], out["eval_ce"] = [int(x) for x in steps], [float(x) for x in ce]
  return out


def vs_baseline(config, workdir: str, base: dict, student: dict, writer) -> dict:
  """This run's validation curve against its paired baseline's: both final CEs, the steps this run needs to reach
  the baseline's final CE and the speedup (lmx.methods.let.compare.summarize), plus a two-curve plot."""
  curves = {arm: (np.asarray(r["eval_steps"]), np.asarray(r["eval_ce"])) for arm, r in
            (("baseline", base), ("let", student))}
  table = compare.summarize({config.seed: curves}, ("baseline", "let"), int(config.train.steps))
  row = table["per_seed"][str(config.seed)]
  out = {"baseline_final_eval_ce": row["baseline"]["final_eval_ce"],
         "let_final_eval_ce": row["let"]["final_eval_ce"], "steps_to_baseline_final":
         row["let"]["steps_to_baseline_final"], "speedup": row["let"]["speedup"]}
  if jax.process_index() == 0 and config.train.plot:
    png = plots.curves(plot_path(workdir, "vs_baseline"), {k: tuple(map(list, v)) for k, v in curves.items()},
                       title=f"LET vs baseline (λ0 = 0), seed {config.seed}: validation CE")
    writer.image("plots/vs_baseline", png, int(config.train.steps))
  return out


def teacher_step_time_overhead(student: dict) -> float | None:
  """(CE-only steps/s) / (LET steps/s) − 1: the teacher forward's share of a LET step, in this run."""
  a, c = student["align"].get("steps_per_sec"), student.get("ce", {}).get("steps_per_sec")
  ok = a and c and np.isfinite(a) and np.isfinite(c)
  return float(c / a - 1.0) if ok else None


def run(config, workdir: str) -> dict:
  t_start = time.time()
  student, _ = validate(config, check_teacher_source=False)
  d, t = config.data, config.train
  require(d.source == "embedded" or config.teacher.source != "pretrain", "teacher.source",
          "'pretrain' trains the teacher on the embedded corpus; with data.source='tfds' name a trained teacher "
          "(teacher.source='run' or 'hf')")
  mesh = mesh_lib.make_mesh(config.mesh)
  student.cfg.check_mesh(dict(mesh.shape))
  divisor = mesh_lib.batch_size_divisor(mesh, config.axis_rules)
  require(d.global_batch % divisor == 0, "data.global_batch",
          f"{d.global_batch} must be divisible by the batch mesh axes' size {divisor}")
  os.makedirs(workdir, exist_ok=True)
  fingerprint = check_teacher(config, workdir)  # new weights at the same teacher path must not resume silently
  record_teacher(workdir, fingerprint)
  writer = Writer(workdir, total_steps=t.steps)
  try:
    writer.text("config", config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else str(config))
    if config.compare.seeds:
      results = {**compare.compare(config, workdir, mesh=mesh, writer=writer), "wall_s": time.time() - t_start}
      path = write_results(workdir, results)
      summary_line("let comparison, final held-out CE minus the paired baseline's (nats/byte)",
                   {arm: stages.fmt_mean_std(m["delta_final_eval_ce"], digits=4)
                    for arm, m in results.get("table", {}).get("mean", {}).items() if "delta_final_eval_ce" in m},
                   path)
      return results
    results = single_run(config, workdir, student=student, mesh=mesh, writer=writer)
    results["wall_s"] = time.time() - t_start
    path = write_results(workdir, results)
  finally:
    writer.close()
  vb = results.get("vs_baseline", {})
  summary_line("let", {"held-out CE": results["final_eval"].get("ce"), "baseline's": vb.get("baseline_final_eval_ce"),
                       "speedup": vb.get("speedup"), "teacher's": results["teacher"]["eval_ce"],
                       "LET steps/s": results["phases"]["align"].get("steps_per_sec"),
                       "CE steps/s": results["phases"]["ce"].get("steps_per_sec")}, path)
  return results


def single_run(config, workdir: str, *, student, mesh, writer) -> dict:
  """The stages of one LET run (teacher, baseline, LET student) and its plots; returns the results."""
  d, t = config.data, config.train
  divisor = mesh_lib.batch_size_divisor(mesh, config.axis_rules)
  bsh = mesh_lib.batch_sharding(mesh, config.axis_rules)
  teacher, teacher_params, teacher_info = load_teacher(config, workdir, mesh, writer)
  validate(config)  # the teacher's layer, vocabulary and length against the student, now that it exists
  n_windows = t.eval_batches * d.global_batch
  _, eval_src, split_info = make_data(config, bsh, n_windows, vocab_size=student.cfg.vocab_size)
  teacher_eval_ce = heldout_eval(teacher, eval_src, n_windows=n_windows, divisor=divisor,
                                 batch_sharding=bsh).ce(teacher_params)
  n_params, n_teacher = num_params(student.abstract_params()), num_params(teacher_params)
  stop = s_stop(config)
  ce_text = "n/a" if teacher_eval_ce is None else f"{teacher_eval_ce:.3f}"
  print(f"let: student {n_params:,} params, teacher {n_teacher:,} ({teacher_info['source']}, held-out CE "
        f"{ce_text} nats/byte); student block {config.let.student_layer} aligned to teacher layer "
        f"{config.let.teacher_layer} ({config.let.align}), lambda0 {config.let.lam0:g}, S_stop {stop} of {t.steps} "
        f"steps; workdir {workdir}", flush=True)
  kw = dict(student=student, teacher=teacher, teacher_params=teacher_params, mesh=mesh, writer=writer)
  base = train_student(baseline_config(config), workdir, "baseline", **kw) if config.let.with_baseline else None
  res = train_student(config, workdir, "let", **kw)
  last = res.get("ce") or res["align"]

  def phase_info(name, first, end):
    r = res.get(name)
    return {"steps": [first, end], "ran": r is not None,
            **({k: r[k] for k in ("steps_per_sec", "compile_wall_s", "final_train")} if r else {})}

  results = {
      "method": "let", "variant": config.variant, "params": n_params, "teacher_params": n_teacher,
      "teacher": {**teacher_info, "eval_ce": teacher_eval_ce}, "steps": t.steps, "s_stop": stop,
      "let": config.let.to_dict(), "final_train": last["final_train"], "final_eval": last["final_eval"],
      "phases": {"align": phase_info("align", 0, stop), "ce": phase_info("ce", stop, t.steps)},
      "teacher_step_time_overhead": teacher_step_time_overhead(res), "data_split": split_info,
  }
  if base is not None:
    results["vs_baseline"] = vs_baseline(config, workdir, base, res, writer)
  if jax.process_index() == 0 and t.plot:
    png = plots.from_jsonl(os.path.join(workdir, "metrics.jsonl"), ["let/ce", "let/eval/ce", "let/align"],
                           plot_path(workdir, "loss"), title=f"let {config.variant or 'default'}")
    writer.image("plots/loss", png, t.steps)
  return results
