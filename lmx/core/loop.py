"""The one training loop: sharded init or restore, one compiled step, hooks on a cadence, checkpoints, NaN guard.

A method supplies
  ``init_fn(key) -> parts``                      its part of the train state (params, optimiser, EMA, env state...)
                                                 or ``init_state``: those parts as arrays (a stage that goes on
                                                 from another stage's parameters), placed on their shardings
                                                 without compiling an init
  ``step_fn(state, frozen, batch, rng) -> (state, metrics)``
                                                 pure; ``state`` is the parts plus the loop's ``step`` (int32)
  ``frozen``                                     inputs the step reads but does not train (a teacher, a reference
                                                 policy): jit arguments with their own shardings, so
                                                 :meth:`Loop.set_frozen` swaps them without recompiling
  ``data``                                       a Grain iterator, :class:`lmx.core.data.GlobalBatches`, any
                                                 iterator with ``get_state``/``set_state`` (JSON-able state), or
                                                 ``None`` when the step makes its own data on device
  ``batch_fn(step, state) -> batch``             instead of ``data``: a batch made on the host from the step
                                                 number and the current state (RL rollouts of the current
                                                 policy); it must be a pure function of (seed, step, state) so a
                                                 resumed run sees the same batches
  ``stop_fn(step, state) -> bool``               optional: ends the run early after a step (an environment-step
                                                 budget); that step is treated as the last one (checkpoint,
                                                 ``at_end`` hooks), also when a resumed run restores it
  ``hooks``                                      :func:`every` ``(k, fn)``: ``fn(step, state, writer)`` after
                                                 every k-th step (evaluate, plot, sample, refresh a reference...)

``compile_cache`` (a dict the caller owns) lets many short loops share one compiled step: a Loop whose ``step_fn`` is
the same object as an earlier one's, with the same finite keys, shapes, dtypes and shardings, reuses that compiled
step (a method with one RL update per round and role compiles it once, not once per round). The seed is not part
of the compiled program (the step's base key is an argument), so loops of different seeds share it too; and the
launcher turns on XLA's persistent compilation cache in ``<workdir>/.xla_cache``, so stages whose steps lower to
the same program, and a resumed run, read the executable back instead of compiling it again.

``ckpt_every <= 0`` turns checkpoints off (short inner trainings such as DATM's experts and evaluation networks).
``ckpt_dir`` (default ``<workdir>/checkpoints``) lets the stages of one method keep their own checkpoints under the
workdir's ``checkpoints/`` (:func:`lmx.core.stages.checkpoint_dir`).
The loop owns ``state["step"]`` and ``state["guard"]`` (non-finite bookkeeping). A step whose ``finite_keys``
metrics (default ``loss``, ``grad_norm``) are NaN/Inf leaves the method's parts unchanged; ``nan_patience``
consecutive such steps stop the run with :class:`NonFiniteLossError`, keeping the last good checkpoint.

Stopping: Ctrl-C or SIGTERM (:mod:`lmx.core.interrupt`) ends the run after the current step with a checkpoint at
it and :class:`lmx.core.interrupt.Interrupted`. A checkpoint past ``total_steps`` is refused (a shorter rerun
must not overwrite a longer run's outputs). When checkpoints exist but none reads back, the run stops unless
``allow_fresh_start`` (or ``LMX_ALLOW_FRESH_START=1``, what ``launch/run.py --allow_fresh_start`` sets).

Determinism: the step's rng is ``fold_in(rng_stream(seed, "step"), step)`` and the data position is saved with
every checkpoint, so a resumed run is bitwise equal to an uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from lmx.core import checkpoint as ckpt_lib
from lmx.core import interrupt
from lmx.core.config import ConfigError
from lmx.core.mesh import replicated
from lmx.core.metrics import Writer, progress
from lmx.core.rng import rng_stream

LOOP_KEYS = ("step", "guard")

# Fault injection for the tests of every method's stop and resume paths (never set in normal use):
#   LMX_FAULT=nan:<name>:<k>          the loop named <name> (its log prefix without "/", or its desc) sees a NaN
#                                     loss at step k (as if the step computed one: the guard keeps the state)
#   LMX_FAULT=sigterm_after_save:<n>  the process sends itself SIGTERM after its n-th checkpoint save
FAULT_ENV = "LMX_FAULT"
_saves = 0
# (checkpoint folder, step) of every checkpoint this process saved: a loop that restores one of them continues a
# stage of the same run (LET's CE phase after its alignment phase), which is not a resume worth a console line
_saved_here: set[tuple[str, int]] = set()


def _fault() -> tuple[str, str, int] | None:
  spec = os.environ.get(FAULT_ENV, "")
  if not spec:
    return None
  kind, _, rest = spec.partition(":")
  name, _, k = rest.rpartition(":")
  return kind, name, int(k)


def _after_save() -> None:
  global _saves
  _saves += 1
  f = _fault()
  if f is not None and f[0] == "sigterm_after_save" and _saves == f[2]:
    import signal

    os.kill(os.getpid(), signal.SIGTERM)


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/Inf; the last good checkpoint is kept."""


def host(x) -> np.ndarray:
  """Host copy of a (possibly multi-host replicated) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(jax.device_get(x))


@dataclasses.dataclass(frozen=True)
class Hook:
  """``fn(step, state, writer) -> dict | None`` after every ``every``-th step, or at the listed ``steps`` when
  given (and the last step when ``at_end``).

  A returned dict is logged (one console line) under ``<name>/``.
  """
  name: str
  every: int
  fn: Callable
  at_end: bool = True
  steps: frozenset | None = None

  def due(self, step: int, total: int) -> bool:
    on = (step in self.steps) if self.steps is not None else step % self.every == 0
    return on or (self.at_end and step == total)


def every(k: int, fn: Callable, *, name: str | None = None, at_end: bool = True) -> Hook:
  """A hook running ``fn`` every ``k`` steps."""
  if int(k) <= 0:
    raise ValueError(f"hook cadence must be > 0, got {k}")
  return Hook(name or getattr(fn, "__name__", "hook"), int(k), fn, at_end)


def at_steps(steps, fn: Callable, *, name: str | None = None, at_end: bool = False) -> Hook:
  """A hook running ``fn`` after each step in ``steps`` (a schedule, e.g. dense early and sparse later)."""
  steps = frozenset(int(s) for s in steps)
  if not steps or min(steps) <= 0:
    raise ValueError(f"hook steps must be a non-empty set of steps > 0, got {sorted(steps)}")
  return Hook(name or getattr(fn, "__name__", "hook"), 1, fn, at_end, steps)


@dataclasses.dataclass
class TrainResult:
  state: Any
  last_metrics: dict
  hook_metrics: dict  # name -> the last dict that hook returned
  steps_per_sec: float
  compile_seconds: float
  resumed_from: int | None
  temp_bytes: int | None  # compiled step's scratch memory (XLA memory analysis), where the backend reports it
  steps: int = 0  # the step the run ended at (``total_steps``, or earlier when ``stop_fn`` ended it)


# ------------------------------------------------------------------------------------------ optax train state


def optax_state(params, tx: optax.GradientTransformation) -> dict:
  """The usual parts: ``{"params", "opt_state"}``."""
  return {"params": params, "opt_state": tx.init(params)}


def optax_shardings(params_shardings, tx: optax.GradientTransformation, abstract_params, mesh) -> dict:
  """Shardings of :func:`optax_state`: optimiser moments follow their params, the rest is replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params_shardings,
                                 transform_non_params=lambda _: replicated(mesh))
  return {"params": params_shardings, "opt_state": opt_sh}


def optax_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable | None = None, *,
               trainable: Sequence[str] | None = None, pass_step: bool = False):
  """``step(state, frozen, batch, rng)`` for ``loss_fn(params, frozen, batch, rng) -> (loss, metrics)``.

  ``trainable=None`` differentiates ``state["params"]``; a tuple of state keys (e.g. ``("params", "proj")``)
  differentiates the dict ``{k: state[k]}`` instead (``tx``'s state must then be built on that dict).
  ``pass_step=True`` gives ``loss_fn`` the traced ``state["step"]`` in place of the rng (for in-step schedules).
  """

  def step(state, frozen, batch, rng):
    params = state["params"] if trainable is None else {k: state[k] for k in trainable}
    last = state["step"] if pass_step else rng
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, last)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
      metrics["lr"] = schedule(state["step"])
    new = optax.apply_updates(params, updates)
    new = {"params": new} if trainable is None else new
    return dict(state, **new, opt_state=opt_state), metrics

  return step


# ------------------------------------------------------------------------------------------ the loop


def _nan_at(names: Sequence[str]) -> int | None:
  """The step at which ``LMX_FAULT=nan:<name>:<k>`` injects a NaN loss into the loop named by one of ``names``."""
  fault = _fault()
  return fault[2] if fault is not None and fault[0] == "nan" and fault[1] in names else None


def guarded(step_fn: Callable, *, seed: int, finite_keys: Sequence[str] = ("loss", "grad_norm"),
            names: Sequence[str] = ()) -> Callable:
  """``(state, frozen, batch) -> (state, metrics)``: the step with its rng, step count and NaN guard."""
  base = rng_stream(seed, "step")
  keyed = guarded_keyed(step_fn, finite_keys=finite_keys, names=names)
  return lambda state, frozen, batch: keyed(state, frozen, batch, base)


def guarded_keyed(step_fn: Callable, *, finite_keys: Sequence[str] = ("loss", "grad_norm"),
                  names: Sequence[str] = ()) -> Callable:
  """:func:`guarded` with the base key of the step rngs as a fourth argument ``(state, frozen, batch, key)``, so
  one compiled step serves every seed (the loop compiles this)."""
  nan_at = _nan_at(names)

  def wrapped(state, frozen, batch, base):
    new, metrics = step_fn(state, frozen, batch, jax.random.fold_in(base, state["step"]))
    if nan_at is not None:
      metrics = {k: (jnp.where(state["step"] + 1 == nan_at, jnp.nan, v) if k in finite_keys else v)
                 for k, v in metrics.items()}
    checks = [jnp.all(jnp.isfinite(metrics[k])) for k in finite_keys if k in metrics]
    ok = jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)
    parts = [k for k in state if k not in LOOP_KEYS]
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), {k: new[k] for k in parts}, {k: state[k] for k in parts})
    g, bad = state["guard"], (~ok).astype(jnp.int32)
    run = (g["run"] + 1) * bad
    guard = {"bad": g["bad"] + bad, "run": run, "max_run": jnp.maximum(g["max_run"], run),
             "first": jnp.where((g["bad"] == 0) & (bad > 0), state["step"], g["first"])}
    return {**kept, "step": state["step"] + 1, "guard": guard}, metrics

  return wrapped


class CompiledStep:
  """A compiled loop step called as ``compiled(state, frozen, batch)``: it passes its loop's step key (the
  executable takes it as an argument, so loops that differ only in their seed share one executable)."""

  def __init__(self, executable, key):
    self.executable, self.key = executable, key

  def __call__(self, state, frozen, batch):
    return self.executable(state, frozen, batch, self.key)

  def __getattr__(self, name):  # memory_analysis, as_text, cost_analysis, ...
    return getattr(self.executable, name)


@jax.jit
def _accumulate(acc, m):
  """Running sum of the window's metrics: one dispatch per step, not one per metric."""
  return jax.tree.map(jnp.add, acc, m)


def _loop_parts() -> dict:
  z = jnp.zeros((), jnp.int32)
  return {"step": z, "guard": {"bad": z, "run": z, "max_run": z, "first": jnp.full((), -1, jnp.int32)}}


class _JsonState:
  """Adapts an iterator with JSON-able ``get_state``/``set_state`` to Grain's checkpoint handler (bytes)."""

  def __init__(self, it):
    self.it = it

  def get_state(self) -> bytes:
    return json.dumps(self.it.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.it.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    pass


def _checkpointable(data):
  if data is None:
    return None
  import grain

  it = getattr(data, "iterator", data)
  if isinstance(it, grain.DatasetIterator):
    return it
  if not (hasattr(data, "get_state") and hasattr(data, "set_state")):
    raise TypeError(f"data source {type(data).__name__} has no get_state/set_state: a resumed run could not "
                    "continue its data order; wrap it or make the data on device (data=None)")
  return _JsonState(data)


class Loop:
  """Runs (or resumes) ``total_steps`` steps; see the module docstring. ``run()`` returns a :class:`TrainResult`."""

  def __init__(self, *, step_fn: Callable, init_fn: Callable | None = None, mesh, workdir: str, total_steps: int,
               seed: int, init_state=None, state_shardings=None, frozen=None, frozen_shardings=None, data=None,
               hooks: Sequence[Hook] = (), config=None, writer: Writer | None = None, log_every: int = 10,
               ckpt_every: int = 100, ckpt_keep: int = 3, async_checkpointing: bool = True, nan_patience: int = 1,
               finite_keys: Sequence[str] = ("loss", "grad_norm"), desc: str = "train", items_per_step: int = 0,
               item_name: str = "tokens", log_prefix: str = "train/", log_console: bool = True,
               postfix: Sequence[str] = ("loss",), allow_fresh_start: bool | None = None,
               batch_fn: Callable | None = None, stop_fn: Callable | None = None, ckpt_dir: str | None = None,
               compile_cache: dict | None = None):
    if data is not None and batch_fn is not None:
      raise ValueError("give the loop either data (an iterator) or batch_fn (host batches from the state), not both")
    if (init_fn is None) == (init_state is None):
      raise ValueError("give the loop either init_fn (parts from a key) or init_state (the parts), not both")
    self._given = init_state
    if init_state is not None:
      init_fn = lambda key: init_state  # noqa: E731  (for the abstract state)
    self.mesh, self.workdir, self.total_steps, self.seed = mesh, workdir, int(total_steps), int(seed)
    self.init_fn, self.data, self.hooks, self.config = init_fn, data, tuple(hooks), config
    self.batch_fn, self.stop_fn = batch_fn, stop_fn
    self.ckpt_dir = ckpt_dir or os.path.join(workdir, "checkpoints")
    self.log_every, self.ckpt_every, self.nan_patience = int(log_every), int(ckpt_every), int(nan_patience)
    self.desc, self.items_per_step, self.item_name, self.postfix = desc, items_per_step, item_name, tuple(postfix)
    self.writer, self.log_prefix, self.log_console = writer, log_prefix, log_console
    self.allow_fresh_start = (os.environ.get("LMX_ALLOW_FRESH_START", "") not in ("", "0")
                              if allow_fresh_start is None else bool(allow_fresh_start))
    rep = replicated(mesh)
    with jax.set_mesh(mesh):
      abstract = jax.eval_shape(init_fn, rng_stream(self.seed, "init"))
    self.state_shardings = {**(jax.tree.map(lambda _: rep, abstract) if state_shardings is None
                               else state_shardings), **jax.tree.map(lambda _: rep, _loop_parts())}
    on_mesh = lambda x: isinstance(getattr(x, "sharding", None), NamedSharding)  # noqa: E731
    self.frozen_shardings = (jax.tree.map(lambda x: x.sharding if on_mesh(x) else rep, frozen)
                             if frozen_shardings is None else frozen_shardings)
    self.frozen = None
    self._frozen_avals = None
    if frozen is not None:
      self.set_frozen(frozen)
    names = (log_prefix.strip("/"), desc)
    self._step = guarded_keyed(step_fn, finite_keys=finite_keys, names=names)
    self._step_key = rng_stream(self.seed, "step")
    self.compile_cache = compile_cache
    self._step_identity = (step_fn, tuple(finite_keys), _nan_at(names))
    self._ckpt_args = dict(keep=ckpt_keep, async_save=async_checkpointing)
    self._ckpt = None  # opened by restore_or_init / run (a Loop used only to compile opens nothing)
    self._compiled = None

  def set_frozen(self, frozen) -> None:
    """Places new frozen inputs on their shardings; same shapes and dtypes as before (no recompilation)."""
    avals = jax.tree.map(lambda x: (tuple(np.shape(x)), jnp.dtype(x.dtype)), frozen)
    if self._frozen_avals is not None and avals != self._frozen_avals:
      raise ValueError("frozen inputs must keep their tree, shapes and dtypes (they are arguments of one "
                       "compiled step)")
    # A copy: frozen inputs taken from the train state (a reference policy) must outlive its donated buffers.
    self.frozen = jax.device_put(frozen, self.frozen_shardings, may_alias=False)
    self._frozen_avals = avals

  def _init_state(self, key):
    return {**self.init_fn(key), **_loop_parts()}

  def _next_batch(self, step: int, state):
    if self.batch_fn is not None:
      return self.batch_fn(step, state)
    return None if self.data is None else next(self.data)

  def compile(self, state, batch):
    """The step compiled ahead of time for ``state``, the frozen inputs and ``batch`` (what ``run`` calls);
    taken from (and added to) ``compile_cache`` when the Loop has one."""
    key = self._cache_key(state, batch)
    if key is not None and key in self.compile_cache:
      return CompiledStep(self.compile_cache[key], self._step_key)
    executable = self.lower(state, batch).compile()
    if key is not None:
      self.compile_cache[key] = executable
    return CompiledStep(executable, self._step_key)

  def _cache_key(self, state, batch):
    """What the compiled step depends on: the step function, NaN checks, shapes, dtypes and shardings."""
    if self.compile_cache is None:
      return None

    def dtype(x):
      return str(x.dtype) if hasattr(x, "dtype") else str(np.result_type(x))

    def spec(tree):
      leaves, treedef = jax.tree.flatten(tree)
      return treedef, tuple((tuple(np.shape(x)), dtype(x), getattr(x, "sharding", None)) for x in leaves)

    shardings = jax.tree.flatten((self.state_shardings, self.frozen_shardings))
    return (self._step_identity, spec(state), spec(self.frozen), spec(batch), shardings[1], tuple(shardings[0]))

  def lower(self, state, batch, *, lowering_platforms: tuple[str, ...] | None = None):
    """The step lowered for ``state``, the frozen inputs and ``batch`` (arrays, or ``jax.ShapeDtypeStruct`` with
    shardings such as :meth:`abstract_state`); ``lowering_platforms`` (e.g. ``("cuda",)``) builds it for a
    platform this host lacks. Batch leaves without a sharding are replicated."""
    rep = replicated(self.mesh)
    batch_sh = jax.tree.map(lambda x: getattr(x, "sharding", None) or rep, batch)
    jitted = jax.jit(self._step, in_shardings=(self.state_shardings, self.frozen_shardings, batch_sh, rep),
                     out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    return jitted.trace(state, self.frozen, batch, self._step_key).lower(lowering_platforms=lowering_platforms)

  def abstract_state(self):
    """The train state's shapes, dtypes and shardings without allocating it (for :meth:`lower`)."""
    with jax.set_mesh(self.mesh):
      abstract = jax.eval_shape(self._init_state, rng_stream(self.seed, "init"))
    return ckpt_lib.abstract_like(abstract, self.state_shardings)

  def fresh_state(self):
    """A new sharded train state (the method's parts and the loop's)."""
    with jax.set_mesh(self.mesh):
      if self._given is not None:  # a copy: the state is donated to the step, the given arrays stay the caller's
        return jax.device_put({**self._given, **_loop_parts()}, self.state_shardings, may_alias=False)
      return jax.jit(self._init_state, out_shardings=self.state_shardings)(rng_stream(self.seed, "init"))

  def restore_or_init(self):
    """``(start_step, state)``: the newest readable checkpoint (data position restored too) or a fresh state."""
    if self.ckpt_every <= 0:  # checkpointing off (a short inner training, e.g. an evaluation network)
      return 0, self.fresh_state()
    key = rng_stream(self.seed, "init")
    with jax.set_mesh(self.mesh):
      abstract = jax.eval_shape(self._init_state, key)
      if self._ckpt is None:
        self._ckpt = ckpt_lib.Checkpointer(self.ckpt_dir, **self._ckpt_args)
      restored = self._ckpt.restore(ckpt_lib.abstract_like(abstract, self.state_shardings),
                                    data_iter=_checkpointable(self.data), allow_fresh_start=self.allow_fresh_start)
    if restored is not None and restored[0] > self.total_steps:
      raise ConfigError(
          f"the newest checkpoint in {self._ckpt.directory} is at step {restored[0]}, past this run's "
          f"{self.total_steps} steps: ask for at least {restored[0]} steps to continue it, or use a new --workdir "
          "(nothing was changed)")
    return restored if restored is not None else (0, self.fresh_state())

  def run(self) -> TrainResult:
    own_writer = self.writer is None
    writer = self.writer or Writer(self.workdir, total_steps=self.total_steps)
    total, ckpt_data = self.total_steps, _checkpointable(self.data)
    res = TrainResult(None, {}, {}, float("nan"), 0.0, None, None)
    try:
      with interrupt.handling():
        interrupt.check(f"before {self.desc}")
        self._run(res, writer, total, ckpt_data)
    finally:
      if self._ckpt is not None:
        self._ckpt.close()
        self._ckpt = None
      if own_writer:
        writer.close()
    return res

  def _run(self, res: TrainResult, writer, total: int, ckpt_data) -> None:
    pbar = None
    try:
      start, state = self.restore_or_init()
      if start:
        res.resumed_from = start
        if (os.path.abspath(self.ckpt_dir), start) in _saved_here:  # continues this run's own checkpoint
          writer.scalars(start, {"resumed_from_step": start})
        else:
          writer.summary(start, {"resumed_from_step": start}, total=total)
      pbar = progress(total, desc=self.desc, initial=min(start, total))
      acc, n_acc, t_window, steps_window, t_run, steps_run = None, 0, time.time(), 0, 0.0, 0
      step = start
      stopped = start > 0 and self._stopped(start, state)
      with jax.set_mesh(self.mesh):
        while step < total and not stopped:
          batch = self._next_batch(step, state)
          if self._compiled is None:
            t0 = time.time()
            self._compiled = self.compile(state, batch)
            res.compile_seconds = time.time() - t0
            mem = self._compiled.memory_analysis()
            res.temp_bytes = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else None
            t_window = time.time()
          state, m = self._compiled(state, self.frozen, batch)
          acc = m if acc is None else _accumulate(acc, m)
          n_acc, step, steps_window = n_acc + 1, step + 1, steps_window + 1
          pbar.update(1)
          stopped = self._stopped(step, state)
          last = step == total or stopped
          log_now = step % self.log_every == 0 or last
          ckpt_now = self.ckpt_every > 0 and (step % self.ckpt_every == 0 or last)
          if log_now or ckpt_now:
            self._check_finite(state)
          if log_now:
            vals = {k: host(v) / n_acc for k, v in acc.items()}
            dt = time.time() - t_window
            if step - start > 1 and dt > 0:
              vals["steps_per_sec"] = steps_window / dt
              if self.items_per_step:
                vals[f"{self.item_name}_per_sec"] = steps_window * self.items_per_step / dt
              t_run, steps_run = t_run + dt, steps_run + steps_window
            if self.log_console:
              res.last_metrics = writer.summary(step, vals, prefix=self.log_prefix, total=total)
            else:
              res.last_metrics = writer.scalars(step, vals, prefix=self.log_prefix)
            pbar.set_postfix({k: f"{vals[k]:.4g}" for k in self.postfix if k in vals}, refresh=False)
            acc, n_acc, steps_window, t_window = None, 0, 0, time.time()
          t_hooks = time.time()
          for hook in self.hooks:
            if hook.due(step, step if stopped else total):
              out = hook.fn(step, state, writer)
              if out:
                res.hook_metrics[hook.name] = writer.summary(step, out, prefix=f"{hook.name}/", total=total)
          t_window += time.time() - t_hooks  # steps/s counts training only
          if ckpt_now:
            self._ckpt.save(step, state, data_iter=ckpt_data, config=self.config, force=stopped)
            _saved_here.add((os.path.abspath(self.ckpt_dir), step))
            _after_save()
          signum = self._stop_signal(log_now) if not last else None
          if signum is not None:
            self._stop(step, state, ckpt_data, saved=ckpt_now, signum=signum)
        if step == start and start > 0 and (start == total or stopped):
          # resumed at the end (a crash after the last save): finish the outputs
          for hook in self.hooks:
            if hook.at_end:
              out = hook.fn(step, state, writer)
              if out:
                res.hook_metrics[hook.name] = writer.summary(step, out, prefix=f"{hook.name}/", total=total)
      res.state = state
      res.steps = step
      res.steps_per_sec = steps_run / t_run if t_run else float("nan")
    finally:
      if pbar is not None:
        pbar.close()

  def _stopped(self, step: int, state) -> bool:
    return bool(self.stop_fn(step, state)) if self.stop_fn is not None else False

  def _stop_signal(self, log_now: bool) -> int | None:
    """The signal to stop at, agreed by all processes: on a pod the preemption reaches the hosts at different
    steps, so they compare flags (at the logging cadence, one small all-gather) and stop at the same step."""
    if jax.process_count() == 1:
      return interrupt.requested()
    if not log_now:
      return None
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(interrupt.requested() or 0)))
    return int(flags.max()) or None

  def _stop(self, step: int, state, ckpt_data, *, saved: bool, signum: int) -> None:
    """A signal arrived: checkpoint this step (unless checkpoints are off), wait for the saves, raise."""
    name = interrupt.signal_name(signum)
    where = f"at step {step}/{self.total_steps} of {self.desc}"
    if self.ckpt_every <= 0:
      raise interrupt.Interrupted(signum, f"interrupted by {name} {where} (this stage keeps no checkpoints and "
                                          "starts again on resume); rerun the same command to resume")
    self._check_finite(state)
    if not saved:
      self._ckpt.save(step, state, data_iter=ckpt_data, config=self.config, force=True)
    self._ckpt.wait()
    raise interrupt.Interrupted(signum, f"interrupted by {name} {where}; checkpoint saved at step {step} in "
                                        f"{self._ckpt.directory}; rerun the same command to resume")

  def _check_finite(self, state) -> None:
    g = jax.tree.map(lambda x: int(host(x)), state["guard"])
    if g["max_run"] < self.nan_patience:
      return
    last_good = self._ckpt.latest_step() if self._ckpt is not None else None
    where = (f"the last good checkpoint (step {last_good}) is kept in {self._ckpt.directory}"
             if last_good is not None else "no checkpoint had been written yet")
    runs = f"{g['max_run']} consecutive" if self.nan_patience > 1 else f"{g['bad']}"
    raise NonFiniteLossError(
        f"loss or gradient became NaN/Inf at step {g['first'] + 1} ({runs} bad step(s); their updates were "
        "skipped); "
        f"training stopped and {where}. Lower the learning rate, check the data, or tighten gradient clipping, "
        "then rerun to resume.")


def train(**kwargs) -> TrainResult:
  """``Loop(**kwargs).run()``."""
  return Loop(**kwargs).run()
