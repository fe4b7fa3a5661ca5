r"""One DATM distillation iteration of lmx and of the official PyTorch DATM code, timed in the same run, interleaved,
at the same configurations; plus an equality check of the meta-loss and its gradients.

    PYTHONPATH=. python benchmarks/datm_vs_official.py --official=/tmp/datm_official \
        [--torch_python=/tmp/hfref/bin/python] [--configs=B,A,C] [--iters=2] [--rounds=3] [--threads=2,1] \
        [--warmup=1] [--check=auto|yes|no] \
        [--out=benchmarks/results/datm_vs_official.json]

The official checkout: ``git --git-dir=<mirror of NUS-HPC-AI-Lab/DATM> archive HEAD | tar -x -C /tmp/datm_official``
(measured at commit 97ae510). The torch half runs under ``--torch_python`` (a venv with torch; this script's
module level imports only the standard library, so the same file serves both interpreters).

Configurations (10 classes, ConvNet-3 with instance norm and average pooling, DSA 'color_crop_cutout_flip_scale_rotate'
in mode 'S', soft labels learned, step size learned; expert segment M = 2 epochs, start epoch in [0, 2)):
  A  width 32,  IPC 10 (100 images), N = 20 inner steps, batch_syn 100, 1×28×28 (padded to 32×32 by the first conv)
  B  width 32,  IPC 1 (10 images),   N = 10,             batch_syn 10,  1×28×28
  C  width 128, IPC 10 (100 images), N = 20,             batch_syn 100, 3×32×32 (the paper's CIFAR-10 IPC 10 shape)

What is timed, per framework (one iteration, steady state, no dataset: random images of the right shape and a
synthetic one-expert buffer of random parameters drifting by epoch; timing does not depend on the values):
  lmx    the jitted ``lmx.methods.datm.distill.meta_step`` with the specs of ``lmx.methods.datm.driver.specs`` built from
         ``configs/datm.py``'s ``ipc10`` config (its CPU choices: unrolled inner loop, no remat, conv 'auto' → im2col
         for second order on CPU, ``lr_param`` as configured), overridden to the shape above; the start/target
         snapshots are host arrays picked per iteration (as the loop's ``ExpertWindows`` feeds them).
  torch  ``distill/DATM.py`` lines 454–559 of the official code, copied: ``get_network`` (their
         ``utils/utils_baseline.py``; its hard-wired width 128 is replaced by the config's width by patching
         ``get_default_convnet_setting``, as their code reads it) wrapped in their ``ReparamModule``
         (``reparam_module.py``), the ``load_all`` expert pick, ``np.random.randint`` start epoch, the N inner steps
         with their ``randperm`` chunks, their ``DiffAugment``/``ParamDiffAug`` (DSA) and ``SoftCrossEntropy``
         (L255–260) and ``torch.autograd.grad(..., create_graph=True)``, the ``mse_loss(reduction='sum')``
         matching loss divided by ``num_params`` and by the start–target distance, ``backward()`` into images,
         labels and syn_lr, and the three SGD optimisers of L245–246 and L329 stepped under the threshold test of
         L556. Left out: wandb logging, evaluation, expert-file rotation. ``utils_baseline`` imports kornia,
         torchvision and scipy at module level for dataset loading/ZCA only; when they are not installed they are
         replaced by empty stub modules (none of the code above calls them). One line added for 1-channel images:
         with torch 2.13 their ``rand_crop`` returns (N, 1, H, W) with channels-last strides (which count as
         contiguous when C = 1, so ``DiffAugment``'s ``.contiguous()`` keeps them), the convolutions propagate
         channels-last and ``networks.ConvNet.forward``'s ``out.view(out.size(0), -1)`` raises "view size is not
         compatible"; the augmented batch is therefore copied to NCHW layout (``clone(memory_format=
         torch.contiguous_format)``) when C = 1, a 10–100 image copy per inner step.
Both use ``threshold`` 1.0 (DATM's default; an update is computed either way), lr_img 100, lr_lr 1e-5, lr_y 2,
syn_lr₀ = lr_teacher = 0.01. Each framework runs its own DSA (lmx: ``lmx.methods.datm.dsa``, one resample per
call; official: the per-group ops), so the two inner loops do the same network math on differently augmented
batches.

Measurement: each arm (lmx, and torch at each thread count of ``--threads``) runs in its own fresh subprocess per
config (so memory peaks do not mix), all alive at once but only one computing at a time; after a warm-up (lmx:
compile + one call; torch: one iteration under ``torch.utils.flop_counter.FlopCounterMode``, then ``--warmup``
plain ones) the arms take turns for ``--rounds`` rounds of ``--iters`` timed iterations (the order rotated each
round), each round preceded by that framework's own matmul-peak measurement ([1024, 1024] float32 ``a @ a``:
``benchmarks.common.measured_matmul_peak`` for JAX, the same with torch). torch: ``torch.set_num_threads(t)``;
XLA: its default intra-op pool (one thread per core; ``os.cpu_count()`` recorded). The first torch arm uses as
many threads as XLA (2 on the 2-core machine); the second uses 1 because on a machine shared with other busy
processes two OpenMP threads on two loaded cores wait on each other at every op's barrier (measured 5–20× slower
than 1 thread at config B), which would make the comparison one of thread scheduling. Reported per config and arm:
  * seconds per iteration: median over all timed iterations (and per round);
  * memory (``getrusage``'s ru_maxrss is not used: a fork+exec child inherits its parent's on Linux): process RSS
    before any compile/warm-up (after imports and inputs), the high-water mark (/proc VmHWM; for lmx it includes
    XLA's compile), the RSS right before each round (after glibc ``malloc_trim``), and the peak RSS sampled every
    5 ms during the timed iterations only; ``rss_exec_growth`` = that peak − the RSS before the round (what one
    iteration allocates on top of what is live); lmx also XLA's ``memory_analysis()`` (temp + argument + output);
  * FLOPs per iteration: XLA's ``cost_analysis()['flops']`` of the compiled lmx step, used for both frameworks (the
    same math; no remat, so no recomputation is counted), next to torch's ``FlopCounterMode`` count (matmuls and
    convolutions only) as a cross-check;
  * achieved FLOP/s = FLOPs / median seconds, and its fraction of that framework's median measured matmul peak.
The load average (``os.getloadavg()``) is recorded at every round: this machine is shared.

Equality check (``--check``, config B's shape, on by default when B is benchmarked): the same initial images,
label logits, syn_lr = 0.01 (lmx ``lr_param='raw'``, the official parametrisation) and expert start/target
parameters (lmx's pytree converted to the official flat order: OIHW kernels, the classifier's C·H·W feature order)
go to both, DSA off in both (the official ``args.dsa=False`` path), batch_syn = all 10 images (so the random
minibatch order only permutes a sum); compared: the meta-loss, θ̂_N, and the gradients with respect to images,
label logits and syn_lr (relative L2 difference and max abs difference).

Results: benchmarks/results/datm_vs_official.json (configs B and A, torch at 2 and 1 threads, equality check),
datm_vs_official_C.json (config C, torch at 1 thread, 3 rounds × 1 iteration, no plain torch warm-up) and
datm_vs_official_C_t2.json (config C, torch at 2 threads, 2 rounds × 1 iteration); the table is printed at the end
of a run (:func:`markdown_table`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import zlib

CONFIGS = {
    "A": dict(image_CHW=(1, 28, 28), width=32, ipc=10, syn_steps=20, batch_syn=100),
    "B": dict(image_CHW=(1, 28, 28), width=32, ipc=1, syn_steps=10, batch_syn=10),
    "C": dict(image_CHW=(3, 32, 32), width=128, ipc=10, syn_steps=20, batch_syn=100),
}
NUM_CLASSES = 10
DEPTH = 3
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
EXPERT_EPOCHS = 2
MIN_START, MAX_START = 0, 2  # start epoch ~ U{0, 1} (np.random.randint's exclusive upper bound)
LR_IMG, LR_LR, LR_Y, MOMENTUM_Y, LR_TEACHER, THRESHOLD = 100.0, 1e-5, 2.0, 0.9, 0.01, 1.0
MATMUL_N = 1024
PROTO = "@@ "  # prefix of a worker's protocol lines on stdout (anything else it prints is passed to stderr)


# ----------------------------------------------------------------------------------------------- pure helpers


def median(xs) -> float:
  xs = [float(x) for x in xs]
  return float(statistics.median(xs)) if xs else float("nan")


def flops_rate(flops: float | None, seconds: float, peak_flops_per_sec: float | None) -> dict:
  """Achieved FLOP/s of ``flops`` work done in ``seconds``, and its fraction of a measured matmul peak."""
  ok = flops is not None and seconds and seconds > 0 and math.isfinite(seconds)
  rate = float(flops) / seconds if ok else None
  frac = rate / peak_flops_per_sec if (rate is not None and peak_flops_per_sec) else None
  return {"flops_per_sec": rate, "fraction_of_matmul_peak": frac}


def summarize(rounds: list[dict], flops: float | None) -> dict:
  """One framework at one config: median seconds over all timed iterations of all ``rounds`` (each a worker's
  reply with ``times`` and ``matmul_peak_flops_per_sec``), the per-round medians, the median matmul peak, and
  :func:`flops_rate` of the median against it."""
  times = [t for r in rounds for t in r["times"]]
  sec = median(times)
  peak = median([r["matmul_peak_flops_per_sec"] for r in rounds]) if rounds else None
  return {"seconds_per_iteration": sec, "seconds_min": min(times) if times else None,
          "round_medians": [median(r["times"]) for r in rounds], "timed_iterations": len(times),
          "matmul_peak_flops_per_sec": peak, "flops_per_iteration": flops, **flops_rate(flops, sec, peak)}


def markdown_table(runs: list[dict]) -> str:
  """The ``summary`` records of ``runs`` as a markdown table (config × arm)."""
  def f(x, fmt):
    return "–" if x is None else format(x, fmt)
  lines = ["| config | arm | threads | s/iteration (median) | RSS peak during iterations (growth) MiB | "
           "XLA temp+arg+out MiB | GFLOP/iteration | GFLOP/s | matmul peak GFLOP/s | fraction of peak |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    if r.get("kind") != "summary":
      continue
    lines.append(
        f"| {r['config']} | {r['arm']} | {r.get('threads', '')} | {f(r['seconds_per_iteration'], '.3f')} | "
        f"{f(r.get('rss_exec_peak_MiB'), '.0f')} ({f(r.get('rss_exec_growth_MiB'), '.0f')}) | "
        f"{f(r.get('xla_temp_plus_argument_plus_output_MiB'), '.0f')} | "
        f"{f(r['flops_per_iteration'] and r['flops_per_iteration'] / 1e9, '.1f')} | "
        f"{f(r['flops_per_sec'] and r['flops_per_sec'] / 1e9, '.2f')} | "
        f"{f(r['matmul_peak_flops_per_sec'] and r['matmul_peak_flops_per_sec'] / 1e9, '.1f')} | "
        f"{f(r['fraction_of_matmul_peak'], '.3f')} |")
  return "\n".join(lines)


def rel_diff(a, b) -> dict:
  """‖a − b‖ / ‖b‖ and max |a − b| of two arrays (numpy)."""
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  nb = float(np.linalg.norm(b))
  d = float(np.linalg.norm(a - b))
  return {"rel_l2": d / nb if nb > 0 else d, "max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0,
          "norm_ref": nb}


def lmx_to_torch_params(params: dict) -> list:
  """lmx ConvNet parameters (``{'conv{i}': {kernel HWIO, bias}, 'norm{i}': {scale, bias}, 'fc': {kernel, bias}}``)
  as the official ConvNet's parameter list in its ``parameters()`` order (the order ``ReparamModule`` flattens and
  expert buffers store): conv weight OIHW, bias, GroupNorm weight, bias per block, then the classifier's weight
  (classes, C·H·W: PyTorch flattens NCHW features channel-major) and bias. numpy in, numpy out."""
  import numpy as np
  depth = sum(1 for k in params if k.startswith("conv"))
  out = []
  for i in range(depth):
    conv = params[f"conv{i}"]
    out += [np.transpose(np.asarray(conv["kernel"]), (3, 2, 0, 1)), np.asarray(conv["bias"])]
    if f"norm{i}" in params:
      out += [np.asarray(params[f"norm{i}"]["scale"]), np.asarray(params[f"norm{i}"]["bias"])]
  c = np.asarray(params[f"conv{depth - 1}"]["kernel"]).shape[3]
  k = np.asarray(params["fc"]["kernel"])  # (H·W·C, classes), features flattened NHWC
  hw = int(round(math.sqrt(k.shape[0] // c)))
  out += [k.reshape(hw, hw, c, -1).transpose(3, 2, 0, 1).reshape(k.shape[1], -1), np.asarray(params["fc"]["bias"])]
  return [np.ascontiguousarray(x, np.float32) for x in out]


def torch_to_lmx_params(flat: list, depth: int = DEPTH, norm: bool = True) -> dict:
  """Inverse of :func:`lmx_to_torch_params`."""
  import numpy as np
  params, j = {}, 0
  for i in range(depth):
    w, b = flat[j], flat[j + 1]
    j += 2
    params[f"conv{i}"] = {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": b}
    if norm:
      params[f"norm{i}"] = {"scale": flat[j], "bias": flat[j + 1]}
      j += 2
  w, b = flat[j], flat[j + 1]
  c = params[f"conv{depth - 1}"]["kernel"].shape[3]
  hw = int(round(math.sqrt(w.shape[1] // c)))
  params["fc"] = {"kernel": w.reshape(-1, c, hw, hw).transpose(2, 3, 1, 0).reshape(hw * hw * c, -1), "bias": b}
  return params


def rss_bytes() -> int:
  """The process's current resident set size (Linux /proc)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def highwater_bytes() -> int:
  """The process's RSS high-water mark: /proc/self/status VmHWM (reset by exec), else getrusage's ru_maxrss
  (which a child started by fork + exec inherits from its parent on Linux, so it can overstate a worker's peak)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_heap() -> None:
  """Returns freed heap pages to the OS (glibc ``malloc_trim``), so RSS measured next is what is live."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def timed_round(iters: int, step, loss_of):
  """Runs ``step()`` ``iters`` times under an RSS sampler; returns the last output and the round's times, losses
  (``loss_of(output)``), RSS peak and the RSS before it. Frees the heap before and after, so that the other arm's
  process has the memory."""
  times, losses = [], []
  trim_heap()
  before = rss_bytes()
  with RssSampler() as s:
    for _ in range(iters):
      t0 = time.perf_counter()
      out = step()
      times.append(time.perf_counter() - t0)
      losses.append(loss_of(out))
  trim_heap()
  return out, {"times": times, "losses": losses, "rss_exec_peak_bytes": s.peak, "rss_before_round_bytes": before}


class RssSampler:
  """Peak RSS sampled every ``interval`` seconds by a background thread while the ``with`` block runs."""

  def __init__(self, interval: float = 0.005):
    self.interval, self.peak = interval, 0
    self._stop = threading.Event()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      self._stop.wait(self.interval)

  def __enter__(self):
    self.peak = rss_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def mib(b) -> float | None:
  return None if b is None else round(b / 2**20, 1)


# ----------------------------------------------------------------------------------------------- worker plumbing


def _send(obj) -> None:
  sys.stdout.write(PROTO + json.dumps(obj, default=str) + "\n")
  sys.stdout.flush()


def _serve(setup_info: dict, run_round) -> None:
  """A worker's loop: announce ``setup_info``, then answer {'cmd': 'round', 'iters': k} until 'quit'/EOF."""
  _send({"ready": True, **setup_info})
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
      _send({"bye": True, "rss_highwater_bytes": highwater_bytes()})
      return
    _send(run_round(int(cmd["iters"])))


class Worker:
  """A worker subprocess spoken to by JSON lines (commands on stdin, ``PROTO``-prefixed replies on stdout)."""

  def __init__(self, argv: list[str], env: dict | None = None, cwd: str | None = None):
    self.argv = argv
    self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd,
                              bufsize=1)

  def read(self) -> dict:
    for line in self.p.stdout:
      if line.startswith(PROTO):
        return json.loads(line[len(PROTO):])
      sys.stderr.write(line)
    raise RuntimeError(f"worker {self.argv[1:3]} exited (rc={self.p.wait()}) without replying")

  def call(self, cmd: dict) -> dict:
    self.p.stdin.write(json.dumps(cmd) + "\n")
    self.p.stdin.flush()
    return self.read()

  def close(self) -> dict:
    try:
      bye = self.call({"cmd": "quit"})
    except (RuntimeError, BrokenPipeError, OSError) as e:
      bye = {"error": repr(e)}
    self.p.wait(timeout=60)
    return bye


def _seed(*names) -> int:
  """A stable seed from names (the same in every process, unlike ``hash``)."""
  return zlib.crc32("/".join(("datm_vs_official",) + names).encode())


def _np_rng(*names):
  import numpy as np
  return np.random.default_rng(_seed(*names))


def _loadavg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------------------------- lmx worker


def _lmx_config(cfg: dict):
  """configs/datm.py's ipc10 config overridden to ``cfg``'s shape, and its inner/outer specs (run.specs)."""
  from configs import datm as datm_config
  from lmx.methods.datm import driver as R
  c = datm_config.get_config("ipc10")
  c.model.width, c.model.depth = cfg["width"], DEPTH
  c.data.dsa_strategy = DSA_STRATEGY
  d = c.distill
  d.ipc, d.syn_steps, d.batch_syn, d.expert_epochs = cfg["ipc"], cfg["syn_steps"], cfg["batch_syn"], EXPERT_EPOCHS
  d.lr_img, d.lr_lr, d.lr_y, d.momentum_y, d.threshold, d.lr_init = LR_IMG, LR_LR, LR_Y, MOMENTUM_Y, THRESHOLD, LR_TEACHER
  inner, outer = R.specs(c)
  return c, inner, outer


def _expert_trajectory(p0, epochs: int, seed_name: str):
  """A synthetic expert: ``epochs`` + 1 parameter snapshots drifting from ``p0`` (numpy pytrees)."""
  import jax
  import numpy as np
  rng = _np_rng(seed_name)
  traj, p = [], jax.tree.map(np.asarray, p0)
  for _ in range(epochs + 1):
    traj.append(p)
    p = jax.tree.map(lambda a: (a + 0.01 * np.abs(a).mean() * rng.standard_normal(a.shape)).astype(np.float32), p)
  return traj


def _meta_step_flops(compiled, inner, outer, apply_fn, args):
  """FLOPs of one iteration and where they come from. XLA's cost analysis counts a while loop's body once, so for a
  rolled scan (and to leave remat's recomputation out) the count is taken from the same step unrolled without
  remat, lowered but not compiled (``Lowered.cost_analysis``: the HLO before optimisation)."""
  import dataclasses

  import jax

  from lmx.methods.datm import distill as D

  def flops_of(cost):
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None

  if inner.unroll and not inner.remat:
    return flops_of(compiled.cost_analysis()), "XLA cost_analysis of the compiled lmx step"
  flat = dataclasses.replace(inner, unroll=True, remat=False)
  lowered = jax.jit(lambda s, a, b, k: D.meta_step(s, a, b, k, inner=flat, outer=outer, apply_fn=apply_fn)).lower(
      *args)
  return flops_of(lowered.cost_analysis()), "XLA cost_analysis of the lmx step unrolled without remat (lowered HLO)"


def lmx_worker(args) -> None:
  import jax
  import numpy as np

  from benchmarks.common import measured_matmul_peak
  from lmx.methods.datm import distill as D
  from lmx.models import convnet

  cfg = CONFIGS[args.config_name]
  c, inner, outer = _lmx_config(cfg)
  C, H, W = cfg["image_CHW"]
  n = cfg["ipc"] * NUM_CLASSES
  rng = _np_rng("inputs", args.config_name)
  p0 = convnet.init_params(jax.random.key(0), (H, W, C), NUM_CLASSES, depth=DEPTH, width=cfg["width"])
  traj = _expert_trajectory(p0, MAX_START + EXPERT_EPOCHS, "expert" + args.config_name)
  syn = {"x": rng.standard_normal((n, H, W, C)).astype(np.float32),
         "y": rng.standard_normal((n, NUM_CLASSES)).astype(np.float32),
         "lr": np.float32(D.lr_raw_from_value(LR_TEACHER, inner.lr_param))}
  apply_fn = convnet.apply_with(c.model.conv_impl, second_order=True)
  state = D.init_state(syn, D.make_optimizer(outer, inner))
  key = jax.random.key(1)
  rss0, hw0 = rss_bytes(), highwater_bytes()
  fn = jax.jit(lambda s, a, b, k: D.meta_step(s, a, b, k, inner=inner, outer=outer, apply_fn=apply_fn))
  t0 = time.perf_counter()
  compiled = fn.lower(state, traj[0], traj[EXPERT_EPOCHS], key).compile()
  compile_s = time.perf_counter() - t0
  flops, flops_from = _meta_step_flops(compiled, inner, outer, apply_fn, (state, traj[0], traj[EXPERT_EPOCHS], key))
  mem = compiled.memory_analysis()
  mem_b = {k: int(getattr(mem, f"{k}_size_in_bytes", 0)) for k in ("temp", "argument", "output", "alias",
                                                                    "generated_code")} if mem else {}
  hw_compile = highwater_bytes()
  holder = {"state": state, "it": 0}
  pick = np.random.default_rng(0)

  def one():
    s = int(pick.integers(MIN_START, MAX_START))
    holder["state"], m = compiled(holder["state"], traj[s], traj[s + EXPERT_EPOCHS],
                                  jax.random.fold_in(key, holder["it"]))
    holder["it"] += 1
    jax.block_until_ready(holder["state"])
    return m

  t0 = time.perf_counter()
  m = one()  # warm-up
  warm_s = time.perf_counter() - t0
  info = {"framework": "lmx", "config": args.config_name, **cfg, "images": n,
          "timed": "jax.jit(lmx.methods.datm.distill.meta_step), specs from lmx.methods.datm.driver.specs(configs/datm.py)",
          "inner_spec": {k: getattr(inner, k) for k in ("syn_steps", "batch_syn", "soft_labels", "learn_labels",
                                                          "learn_lr", "unroll", "remat", "lr_param", "hoist_dsa")},
          "dsa_strategy": "_".join(inner.dsa_strategy),
          "conv_impl": convnet.resolve_conv_impl(c.model.conv_impl, second_order=True),
          "num_params": convnet.num_params(p0), "jax": jax.__version__, "backend": jax.default_backend(),
          "threads": f"XLA default (cpu_count={os.cpu_count()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})",
          "compile_seconds": round(compile_s, 2), "warmup_seconds": round(warm_s, 3),
          "xla_flops": flops, "xla_flops_source": flops_from, "xla_memory_bytes": mem_b,
          "xla_temp_plus_argument_plus_output_MiB": mib(sum(mem_b.get(k, 0) for k in ("temp", "argument", "output"))),
          "rss_before_compile_MiB": mib(rss0), "rss_highwater_before_compile_MiB": mib(hw0),
          "rss_highwater_after_compile_MiB": mib(hw_compile), "warmup_loss": float(m["loss"])}

  def run_round(iters: int) -> dict:
    peak = measured_matmul_peak("float32", n=MATMUL_N)
    m, rnd = timed_round(iters, one, lambda m: float(m["loss"]))
    return {**rnd, "skipped": float(m["skipped"]), "matmul_peak_flops_per_sec": peak["flops_per_sec"],
            "rss_before_compile_bytes": rss0, "rss_highwater_bytes": highwater_bytes()}

  _serve(info, run_round)


# ----------------------------------------------------------------------------------------------- torch worker


def _import_official(official: str, width: int):
  """The official modules (``utils.utils_baseline`` with ``get_default_convnet_setting`` giving ``width``, and
  ``ReparamModule``), with stub modules for the dataset-only imports that are not installed."""
  import importlib
  sys.path.insert(0, os.path.abspath(official))
  stubs = {"kornia": [], "torchvision": ["datasets", "transforms"], "scipy": [], "scipy.ndimage": [],
           "scipy.ndimage.interpolation": []}
  stubbed = []
  for name, attrs in stubs.items():
    try:
      importlib.import_module(name)
    except ImportError:
      mod = types.ModuleType(name)
      for a in attrs:
        setattr(mod, a, types.ModuleType(f"{name}.{a}"))
      if name == "scipy.ndimage.interpolation":
        mod.rotate = None
      sys.modules[name] = mod
      if "." in name:
        setattr(sys.modules[name.rsplit(".", 1)[0]], name.rsplit(".", 1)[1], mod)
      stubbed.append(name)
  ub = importlib.import_module("utils.utils_baseline")
  from reparam_module import ReparamModule
  ub.get_default_convnet_setting = lambda: (width, DEPTH, "relu", "instancenorm", "avgpooling")
  return ub, ReparamModule, stubbed


class OfficialIteration:
  """State and code of the official distillation loop (distill/DATM.py), one call = one iteration."""

  def __init__(self, ub, ReparamModule, cfg: dict, *, image_syn, label_syn, buffer, dsa: bool, threshold: float,
               batch_syn: int | None = None):
    import torch
    self.torch, self.ub, self.ReparamModule = torch, ub, ReparamModule
    C, H, W = cfg["image_CHW"]
    self.channel, self.num_classes, self.im_size = C, NUM_CLASSES, (H, W)
    self.args = types.SimpleNamespace(
        model="ConvNet", device="cpu", syn_steps=cfg["syn_steps"], batch_syn=batch_syn or cfg["batch_syn"],
        dsa=dsa, no_aug=False, dsa_strategy=DSA_STRATEGY, dsa_param=ub.ParamDiffAug(), distributed=False,
        load_all=True, Sequential_Generation=False, min_start_epoch=MIN_START, max_start_epoch=MAX_START,
        expert_epochs=EXPERT_EPOCHS, threshold=threshold, lr_img=LR_IMG, lr_lr=LR_LR, lr_y=LR_Y,
        Momentum_y=MOMENTUM_Y, lr_teacher=LR_TEACHER)
    self.buffer = buffer
    args = self.args
    # DATM.py L138, L242–246, L324–329
    syn_lr = torch.tensor(args.lr_teacher).to(args.device)
    self.image_syn = image_syn.detach().to(args.device).requires_grad_(True)
    self.syn_lr = syn_lr.detach().to(args.device).requires_grad_(True)
    self.optimizer_img = torch.optim.SGD([self.image_syn], lr=args.lr_img, momentum=0.5)
    self.optimizer_lr = torch.optim.SGD([self.syn_lr], lr=args.lr_lr, momentum=0.5)
    self.optimizer_img.zero_grad()
    self.label_syn = label_syn.detach().clone().to(args.device).requires_grad_(True)
    self.optimizer_y = torch.optim.SGD([self.label_syn], lr=args.lr_y, momentum=args.Momentum_y)

    def SoftCrossEntropy(inputs, target, reduction='average'):  # DATM.py L255–260
      F = torch.nn.functional
      input_log_likelihood = -F.log_softmax(inputs, dim=1)
      target_log_likelihood = F.softmax(target, dim=1)
      batch = inputs.shape[0]
      loss = torch.sum(torch.mul(input_log_likelihood, target_log_likelihood)) / batch
      return loss
    self.criterion = SoftCrossEntropy

  def __call__(self, start_epoch: int | None = None) -> dict:
    """DATM.py L454–559 (``args.load_all`` expert pick; no wandb). ``start_epoch`` fixes L491's draw."""
    torch, np, args = self.torch, __import__("numpy"), self.args
    get_network, ReparamModule, DiffAugment = self.ub.get_network, self.ReparamModule, self.ub.DiffAugment
    channel, num_classes, im_size, buffer = self.channel, self.num_classes, self.im_size, self.buffer
    image_syn, label_syn, syn_lr, criterion = self.image_syn, self.label_syn, self.syn_lr, self.criterion
    optimizer_img, optimizer_lr, optimizer_y = self.optimizer_img, self.optimizer_lr, self.optimizer_y

    student_net = get_network(args.model, channel, num_classes, im_size, dist=False).to(args.device)  # get a random model
    student_net = ReparamModule(student_net)
    student_net.train()
    num_params = sum([np.prod(p.size()) for p in (student_net.parameters())])
    expert_trajectory = buffer[np.random.randint(0, len(buffer))]
    Upper_Bound = args.max_start_epoch
    start_epoch = np.random.randint(args.min_start_epoch, Upper_Bound) if start_epoch is None else start_epoch

    starting_params = expert_trajectory[start_epoch]
    target_params = expert_trajectory[start_epoch+args.expert_epochs]
    target_params = torch.cat([p.data.to(args.device).reshape(-1) for p in target_params], 0)
    student_params = [torch.cat([p.data.to(args.device).reshape(-1) for p in starting_params], 0).requires_grad_(True)]
    starting_params = torch.cat([p.data.to(args.device).reshape(-1) for p in starting_params], 0)

    syn_images = image_syn
    y_hat = label_syn
    indices_chunks = []
    for step in range(args.syn_steps):
      if not indices_chunks:
        indices = torch.randperm(len(syn_images))
        indices_chunks = list(torch.split(indices, args.batch_syn))
      these_indices = indices_chunks.pop()
      x = syn_images[these_indices]
      this_y = y_hat[these_indices]
      if args.dsa and (not args.no_aug):
        x = DiffAugment(x, args.dsa_strategy, param=args.dsa_param)
        if channel == 1:  # not in DATM.py: see the module docstring (torch 2.13, 1-channel crop → channels-last)
          x = x.clone(memory_format=torch.contiguous_format)
      forward_params = student_params[-1]
      x = student_net(x, flat_param=forward_params)
      ce_loss = criterion(x, this_y)
      grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
      student_params.append(student_params[-1] - syn_lr * grad)

    param_loss = torch.tensor(0.0).to(args.device)
    param_dist = torch.tensor(0.0).to(args.device)
    param_loss += torch.nn.functional.mse_loss(student_params[-1], target_params, reduction="sum")
    param_dist += torch.nn.functional.mse_loss(starting_params, target_params, reduction="sum")
    param_loss /= num_params
    param_dist /= num_params
    param_loss /= param_dist
    grand_loss = param_loss

    optimizer_img.zero_grad()
    optimizer_lr.zero_grad()
    optimizer_y.zero_grad()
    grand_loss.backward()
    out = {"loss": float(grand_loss.item()), "theta_hat": student_params[-1].detach(),
           "grad_x": image_syn.grad.detach().clone(), "grad_y": label_syn.grad.detach().clone(),
           "grad_lr": syn_lr.grad.detach().clone(), "updated": bool(grand_loss <= args.threshold)}
    if grand_loss <= args.threshold:
      optimizer_y.step()
      optimizer_img.step()
      optimizer_lr.step()
    for _ in student_params:
      del _
    return out


def _torch_matmul_peak(torch, n: int = MATMUL_N, steps: int = 5) -> float:
  a = torch.randn(n, n)
  a @ a
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - t0)
  return 2.0 * n ** 3 / median(times)


def _torch_buffer(torch, ub, cfg: dict, name: str):
  """One synthetic expert in the buffer format of buffer_FTD.py: a list of epochs, each the list of
  ``teacher_net.parameters()`` tensors, drifting from a fresh network's init."""
  C, H, W = cfg["image_CHW"]
  net = ub.get_network("ConvNet", C, NUM_CLASSES, (H, W), dist=False)
  g = torch.Generator().manual_seed(_seed(name) % 2**31)
  p = [q.detach().clone() for q in net.parameters()]
  traj = []
  for _ in range(MAX_START + EXPERT_EPOCHS + 1):
    traj.append(p)
    p = [q + 0.01 * q.abs().mean() * torch.randn(q.shape, generator=g) for q in p]
  return [traj]


def torch_worker(args) -> None:
  import numpy as np
  import torch
  torch.set_num_threads(args.threads)
  cfg = CONFIGS[args.config_name]
  ub, ReparamModule, stubbed = _import_official(args.official, cfg["width"])
  from torch.utils.flop_counter import FlopCounterMode
  C, H, W = cfg["image_CHW"]
  n = cfg["ipc"] * NUM_CLASSES
  rng = _np_rng("inputs", args.config_name)
  np.random.seed(0)
  torch.manual_seed(0)
  image_syn = torch.from_numpy(rng.standard_normal((n, C, H, W)).astype(np.float32))
  label_syn = torch.from_numpy(rng.standard_normal((n, NUM_CLASSES)).astype(np.float32))
  it = OfficialIteration(ub, ReparamModule, cfg, image_syn=image_syn, label_syn=label_syn,
                         buffer=_torch_buffer(torch, ub, cfg, "expert" + args.config_name), dsa=True,
                         threshold=THRESHOLD)
  num_params = sum(int(p.numel()) for p in it.buffer[0][0])
  rss0, hw0 = rss_bytes(), highwater_bytes()
  t0 = time.perf_counter()
  with FlopCounterMode(display=False) as fc:
    r = it()
  flop_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    r = it()
  warm_s = time.perf_counter() - t0
  info = {"framework": "torch", "config": args.config_name, **cfg, "images": n,
          "timed": "official distill/DATM.py L454-559 (get_network + ReparamModule + DiffAugment + create_graph)",
          "official": os.path.abspath(args.official), "stubbed_modules": stubbed, "num_params": num_params,
          "torch": torch.__version__, "threads": torch.get_num_threads(),
          "interop_threads": torch.get_num_interop_threads(), "dsa_strategy": DSA_STRATEGY,
          "torch_flop_counter_flops": float(fc.get_total_flops()), "flop_counter_iteration_seconds": round(flop_s, 3),
          "warmup_seconds": round(warm_s, 3), "rss_before_warmup_MiB": mib(rss0),
          "rss_highwater_before_warmup_MiB": mib(hw0), "warmup_loss": r["loss"]}

  def run_round(iters: int) -> dict:
    peak = _torch_matmul_peak(torch)
    r, rnd = timed_round(iters, it, lambda r: r["loss"])
    return {**rnd, "skipped": float(not r["updated"]), "matmul_peak_flops_per_sec": peak,
            "rss_before_compile_bytes": rss0, "rss_highwater_bytes": highwater_bytes()}

  _serve(info, run_round)


def torch_check_worker(args) -> None:
  """The official half of the equality check: inputs from ``--check_in`` (npz), outputs to ``--check_out``."""
  import numpy as np
  import torch
  torch.set_num_threads(args.threads)
  cfg = CONFIGS["B"]
  ub, ReparamModule, _ = _import_official(args.official, cfg["width"])
  z = np.load(args.check_in)
  start = [torch.from_numpy(z[f"start_{i}"]) for i in range(int(z["n_leaves"]))]
  target = [torch.from_numpy(z[f"target_{i}"]) for i in range(int(z["n_leaves"]))]
  net = ub.get_network("ConvNet", cfg["image_CHW"][0], NUM_CLASSES, cfg["image_CHW"][1:], dist=False)
  shapes = [tuple(p.shape) for p in net.parameters()]
  if shapes != [tuple(p.shape) for p in start]:
    raise ValueError(f"parameter shapes differ: official {shapes} vs given {[tuple(p.shape) for p in start]}")
  buffer = [[start] + [start] * (EXPERT_EPOCHS - 1) + [target]]  # epoch 0 = start, epoch M = target
  it = OfficialIteration(ub, ReparamModule, cfg, image_syn=torch.from_numpy(z["x_NCHW"]),
                         label_syn=torch.from_numpy(z["y"]), buffer=buffer, dsa=False, threshold=1e30,
                         batch_syn=int(z["x_NCHW"].shape[0]))
  r = it(start_epoch=0)
  np.savez(args.check_out, loss=np.float64(r["loss"]), theta_hat=r["theta_hat"].numpy(),
           grad_x_NCHW=r["grad_x"].numpy(), grad_y=r["grad_y"].numpy(), grad_lr=r["grad_lr"].numpy())


# ----------------------------------------------------------------------------------------------- main


def equality_check(args) -> dict:
  """lmx vs official at config B's shape, DSA off, the same inputs: meta-loss, θ̂_N and gradients."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from lmx.methods.datm import distill as D
  from lmx.models import convnet

  cfg = CONFIGS["B"]
  c, inner, _ = _lmx_config(cfg)
  n = cfg["ipc"] * NUM_CLASSES
  inner = dataclasses.replace(inner, lr_param="raw", dsa_strategy=(), batch_syn=n)
  C, H, W = cfg["image_CHW"]
  rng = _np_rng("check")
  p0 = convnet.init_params(jax.random.key(3), (H, W, C), NUM_CLASSES, depth=DEPTH, width=cfg["width"])
  start = jax.tree.map(lambda a: np.asarray(a, np.float32), p0)
  target = jax.tree.map(lambda a: (a + 0.05 * np.abs(a).mean() * rng.standard_normal(a.shape)).astype(np.float32),
                        start)
  x = rng.standard_normal((n, H, W, C)).astype(np.float32)
  y = (3.0 * rng.standard_normal((n, NUM_CLASSES))).astype(np.float32)
  syn = {"x": jnp.asarray(x), "y": jnp.asarray(y), "lr": jnp.float32(LR_TEACHER)}
  apply_fn = convnet.apply_with(c.model.conv_impl, second_order=True)
  key = jax.random.key(0)
  loss, grads = jax.jit(jax.value_and_grad(
      lambda s: D.meta_loss(s, start, target, key, inner, apply_fn)))(syn)
  theta_hat = jax.jit(lambda s: D.inner_loop(s, start, key, inner, apply_fn))(syn)
  tmp = tempfile.mkdtemp(prefix="datm_check_")
  fin, fout = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
  st, tg = lmx_to_torch_params(start), lmx_to_torch_params(target)
  np.savez(fin, x_NCHW=np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y=y, n_leaves=len(st),
           **{f"start_{i}": a for i, a in enumerate(st)}, **{f"target_{i}": a for i, a in enumerate(tg)})
  cmd = [args.torch_python, os.path.abspath(__file__), "--worker=torch_check", f"--official={args.official}",
         f"--threads={args.threads}", f"--check_in={fin}", f"--check_out={fout}"]
  subprocess.run(cmd, check=True)
  z = np.load(fout)
  th_lmx = np.concatenate([a.reshape(-1) for a in lmx_to_torch_params(jax.device_get(theta_hat))])
  out = {"kind": "equality_check", "config": "B", "dsa": False, "lr_param": "raw", "batch_syn": n,
         "syn_steps": inner.syn_steps, "conv_impl": convnet.resolve_conv_impl(c.model.conv_impl, second_order=True),
         "loss_lmx": float(loss), "loss_official": float(z["loss"]),
         "loss_rel_diff": abs(float(loss) - float(z["loss"])) / abs(float(z["loss"])),
         "theta_hat": rel_diff(th_lmx, z["theta_hat"]),
         "grad_images": rel_diff(np.asarray(grads["x"]).transpose(0, 3, 1, 2), z["grad_x_NCHW"]),
         "grad_labels": rel_diff(grads["y"], z["grad_y"]),
         "grad_lr": rel_diff(np.asarray(grads["lr"]).reshape(1), z["grad_lr"].reshape(1)),
         "grad_lr_lmx": float(grads["lr"]), "grad_lr_official": float(z["grad_lr"]), "loadavg": _loadavg()}
  return out


def run_config(name: str, args, results: dict, record) -> None:
  """Both frameworks at config ``name``: one fresh worker per arm (lmx; torch at each of ``--threads``), set up one
  after the other, then ``--rounds`` rounds in which every arm times ``--iters`` iterations, the order rotated
  each round; a summary per arm and the torch/lmx time ratios."""
  here = os.path.abspath(__file__)
  root = os.path.dirname(os.path.dirname(here))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  argv = {"lmx": [sys.executable, here, "--worker=lmx", f"--config_name={name}"]}
  for t in args.thread_list:
    argv[f"torch_t{t}"] = [args.torch_python, here, "--worker=torch", f"--official={args.official}",
                           f"--config_name={name}", f"--threads={t}", f"--warmup={args.warmup}"]
  arms = list(argv)
  workers, ready = {}, {}
  try:
    for arm in arms:
      workers[arm] = Worker(argv[arm], env=env if arm == "lmx" else None, cwd=root)
      ready[arm] = workers[arm].read()
      record(results, {"kind": "setup", "arm": arm, "loadavg": _loadavg(), **ready[arm]}, args.out)
    rounds = {arm: [] for arm in arms}
    flops = ready["lmx"].get("xla_flops")
    for r in range(args.rounds):
      k = r % len(arms)
      for arm in arms[k:] + arms[:k]:
        load = _loadavg()
        rep = workers[arm].call({"cmd": "round", "iters": args.iters})
        rep["loadavg"] = load
        rounds[arm].append(rep)
        record(results, {"kind": "round", "config": name, "arm": arm, "framework": ready[arm]["framework"],
                         "round": r, "seconds": [round(t, 4) for t in rep["times"]], "losses": rep["losses"],
                         "matmul_peak_flops_per_sec": rep["matmul_peak_flops_per_sec"],
                         "rss_exec_peak_MiB": mib(rep["rss_exec_peak_bytes"]),
                         "rss_before_round_MiB": mib(rep["rss_before_round_bytes"]), "loadavg": load}, args.out)
  finally:
    byes = {arm: w.close() for arm, w in workers.items()}
  summaries = {}
  for arm in arms:
    rs = rounds[arm]
    if not rs:
      continue
    base = rs[0]["rss_before_compile_bytes"]
    exec_peak = max(x["rss_exec_peak_bytes"] for x in rs)
    exec_growth = max(x["rss_exec_peak_bytes"] - x["rss_before_round_bytes"] for x in rs)
    high = byes[arm].get("rss_highwater_bytes") or max(x["rss_highwater_bytes"] for x in rs)
    s = {"kind": "summary", "config": name, "arm": arm, "framework": ready[arm]["framework"], **CONFIGS[name],
         **summarize(rs, flops),
         "flops_source": ready["lmx"].get("xla_flops_source", "XLA cost_analysis") + " (same math for both)",
         "threads": ready[arm]["threads"],
         "rss_baseline_MiB": mib(base), "rss_before_round_MiB": mib(min(x["rss_before_round_bytes"] for x in rs)),
         "rss_exec_peak_MiB": mib(exec_peak), "rss_exec_growth_MiB": mib(exec_growth),
         "rss_exec_peak_over_baseline_MiB": mib(exec_peak - base),
         "rss_highwater_MiB": mib(high), "rss_highwater_over_baseline_MiB": mib(high - base),
         "loadavg_rounds": [x["loadavg"] for x in rs]}
    if arm == "lmx":
      for key in ("xla_temp_plus_argument_plus_output_MiB", "xla_memory_bytes", "compile_seconds", "conv_impl",
                  "inner_spec"):
        s[key] = ready["lmx"][key]
    else:
      s["torch_flop_counter_flops"] = ready[arm]["torch_flop_counter_flops"]
    summaries[arm] = s
    record(results, s, args.out)
  if "lmx" in summaries:
    lm = summaries["lmx"]["seconds_per_iteration"]
    record(results, {"kind": "ratio", "config": name,
                     **{f"{arm}_over_lmx_seconds": s["seconds_per_iteration"] / lm
                        for arm, s in summaries.items() if arm != "lmx"}}, args.out)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--official", default="/tmp/datm_official", help="checkout of NUS-HPC-AI-Lab/DATM")
  ap.add_argument("--torch_python", default="/tmp/hfref/bin/python", help="a python with torch installed")
  ap.add_argument("--configs", default="B,A,C")
  ap.add_argument("--iters", type=int, default=2, help="timed iterations per round")
  ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds per framework")
  ap.add_argument("--threads", default="2,1",
                  help="torch.set_num_threads for each torch arm (comma list; the first also for the check)")
  ap.add_argument("--warmup", type=int, default=1,
                  help="plain torch warm-up iterations after the FLOP-counted one (lmx: compile + 1 call)")
  ap.add_argument("--check", default="auto", choices=("auto", "yes", "no"),
                  help="equality check at config B (auto: when B is in --configs)")
  ap.add_argument("--out", default="benchmarks/results/datm_vs_official.json")
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  ap.add_argument("--config_name", default="B", help=argparse.SUPPRESS)
  ap.add_argument("--check_in", default="", help=argparse.SUPPRESS)
  ap.add_argument("--check_out", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.thread_list = [int(t) for t in str(args.threads).split(",") if t.strip()]
  args.threads = args.thread_list[0]
  if args.worker == "lmx":
    return lmx_worker(args)
  if args.worker == "torch":
    return torch_worker(args)
  if args.worker == "torch_check":
    return torch_check_worker(args)

  if not os.path.exists(os.path.join(args.official, "reparam_module.py")):
    ap.error(f"--official={args.official}: no reparam_module.py there (a checkout of NUS-HPC-AI-Lab/DATM)")
  if not os.path.exists(args.torch_python):
    ap.error(f"--torch_python={args.torch_python} does not exist")
  configs = [c.strip() for c in args.configs.split(",") if c.strip()]
  for c in configs:
    if c not in CONFIGS:
      ap.error(f"--configs: unknown {c!r} (expected some of {sorted(CONFIGS)})")
  from benchmarks.common import environment, record
  commit = None
  try:
    commit = subprocess.run(["git", "-C", args.official, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
  except (subprocess.CalledProcessError, OSError):
    pass
  results = environment(iters=args.iters, rounds=args.rounds, configs=configs, torch_threads=args.thread_list,
                        official=os.path.abspath(args.official), official_commit=commit or "97ae510 (git archive)",
                        torch_python=args.torch_python, argv=sys.argv[1:], loadavg_start=_loadavg(),
                        configs_def={c: CONFIGS[c] for c in configs},
                        started=time.strftime("%Y-%m-%d %H:%M:%S"))
  if args.check == "yes" or (args.check == "auto" and "B" in configs):
    record(results, equality_check(args), args.out)
  for name in configs:
    run_config(name, args, results, record)
  results["loadavg_end"] = _loadavg()
  record(results, {"kind": "end", "loadavg": results["loadavg_end"], "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
         args.out)
  print(markdown_table(results["runs"]))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
