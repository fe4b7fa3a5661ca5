"""Pure estimators of "Three Phases of Expert Routing" (Mouzouni 2026): loads, balance, the congestion game.

Everything here is a pure function of arrays (jnp, jittable and vmappable unless it says numpy). Labels:
[abstract] stated in the paper's abstract; [reconstructed] a best-guess,
implementable definition (the paper's text was unavailable), not the paper's; [standard] a standard statistic.

Notation: E experts, top-K routing, N tokens; ``L_E`` observed load shares (Σ_e L_e = 1); ``q_E`` per-expert
quality (logit units); γ the congestion coefficient; σ the logit-response temperature (1 in logit units).

The game [reconstructed]: a token choosing e pays −q_e + γ·φ(ρ_e); entropy-regularised choices give the
mean-field equilibrium ρ_e = softmax_e((q − γ·φ(ρ))/σ). φ = log: closed form softmax(q/(σ+γ)) (the
"temperature-scaled softmax" of the abstract); φ = linear (the default for γ_eff): a damped fixed point.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

PHIS = ("linear", "log")
LOAD_EPS = 1e-6  # floor for log-loads and log-qualities of experts no token chose (keeps fits finite)


# ------------------------------------------------------------------------------------------ loads and balance


def expert_loads(experts_NK, n_experts: int, weights_NK=None):
  """Load shares [E] of top-K assignments: L_e = (1/(N·K)) Σ_t 1[e ∈ TopK(z_t)] [reconstructed per the notes;
  the standard Switch/GShard load]. ``weights_NK`` (e.g. the ``kept`` mask as float) weights each choice; the
  shares are normalised by the total weight (all-zero weight gives zeros)."""
  w = jnp.ones(experts_NK.shape, jnp.float32) if weights_NK is None else weights_NK.astype(jnp.float32)
  counts_E = jnp.zeros((n_experts,), jnp.float32).at[experts_NK.reshape(-1)].add(w.reshape(-1))
  return counts_E / jnp.maximum(jnp.sum(counts_E), 1e-12)


def batch_loads(experts_NK, batch_N, n_batches: int, n_experts: int):
  """Per-batch load shares [NB, E] (``batch_N`` int in [0, NB)): the unit of the bootstrap."""
  k = experts_NK.shape[-1]
  idx = batch_N[:, None] * n_experts + experts_NK
  counts = jnp.zeros((n_batches * n_experts,), jnp.float32).at[idx.reshape(-1)].add(1.0)
  counts = counts.reshape(n_batches, n_experts)
  del k
  return counts / jnp.maximum(counts.sum(-1, keepdims=True), 1e-12)


def b0(L_E):
  """B_0 [reconstructed reading (i) of an undefined symbol]: the imbalance index max_e L_e / mean_e L_e (1 =
  perfectly balanced, E = everything on one expert). Swappable: the notes' reading (ii), the intercept of the
  fit, is not implemented."""
  return jnp.max(L_E) / jnp.mean(L_E)


@jax.jit
def balance_stats(L_E) -> dict:
  """Balance statistics of one load vector [standard]: ``cv`` std/mean, ``max_over_mean``
  (= ``b0``), ``maxvio`` (max − mean)/mean (DeepSeek-V3), ``entropy`` H(L)/log E, ``gini``, ``dead`` (experts with
  zero load)."""
  e = L_E.shape[-1]
  mean = jnp.mean(L_E)
  plogp = jnp.where(L_E > 0, L_E * jnp.log(jnp.where(L_E > 0, L_E, 1.0)), 0.0)
  gini = jnp.sum(jnp.abs(L_E[:, None] - L_E[None, :])) / (2.0 * e * e * mean)
  return {"cv": jnp.std(L_E) / mean, "max_over_mean": b0(L_E), "maxvio": (jnp.max(L_E) - mean) / mean,
          "entropy": -jnp.sum(plogp) / math.log(e), "gini": gini, "dead": jnp.sum(L_E <= 0).astype(jnp.float32)}


# ------------------------------------------------------------------------------------------ quality estimators

QUALITY_ESTIMATORS = ("logit", "prob", "gate", "contrib")


def _segment_mean(values_N, seg_N, n_seg: int):
  s = jnp.zeros((n_seg,) + values_N.shape[1:], jnp.float32).at[seg_N].add(values_N.astype(jnp.float32))
  c = jnp.zeros((n_seg,), jnp.float32).at[seg_N].add(1.0)
  return s, c


def quality_scores(logits_NE, experts_NK, gates_NK, batch_N, n_batches: int, contrib_NK=None) -> dict:
  """The four per-expert quality estimators, per batch [NB, E] each [reconstructed: the paper has four,
  identities unknown; these follow the notes' list]:

  * ``logit``: mean router logit, mean_t z_{t,e} (the primary q for γ_eff). (The notes' "mean log router
    probability" mean_t log softmax(z_t)_e differs from it by a per-token constant, so it gives the very same γ:
    it is not a separate estimator here.)
  * ``prob``: log of the mean router probability, log mean_t softmax(z_t)_e (log P_e of the Switch loss).
  * ``gate``: log of the mean gate weight given selection, log mean_{(t,k): e_{t,k}=e} g_{t,k}.
  * ``contrib``: log of the mean contribution given selection, log mean ‖g_{t,k}·FFN_e(x_t)‖ (needs
    ``contrib_NK``; NaN-filled otherwise).

  Experts no token in a batch selected get log(LOAD_EPS) for the selection-conditioned ones.
  """
  n, e = logits_NE.shape
  z = logits_NE.astype(jnp.float32)
  s, c = _segment_mean(z, batch_N, n_batches)
  cnt = jnp.maximum(c, 1.0)[:, None]
  out = {"logit": s / cnt}
  p, _ = _segment_mean(jax.nn.softmax(z, axis=-1), batch_N, n_batches)
  out["prob"] = jnp.log(jnp.maximum(p / cnt, LOAD_EPS))

  def given_selection(v_NK):
    idx = (batch_N[:, None] * e + experts_NK).reshape(-1)
    num = jnp.zeros((n_batches * e,), jnp.float32).at[idx].add(v_NK.reshape(-1).astype(jnp.float32))
    den = jnp.zeros((n_batches * e,), jnp.float32).at[idx].add(1.0)
    mean = jnp.where(den > 0, num / jnp.maximum(den, 1.0), LOAD_EPS)
    return jnp.log(jnp.maximum(mean, LOAD_EPS)).reshape(n_batches, e)

  out["gate"] = given_selection(gates_NK)
  out["contrib"] = (given_selection(contrib_NK) if contrib_NK is not None
                    else jnp.full((n_batches, e), jnp.nan, jnp.float32))
  return out


# ------------------------------------------------------------------------------------------ the equilibrium


def _phi(rho, phi: str):
  if phi == "log":
    return jnp.log(jnp.maximum(rho, 1e-30))
  if phi == "linear":
    return rho
  raise ValueError(f"phi={phi!r}; choose one of {PHIS}")


@functools.partial(jax.jit, static_argnames=("sigma", "phi", "iters"))
def equilibrium(q_E, gamma, *, sigma: float = 1.0, phi: str = "linear", iters: int = 800):
  """Single-type mean-field equilibrium ρ [E] of the congestion game by a damped fixed point [reconstructed]:
  u ← (1−η)·u + η·log softmax((q − γ·φ(e^u))/σ), iterated in log-load space in a ``lax.fori_loop``.

  The damping η = σ/(σ + |γ|·c) with c = 1 for φ = log (then one step is exact: the map's Jacobian is −γ/σ) and
  c = max_e ρ_e for φ = linear (the Jacobian's largest eigenvalue is about γ·max ρ/σ). γ may be traced."""
  q = jnp.asarray(q_E, jnp.float32)
  gamma = jnp.asarray(gamma, jnp.float32)

  def body(_, u):
    rho = jnp.exp(u)
    target = jax.nn.log_softmax((q - gamma * _phi(rho, phi)) / sigma)
    c = 1.0 if phi == "log" else jnp.max(rho)
    eta = sigma / (sigma + jnp.abs(gamma) * c)
    u = (1.0 - eta) * u + eta * target
    return u - jax.nn.logsumexp(u)  # stay on the simplex

  u0 = jax.nn.log_softmax(q / sigma)
  return jnp.exp(jax.lax.fori_loop(0, iters, body, u0))


def equilibrium_log_closed_form(q_E, gamma, *, sigma: float = 1.0):
  """The log-congestion equilibrium in closed form: softmax(q/(σ+γ)) [reconstructed; the abstract's
  "reduces to temperature-scaled softmax"]."""
  return jax.nn.softmax(jnp.asarray(q_E, jnp.float32) / (sigma + gamma))


@functools.partial(jax.jit, static_argnames=("sigma", "phi", "iters"))
def multitype_equilibrium(q_ME, w_M, gamma, *, sigma: float = 1.0, phi: str = "linear", iters: int = 800):
  """Multi-type equilibrium [reconstructed]: ρ_{m,e} = softmax_e((q_{m,e} − γ·φ(L_e))/σ) with the shared
  aggregate load L_e = Σ_m w_m ρ_{m,e}; returns L [E] (damped fixed point on L, as :func:`equilibrium`)."""
  q = jnp.asarray(q_ME, jnp.float32)
  w = jnp.asarray(w_M, jnp.float32) / jnp.maximum(jnp.sum(w_M), 1e-12)
  gamma = jnp.asarray(gamma, jnp.float32)

  def agg(L):
    return jnp.einsum("m,me->e", w, jax.nn.softmax((q - gamma * _phi(L, phi)[None, :]) / sigma, axis=-1))

  def body(_, L):
    c = 1.0 if phi == "log" else jnp.max(L)
    eta = sigma / (sigma + jnp.abs(gamma) * c)
    L = (1.0 - eta) * L + eta * agg(L)
    return L / jnp.sum(L)

  return jax.lax.fori_loop(0, iters, body, agg(jnp.full(q.shape[-1], 1.0 / q.shape[-1])))


# ------------------------------------------------------------------------------------------ fitting


def l1(a_E, b_E):
  """Σ_e |a_e − b_e| (the load-prediction error; 0 ≤ L1 ≤ 2)."""
  return jnp.sum(jnp.abs(a_E - b_E), axis=-1)


def _golden_min(f, lo, hi, iters: int = 40):
  """Golden-section minimiser of a scalar function on [lo, hi] (traced bounds; ``lax.fori_loop``)."""
  r = (math.sqrt(5.0) - 1.0) / 2.0

  def body(_, s):
    a, b = s
    c, d = b - r * (b - a), a + r * (b - a)
    left = f(c) < f(d)
    return jnp.where(left, a, c), jnp.where(left, d, b)

  a, b = jax.lax.fori_loop(0, iters, body, (lo, hi))
  return (a + b) / 2.0


def _grid_then_golden(f, grid):
  vals = jax.vmap(f)(grid)
  i = jnp.argmin(vals)
  lo, hi = grid[jnp.maximum(i - 1, 0)], grid[jnp.minimum(i + 1, grid.shape[0] - 1)]
  x = _golden_min(f, lo, hi)
  return jnp.where(f(x) <= vals[i], x, grid[i])


@functools.partial(jax.jit, static_argnames=("sigma", "phi", "lo", "hi", "n_grid", "iters"))
def fit_gamma_l1(q_E, L_E, *, sigma: float = 1.0, phi: str = "linear", lo: float = 0.0, hi: float = 200.0,
                 n_grid: int = 206, iters: int = 800):
  """γ̂ = argmin_γ Σ_e |ρ_e(γ; q) − L_e| [reconstructed estimator (a)]: a uniform grid on [lo, hi], then a
  golden-section search between the best grid point's neighbours. A γ̂ at ``lo``/``hi`` means the bound."""
  f = lambda g: l1(equilibrium(q_E, g, sigma=sigma, phi=phi, iters=iters), L_E)  # noqa: E731
  return _grid_then_golden(f, jnp.linspace(lo, hi, n_grid, dtype=jnp.float32))


def fit_gamma_ols(q_E, L_E, *, sigma: float = 1.0):
  """Closed-form γ̂ [reconstructed estimator (b)]: the OLS slope across experts of the linear-congestion
  equilibrium condition q_e − σ·log L_e = γ·L_e + c, i.e. Cov_e(q − σ log L, L) / Var_e(L) (loads floored at
  LOAD_EPS; NaN when all loads are equal)."""
  y = q_E - sigma * jnp.log(jnp.maximum(L_E, LOAD_EPS))
  x = L_E - jnp.mean(L_E)
  return jnp.sum(x * (y - jnp.mean(y))) / jnp.sum(x * x)


@functools.partial(jax.jit, static_argnames=("lo", "hi", "n_grid"))
def fit_temperature(q_E, L_E, *, lo: float = 0.02, hi: float = 200.0, n_grid: int = 120):
  """The softmax-temperature baseline: τ̂ = argmin_τ Σ_e |softmax(q/τ)_e − L_e| (grid in log τ + golden)."""
  f = lambda lt: l1(jax.nn.softmax(q_E / jnp.exp(lt)), L_E)  # noqa: E731
  return jnp.exp(_grid_then_golden(f, jnp.linspace(math.log(lo), math.log(hi), n_grid, dtype=jnp.float32)))


@functools.partial(jax.jit, static_argnames=("sigma", "phi", "lo", "hi", "n_grid", "iters"))
def fit_gamma_multitype(q_ME, w_M, L_E, *, sigma: float = 1.0, phi: str = "linear", lo: float = 0.0,
                        hi: float = 200.0, n_grid: int = 103, iters: int = 800):
  """γ̂ of the multi-type equilibrium by the L1 fit (as :func:`fit_gamma_l1`)."""
  f = lambda g: l1(multitype_equilibrium(q_ME, w_M, g, sigma=sigma, phi=phi, iters=iters), L_E)  # noqa: E731
  return _grid_then_golden(f, jnp.linspace(lo, hi, n_grid, dtype=jnp.float32))


def gamma_explicit(lb_coef: float, n_experts: int, top_k: int, norm: str = "assign_frac") -> float:
  """The explicit congestion price of the Switch loss α·E·Σ_e f_e P_e [reconstructed]: its gradient w.r.t. a
  token's p_{t,e} is α·E·f_e, linear in load, so γ_explicit = α·E when f are shares of assignments
  (``assign_frac``, f summing to 1) and α·E·K when f counts assignments per token (``assign_per_token``, summing
  to K); ``first_choice_frac``: α·E (top-1 shares)."""
  scale = {"assign_frac": 1.0, "first_choice_frac": 1.0, "assign_per_token": float(top_k)}[norm]
  return float(lb_coef) * n_experts * scale


# ------------------------------------------------------------------------------------------ token types


@functools.partial(jax.jit, static_argnames=("n_clusters", "iters"))
def kmeans(x_ND, n_clusters: int, key, *, iters: int = 30):
  """Lloyd's k-means in JAX: ``(centroids [M, D], assignment [N])``; initial centroids are M distinct points
  drawn by ``key``; an empty cluster keeps its centroid."""
  x = jnp.asarray(x_ND, jnp.float32)
  c0 = x[jax.random.choice(key, x.shape[0], (n_clusters,), replace=False)]

  def assign(c):
    d = jnp.sum(x * x, -1)[:, None] - 2 * x @ c.T + jnp.sum(c * c, -1)[None, :]
    return jnp.argmin(d, axis=-1)

  def body(_, c):
    a = assign(c)
    s = jnp.zeros_like(c).at[a].add(x)
    n = jnp.zeros((n_clusters,), jnp.float32).at[a].add(1.0)
    return jnp.where(n[:, None] > 0, s / jnp.maximum(n, 1.0)[:, None], c)

  c = jax.lax.fori_loop(0, iters, body, c0)
  return c, assign(c)


def nearest(x_ND, centroids_MD):
  """Index of the nearest centroid of each row [N]."""
  d = (jnp.sum(x_ND * x_ND, -1)[:, None] - 2 * x_ND @ centroids_MD.T + jnp.sum(centroids_MD ** 2, -1)[None, :])
  return jnp.argmin(d, axis=-1)


def type_qualities(logits_NE, types_N, n_types: int, mask_N):
  """Per-type mass w [M] and mean logit q [M, E] of the tokens with ``mask_N`` (an empty type gets the overall
  mean logit and zero mass)."""
  m = mask_N.astype(jnp.float32)
  s = jnp.zeros((n_types, logits_NE.shape[-1]), jnp.float32).at[types_N].add(logits_NE * m[:, None])
  c = jnp.zeros((n_types,), jnp.float32).at[types_N].add(m)
  overall = jnp.sum(logits_NE * m[:, None], 0) / jnp.maximum(jnp.sum(m), 1.0)
  q = jnp.where(c[:, None] > 0, s / jnp.maximum(c, 1.0)[:, None], overall[None, :])
  return c / jnp.maximum(jnp.sum(c), 1.0), q


# ------------------------------------------------------------------------------------------ scope, bootstrap


def scope_k_over_m(top_k: int, n_experts: int) -> float:
  """K/M [reconstructed reading]: top-K over the number of experts (0.125 for OLMoE's 8 of 64)."""
  return top_k / n_experts


def epsilon_l(l1_model, l1_uniform):
  """ε_l [reconstructed reading]: the layer's relative held-out misfit of the equilibrium, its held-out L1 over
  the L1 of the uniform prediction 1/E (0 = perfect, 1 = no better than uniform)."""
  return l1_model / jnp.maximum(l1_uniform, 1e-12)


@functools.partial(jax.jit, static_argnames=("n_boot", "level"))
def bootstrap_ci(values_B, key, *, n_boot: int = 1000, level: float = 0.95):
  """Percentile bootstrap of the mean of per-batch values [the abstract: "bootstrap resampling over 50
  independent text batches"]: ``(mean, lo, hi)``. Batches are resampled with replacement ``n_boot`` times;
  non-finite values are left out (a batch whose fit failed)."""
  v = jnp.asarray(values_B, jnp.float32)
  ok = jnp.isfinite(v)
  n = v.shape[0]
  idx = jax.random.randint(key, (n_boot, n), 0, n)
  vs, oks = jnp.where(ok, v, 0.0)[idx], ok[idx].astype(jnp.float32)
  means = jnp.sum(vs, -1) / jnp.maximum(jnp.sum(oks, -1), 1.0)
  a = (1.0 - level) / 2.0
  mean = jnp.sum(jnp.where(ok, v, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
  return mean, jnp.quantile(means, a), jnp.quantile(means, 1.0 - a)


def pearson(a, b) -> float:
  """Pearson r of two finite 1-D numpy sequences (NaN when either is constant or shorter than 3)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  ok = np.isfinite(a) & np.isfinite(b)
  a, b = a[ok], b[ok]
  if len(a) < 3 or a.std() == 0 or b.std() == 0:
    return float("nan")
  return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------------------------------ phases (numpy)

PHASES = ("surge", "stabilisation", "relaxation")


def annotate_phases(steps, gamma, lo, hi) -> dict:
  """Phase labels of a γ_eff trajectory over checkpoints by a stated rule [reconstructed; the paper's rule is
  unknown]. With p = argmax γ (the peak) and [lo, hi] the bootstrap CIs:

  * surge: checkpoints 0..p, when the peak is significantly above the first checkpoint (lo_p > hi_0);
  * relaxation: from the first checkpoint r > p after which every checkpoint is significantly below the peak
    (hi_i < lo_p for all i ≥ r), through the end;
  * stabilisation: the checkpoints strictly between p and r (or after p through the end when there is no r).

  Without a significant surge every checkpoint before the peak is labelled ``none``. Returns
  ``{"labels": [...], "peak_step", "shows": {phase: bool}, "all_three": bool}``.
  """
  g, lo, hi = (np.asarray(x, float) for x in (gamma, lo, hi))
  n = len(g)
  labels = ["none"] * n
  if n == 0 or not np.isfinite(g).any():
    return {"labels": labels, "peak_step": None, "shows": {k: False for k in PHASES}, "all_three": False}
  p = int(np.nanargmax(g))
  surge = p > 0 and lo[p] > hi[0]
  for i in range(p + 1):
    labels[i] = "surge" if surge else "none"
  r = None
  for i in range(p + 1, n):
    if all(hi[j] < lo[p] for j in range(i, n)):
      r = i
      break
  for i in range(p + 1, n):
    labels[i] = "relaxation" if (r is not None and i >= r) else "stabilisation"
  shows = {k: k in labels for k in PHASES}
  return {"labels": labels, "peak_step": int(steps[p]), "shows": shows, "all_three": all(shows.values())}
