"""The real data path: the Open X-Embodiment ``berkeley_cable_routing`` data set (RLDS episodes of the paper's
Franka routing demonstrations) training the same route BC policy as the simulator.

Features used (TFDS catalog, version 0.1.0): ``steps/observation/wrist45_image`` and ``wrist225_image``
(128x128x3 uint8: the released code's two wrist views), ``steps/observation/robot_state`` (7: TCP xyz +
quaternion; the released code injects only z, ``state[2:3]``), ``steps/action/world_vector`` (3: end-effector
velocity) and ``steps/action/rotation_delta`` (3; its z component is the yaw rate). The action is the released
code's 4-D (vx, vy, vz, yaw-rate), clipped to [-1, 1]; the released code also rotates it from the base to the tool
frame, which needs the tool pose convention and is not done here (a documented difference).

Reading needs ``tensorflow-datasets`` + ``array-record`` (and TensorFlow for the PNG-encoded image features of the
released data), and the data prepared once as ArrayRecord, e.g.
  tfds build berkeley_cable_routing --data_dir=~/tensorflow_datasets --file_format=array_record
Without it, :func:`open_episodes` stops at once with that message; nothing is downloaded at run time.
"""
from __future__ import annotations

import os
import time

import numpy as np

from lmx.core import stages
from lmx.core.config import ConfigError
from lmx.core.metrics import Writer
from lmx.core.results import summary_line, write_results
from lmx.core.rng import np_stream, rng_stream
from lmx.methods.cable_routing import policy as pol
from lmx.methods.cable_routing import train as T

NAME, VERSION = "berkeley_cable_routing", "0.1.0"
PREPARE = (f"prepare it once (with network): `tfds build {NAME} --data_dir=DIR --file_format=array_record` "
           f"(needs `pip install tensorflow-datasets array-record tensorflow`), then set config.real.data_dir=DIR")


def dataset_dir(data_dir: str) -> str:
  return os.path.join(os.path.expanduser(data_dir), NAME, VERSION)


def open_episodes(data_dir: str, split: str = "train"):
  """The prepared data set's episodes as a random-access source (``src[i]['steps'][t]`` is one RLDS step).
  Raises FileNotFoundError (data missing) or ConfigError (tfds missing / unreadable) at once, with how to fix."""
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  path = dataset_dir(data_dir)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"real.data_dir={data_dir!r}: no prepared {NAME} {VERSION} at {path}; {PREPARE}")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"source='oxe' needs tensorflow-datasets ({e}); {PREPARE}") from None
  try:
    return tfds.builder_from_directory(path).as_data_source(split=split)
  except Exception as e:  # noqa: BLE001 - a TFRecord copy, a wrong split, a corrupt file: say which and how
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"real.data_dir={data_dir!r}: {path} cannot be read as ArrayRecord split {split!r} "
                      f"({first}); {PREPARE}") from None


def _resize(img_HWC: np.ndarray, res: int) -> np.ndarray:
  """Area downsampling by an integer factor (128 -> 64, 32, ...), uint8."""
  h = img_HWC.shape[0]
  if h == res:
    return np.asarray(img_HWC, np.uint8)
  if h % res:
    raise ConfigError(f"real.res={res} must divide the image size {h}")
  f = h // res
  x = np.asarray(img_HWC, np.float32).reshape(res, f, res, f, -1).mean((1, 3))
  return np.round(x).astype(np.uint8)


def step_arrays(src, *, res: int = 64, max_episodes: int = 0):
  """Per-step arrays over the episodes: top := wrist45 view, wrist := wrist225 view (uint8 (M, res, res, 3)),
  grasped := the z height (M,) (the state input), action (M, 4) in [-1, 1]; and the episode index (M,)."""
  n = len(src) if not max_episodes else min(max_episodes, len(src))
  out = dict(top=[], wrist=[], grasped=[], action=[], episode=[])
  for e in range(n):
    steps = src[e]["steps"]
    for t in range(len(steps)):
      s = steps[t]
      o, a = s["observation"], s["action"]
      out["top"].append(_resize(o["wrist45_image"], res))
      out["wrist"].append(_resize(o["wrist225_image"], res))
      out["grasped"].append(np.float32(np.asarray(o["robot_state"])[2]))
      act = np.concatenate([np.asarray(a["world_vector"], np.float32), np.asarray(a["rotation_delta"], np.float32)[2:3]])
      out["action"].append(np.clip(act, -1.0, 1.0))
      out["episode"].append(e)
  if not out["action"]:
    raise ConfigError(f"{NAME}: the split holds no steps")
  return {k: np.stack(v) for k, v in out.items()}


def run_real(config, workdir: str):
  """The route BC policy on the robot data: 90/10 split by episode, NLL / MSE on the held-out episodes. One
  training stage ``real/route`` (resumed from its checkpoints when interrupted); the episodes are read again on a
  rerun (they are not copied into the workdir)."""
  t0 = time.time()
  r, tr, m = config.real, config.train, config.model
  src = open_episodes(r.data_dir, r.split)
  data = step_arrays(src, res=r.res, max_episodes=r.max_episodes)
  seed = config.seeds[0]
  eps = np.unique(data["episode"])
  perm = np_stream(seed, "split").permutation(eps)
  n_val = max(1, len(eps) // 10) if len(eps) > 1 else 0
  val_eps = set(perm[:n_val].tolist())
  is_val = np.array([e in val_eps for e in data["episode"]])
  keys = ("top", "wrist", "grasped", "action")
  train = {k: data[k][~is_val] for k in keys}
  val = {k: data[k][is_val] for k in keys} if is_val.any() else train

  def route():
    params = pol.init_bc(rng_stream(seed, "init"), 2, 4, tuple(m.widths), tuple(m.hidden))
    params = T.train_bc(workdir, "real/route", params, train, optim=tr.bc_optim, steps=r.steps, batch=r.batch,
                        pad=tr.augment_shift, seed=seed, stream="route", writer=writer)
    return dict(params=params, train=T.bc_eval(params, train), val=T.bc_eval(params, val))

  with Writer(workdir) as writer:
    out = stages.run_stage(workdir, "real/route", route)
  results = dict(method="cable_routing", variant=config.variant, source="oxe", episodes=int(len(eps)),
                 train_steps=int((~is_val).sum()), val_steps=int(is_val.sum()), val_nll=out["val"]["nll"],
                 val_mse=out["val"]["mse"], final_train=out["train"], wall_s=round(time.time() - t0, 1))
  path = write_results(workdir, results)
  summary_line("cable_routing real-data route BC (held-out episodes)", out["val"], path)
  return results
