"""Routing records: per-layer router logits, choices, gates, kept mask, token ids and positions of a fixed set of
text batches, collected from an lmx MoE run's checkpoints or read from ``.npz`` files (any MoE's exported routing).

File format (one ``.npz`` per layer and checkpoint; ``<dir>/step_<S>/layer_<L>.npz``, ``S`` and ``L`` integers):

  ==============  =======================  ==========================================================
  key             dtype, shape             meaning
  ==============  =======================  ==========================================================
  router_logits   float [N, E]             the router's logits of N tokens (pre-softmax)
  experts         int [N, K]               the top-K experts chosen, each in [0, E)
  gates           float [N, K]             the combine weights of the chosen experts (>= 0)
  kept            bool [N, K]              False where capacity dropped the choice (all True dropless)
  token_ids       int [N]                  input token ids
  positions       int [N]                  position in the sequence
  batch           int [N]                  the text batch of each token, 0..NB-1 (the bootstrap unit)
  step            int []                   the checkpoint's training step
  layer           int []                   the layer index
  contrib         float [N, K] (optional)  ‖g·FFN_e(x)‖ of each chosen slot (the fourth quality estimator)
  ==============  =======================  ==========================================================

:func:`read_record` checks the schema (keys, dtypes, shapes, finiteness, ranges) and raises
:class:`RoutingFileError` naming the file and the problem; a bad value also names its row (the token: its index in
the file, its batch and position), how many rows share the problem, and the row's values. ``tools/export_hf_routing.py`` writes this format from
a Hugging Face MoE checkpoint; :func:`collect_from_run` from an lmx MoE run.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from lmx.core.config import ConfigError

REQUIRED = ("router_logits", "experts", "gates", "kept", "token_ids", "positions", "batch", "step", "layer")
OPTIONAL = ("contrib",)
STEP_DIR = re.compile(r"^step_(\d+)$")
LAYER_FILE = re.compile(r"^layer_(\d+)\.npz$")


class RoutingFileError(ConfigError):
  """A routing ``.npz`` file is malformed; the message names the file and the problem."""


@dataclasses.dataclass
class RoutingRecord:
  """One layer's routing at one checkpoint (numpy arrays; see the module docstring for the fields)."""
  router_logits: np.ndarray
  experts: np.ndarray
  gates: np.ndarray
  kept: np.ndarray
  token_ids: np.ndarray
  positions: np.ndarray
  batch: np.ndarray
  step: int
  layer: int
  contrib: np.ndarray | None = None

  @property
  def n_experts(self) -> int:
    return int(self.router_logits.shape[1])

  @property
  def top_k(self) -> int:
    return int(self.experts.shape[1])

  @property
  def n_batches(self) -> int:
    return int(self.batch.max()) + 1


def record_path(root: str, step: int, layer: int) -> str:
  return os.path.join(root, f"step_{int(step)}", f"layer_{int(layer)}.npz")


def write_record(path: str, rec: RoutingRecord) -> str:
  """Writes ``rec`` as ``.npz`` (atomically: a temp file, then rename); checks it first."""
  check_record(rec, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {k: np.asarray(getattr(rec, k)) for k in REQUIRED}
  if rec.contrib is not None:
    arrays["contrib"] = np.asarray(rec.contrib, np.float32)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)  # uncompressed: quicker to write and read than savez_compressed
  os.replace(tmp, path)
  return path


def check_record(rec: RoutingRecord, where: str = "record") -> None:
  """The schema check of :func:`read_record` on an in-memory record."""
  def bad(msg):
    raise RoutingFileError(f"{where}: {msg}")

  def rows(mask, values) -> str:
    """Where a value check fails: the count of bad rows, the first one's index, batch and position, its values."""
    hit = np.nonzero(np.asarray(mask).reshape(len(mask), -1).any(axis=1))[0]
    i = int(hit[0])
    shown = np.asarray(values[i]).reshape(-1)
    vals = ", ".join(str(v) for v in shown[:8].tolist()) + (", ..." if shown.size > 8 else "")
    return (f"; {len(hit)} of {len(mask)} rows, the first row {i} (batch {int(np.asarray(rec.batch)[i])}, position "
            f"{int(np.asarray(rec.positions)[i])}): [{vals}]")

  z = np.asarray(rec.router_logits)
  if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
    bad(f"router_logits must be [N, E] with N >= 1 and E >= 2, got shape {z.shape}")
  n, e = z.shape
  if not np.issubdtype(z.dtype, np.floating):
    bad(f"router_logits must be floating point, got {z.dtype}")
  ex = np.asarray(rec.experts)
  if ex.ndim != 2 or ex.shape[0] != n or not 1 <= ex.shape[1] <= e:
    bad(f"experts must be [N={n}, K] with 1 <= K <= E={e}, got shape {ex.shape}")
  if not np.issubdtype(ex.dtype, np.integer):
    bad(f"experts must be integers, got {ex.dtype}")
  k = ex.shape[1]
  for name in ("gates", "kept") + (("contrib",) if rec.contrib is not None else ()):
    a = np.asarray(getattr(rec, name))
    if a.shape != (n, k):
      bad(f"{name} must be [N, K]={(n, k)} like experts, got shape {a.shape}")
  for name in ("token_ids", "positions", "batch"):
    a = np.asarray(getattr(rec, name))
    if a.shape != (n,):
      bad(f"{name} must be [N]={(n,)}, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
      bad(f"{name} must be integers, got {a.dtype}")
  if np.asarray(rec.kept).dtype != np.bool_:
    bad(f"kept must be bool, got {np.asarray(rec.kept).dtype}")
  for name in ("router_logits", "gates") + (("contrib",) if rec.contrib is not None else ()):
    a = np.asarray(getattr(rec, name))
    if not np.issubdtype(a.dtype, np.floating):
      bad(f"{name} must be floating point, got {a.dtype}")
    nonfinite = ~np.isfinite(a)
    if nonfinite.any():
      bad(f"{name} has {int(nonfinite.sum())} NaN/Inf value(s){rows(nonfinite, a)}")
  if ex.min() < 0 or ex.max() >= e:
    bad(f"experts has ids out of range [0, {e}): min {ex.min()}, max {ex.max()}{rows((ex < 0) | (ex >= e), ex)}")
  repeats = (np.sort(ex, axis=1)[:, 1:] == np.sort(ex, axis=1)[:, :-1]).any(axis=1)
  if repeats.any():
    bad(f"experts repeats an expert within a token's top-K{rows(repeats, ex)}")
  g = np.asarray(rec.gates)
  if g.min() < 0:
    bad(f"gates must be >= 0, got min {g.min()}{rows(g < 0, g)}")
  b = np.asarray(rec.batch)
  if b.min() < 0:
    bad(f"batch ids must be >= 0, got min {b.min()}{rows(b < 0, b)}")
  pos = np.asarray(rec.positions)
  if pos.min() < 0:
    bad(f"positions must be >= 0, got min {pos.min()}{rows(pos < 0, pos)}")
  if len(np.unique(b)) != b.max() + 1:
    bad(f"batch ids must cover 0..NB-1 without gaps, got {len(np.unique(b))} distinct ids up to {b.max()}")


def read_record(path: str) -> RoutingRecord:
  """Reads and checks one routing ``.npz`` (see the module docstring); raises :class:`RoutingFileError`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such routing file")
  try:
    f = np.load(path, allow_pickle=False)
  except Exception as err:  # noqa: BLE001  (zip/format errors of many kinds)
    raise RoutingFileError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
  with f:
    missing = [k for k in REQUIRED if k not in f.files]
    if missing:
      raise RoutingFileError(f"{path}: missing key(s) {missing}; a routing file holds {list(REQUIRED)} "
                             f"(+ optional {list(OPTIONAL)})")
    arrays = {k: f[k] for k in REQUIRED + tuple(o for o in OPTIONAL if o in f.files)}
  for name in ("step", "layer"):
    if arrays[name].shape != () or not np.issubdtype(arrays[name].dtype, np.integer):
      raise RoutingFileError(f"{path}: {name} must be an integer scalar, got shape {arrays[name].shape} "
                             f"dtype {arrays[name].dtype}")
  rec = RoutingRecord(**{k: arrays[k] for k in REQUIRED if k not in ("step", "layer")},
                      step=int(arrays["step"]), layer=int(arrays["layer"]), contrib=arrays.get("contrib"))
  check_record(rec, path)
  return rec


def scan_dir(root: str) -> dict[int, dict[int, str]]:
  """``{step: {layer: path}}`` of the routing files under ``root`` (``step_<S>/layer_<L>.npz``)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"routing_dir={root!r} is not a directory")
  out: dict[int, dict[int, str]] = {}
  for d in sorted(os.listdir(root)):
    m = STEP_DIR.match(d)
    if not m or not os.path.isdir(os.path.join(root, d)):
      continue
    layers = {int(LAYER_FILE.match(f).group(1)): os.path.join(root, d, f)
              for f in sorted(os.listdir(os.path.join(root, d))) if LAYER_FILE.match(f)}
    if layers:
      out[int(m.group(1))] = layers
  return dict(sorted(out.items()))


def find_runs(root: str) -> dict[str, dict[int, dict[int, str]]]:
  """The runs under ``root``: ``root`` itself when it holds ``step_*`` folders (named by its basename), else
  each sub-folder that does. Raises FileNotFoundError when none has a routing file."""
  own = scan_dir(root)
  if own:
    return {os.path.basename(os.path.normpath(root)) or "run": own}
  runs = {}
  for d in sorted(os.listdir(root)):
    p = os.path.join(root, d)
    if os.path.isdir(p):
      s = scan_dir(p)
      if s:
        runs[d] = s
  if not runs:
    raise FileNotFoundError(f"routing_dir={root!r} holds no step_<S>/layer_<L>.npz routing files (nor do its "
                            "sub-folders); see lmx/methods/moe_routing/records.py for the format")
  return runs


# ------------------------------------------------------------------------------------------ lmx collection


def routing_forward(model):
  """``f(params, tokens_BT) -> {layer i: dict}``: the transformer's own routing records (``return_routing``)
  plus each chosen slot's contribution ‖g·FFN_e(x)‖, recomputed from the router input the block saw.

  The router input is not among the transformer's outputs, so the blocks are re-run here step by step from the
  model's own submodules (embedding, attention, norms, MoE) in the order of ``Block.__call__``; the test checks
  that its logits equal the ones ``return_routing`` gives."""
  import jax.numpy as jnp
  from flax import nnx

  from lmx.models import moe as moe_lib

  graphdef = model.graphdef

  def f(params, tokens_BT):
    net = nnx.merge(graphdef, params)
    b, t = tokens_BT.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = jnp.take(net.embed[...], tokens_BT, axis=0).astype(jnp.dtype(net.cfg.dtype))
    out = {}
    for i, blk in enumerate(net.blocks):
      x = x + blk.attn(blk.attn_norm(x), pos, None)
      h = blk.ffn_norm(x)
      if blk.is_moe:
        y, info = blk.ffn(h, return_routing=True)
        moe = blk.ffn
        w1, w3, w2 = (w[...].astype(h.dtype) for w in (moe.w1, moe.w3, moe.w2))
        # g·FFN_e(x) of each chosen slot alone: the layer's own dropless dispatch, one slot at a time (K times
        # the layer's expert compute, no [N, E] or [N, K, D, F] intermediate)
        n = b * t
        x_ND, ex_NK, g_NK = h.reshape(n, -1), info["experts"].reshape(n, -1), info["gates"].reshape(n, -1)
        norms = [jnp.linalg.norm(moe_lib.dropless_dispatch(x_ND, ex_NK[:, k:k + 1], g_NK[:, k:k + 1], w1, w3, w2,
                                                           impl=moe.dropless_impl).astype(jnp.float32), axis=-1)
                 for k in range(ex_NK.shape[-1])]
        contrib = jnp.stack(norms, -1).reshape(b, t, -1)
        out[i] = {k: info[k] for k in ("router_logits", "experts", "gates", "kept")}
        out[i]["contrib"] = contrib
      else:
        y = blk.ffn(h)
      x = x + y
    return out

  return f


def eval_batches(eval_src, n_batches: int, batch_windows: int) -> np.ndarray:
  """The fixed text batches [NB, W, T] of routing analysis: the first NB·W held-out windows, in order (so
  every checkpoint and every arm sees the same tokens). Raises ConfigError when there are too few."""
  need = n_batches * batch_windows
  if len(eval_src) < need:
    raise ConfigError(f"routing.n_batches x routing.batch_windows = {need} windows, but the held-out text has "
                      f"only {len(eval_src)}; lower them or raise data.eval_fraction")
  w = np.stack([eval_src[i][:-1] for i in range(need)])
  return w.reshape(n_batches, batch_windows, -1)


def collect_params(model, params, batches_BWT: np.ndarray, step: int, *, forward=None,
                   batches_per_call: int | None = None) -> dict[int, RoutingRecord]:
  """Routing records of every MoE layer of ``model`` at ``params`` over the fixed batches [NB, W, T];
  ``batches_per_call`` batches go through one forward call (default: all of them at once)."""
  import jax

  fwd = forward or jax.jit(routing_forward(model))
  nb, w, t = batches_BWT.shape
  per = max(1, min(int(batches_per_call or nb), nb))
  per_layer = {}
  for b0 in range(0, nb, per):
    chunk = batches_BWT[b0:b0 + per]
    out = jax.device_get(fwd(params, chunk.reshape(-1, t)))
    for layer, rec in out.items():
      per_layer.setdefault(layer, []).append(rec)
  tok = batches_BWT.reshape(-1)
  pos = np.broadcast_to(np.arange(t), (nb, w, t)).reshape(-1)
  records = {}
  for layer, recs in per_layer.items():
    cat = {k: np.concatenate([np.asarray(r[k]).reshape(-1, np.asarray(r[k]).shape[-1]) for r in recs])
           for k in recs[0]}
    records[layer] = RoutingRecord(
        router_logits=cat["router_logits"].astype(np.float32), experts=cat["experts"].astype(np.int32),
        gates=cat["gates"].astype(np.float32), kept=cat["kept"].astype(bool),
        token_ids=tok.astype(np.int32), positions=pos.astype(np.int32),
        batch=np.repeat(np.arange(nb, dtype=np.int32), w * t), step=int(step), layer=int(layer),
        contrib=cat["contrib"].astype(np.float32))
  return records
