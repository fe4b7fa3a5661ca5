"""One layer's routing at one checkpoint → γ_eff (with bootstrap CIs), balance, held-out L1s, multi-type gain.

:func:`analyse_record` is the per-(checkpoint, layer) unit; :func:`analyse_run` maps it over a run's routing
files and annotates the phases per layer. The jitted core (:func:`_core`) has static shapes, so one compile
serves every checkpoint and layer of a run.

Fit / held-out split: the even batches fit (γ̂, τ̂, the k-means types), the odd batches are held out; a
held-out L1 compares the prediction from the held-out batches' pooled qualities with their pooled loads.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmx.methods.moe_routing import estimators as est
from lmx.methods.moe_routing.records import RoutingRecord


@functools.partial(jax.jit, static_argnames=("n_batches", "n_experts", "n_types", "sigma", "phi", "gamma_lo",
                                             "gamma_hi", "iters", "n_boot", "has_contrib"))
def _core(logits_NE, experts_NK, gates_NK, kept_NK, contrib_NK, batch_N, fit_idx_F, key, *, n_batches, n_experts,
          n_types, sigma, phi, gamma_lo, gamma_hi, iters, n_boot, has_contrib):
  e = n_experts
  fit = functools.partial(est.fit_gamma_l1, sigma=sigma, phi=phi, lo=gamma_lo, hi=gamma_hi, iters=iters)
  L_BE = est.batch_loads(experts_NK, batch_N, n_batches, e)
  q = est.quality_scores(logits_NE, experts_NK, gates_NK, batch_N, n_batches,
                         contrib_NK if has_contrib else None)
  counts_B = jnp.zeros((n_batches,), jnp.float32).at[batch_N].add(1.0)
  w_B = counts_B / jnp.sum(counts_B)
  even = (jnp.arange(n_batches) % 2 == 0).astype(jnp.float32)

  def pooled(x_BE, mask_B):  # token-weighted mean over the chosen batches
    m = w_B * mask_B
    return jnp.einsum("b,be->e", m, x_BE) / jnp.sum(m)

  ones = jnp.ones((n_batches,), jnp.float32)
  L_all, L_fit, L_ho = pooled(L_BE, ones), pooled(L_BE, even), pooled(L_BE, 1 - even)
  # Pooled qualities: the logit means pool linearly; the log-mean estimators pool their means, then log.
  def pool_q(name, mask_B):
    if name == "logit":
      return pooled(q["logit"], mask_B)
    return jnp.log(jnp.maximum(pooled(jnp.exp(q[name]), mask_B), est.LOAD_EPS))

  names = est.QUALITY_ESTIMATORS if has_contrib else est.QUALITY_ESTIMATORS[:3]
  # One vmapped L1 fit over: the per-batch logit fits (bootstrap), every estimator pooled, the fit half.
  q_lanes = jnp.concatenate([q["logit"], jnp.stack([pool_q(n, ones) for n in names]), pool_q("logit", even)[None]])
  L_lanes = jnp.concatenate([L_BE, jnp.stack([L_all] * len(names)), L_fit[None]])
  g_lanes = jax.vmap(fit)(q_lanes, L_lanes)
  g_batch, g_pooled, g_fit = g_lanes[:n_batches], g_lanes[n_batches:n_batches + len(names)], g_lanes[-1]
  ols_batch = jax.vmap(functools.partial(est.fit_gamma_ols, sigma=sigma))(q["logit"], L_BE)
  ols_pooled = jnp.stack([est.fit_gamma_ols(pool_q(n, ones), L_all, sigma=sigma) for n in names])

  # Held-out L1: MFG (γ̂ from the fit half), fitted-temperature softmax, uniform.
  q_fit, q_ho = pool_q("logit", even), pool_q("logit", 1 - even)
  tau = est.fit_temperature(q_fit, L_fit)
  l1_mfg = est.l1(est.equilibrium(q_ho, g_fit, sigma=sigma, phi=phi, iters=iters), L_ho)
  l1_soft = est.l1(jax.nn.softmax(q_ho / tau), L_ho)
  l1_unif = est.l1(jnp.full((e,), 1.0 / e), L_ho)
  gamma_ols_fit = est.fit_gamma_ols(q_fit, L_fit, sigma=sigma)
  l1_ols = est.l1(est.equilibrium(q_ho, gamma_ols_fit, sigma=sigma, phi=phi, iters=iters), L_ho)

  # Multi-type: k-means on the tokens' log-softmax router vectors of the fit half; held-out tokens take the
  # nearest centroid; per type mass and mean logit; γ fitted on the fit half (L1), L1 on the held-out half.
  feats = jax.nn.log_softmax(logits_NE.astype(jnp.float32), axis=-1)
  fit_tok = (batch_N % 2 == 0)
  k_key, b_key = jax.random.split(key)
  cents, _ = est.kmeans(feats[fit_idx_F], n_types, k_key)  # the fit half's tokens only
  types = est.nearest(feats, cents)
  w_fit, qm_fit = est.type_qualities(logits_NE.astype(jnp.float32), types, n_types, fit_tok)
  w_ho, qm_ho = est.type_qualities(logits_NE.astype(jnp.float32), types, n_types, ~fit_tok)
  g_multi = est.fit_gamma_multitype(qm_fit, w_fit, L_fit, sigma=sigma, phi=phi, lo=gamma_lo, hi=gamma_hi,
                                    iters=iters)
  l1_multi = est.l1(est.multitype_equilibrium(qm_ho, w_ho, g_multi, sigma=sigma, phi=phi, iters=iters), L_ho)

  # Balance: the pooled loads' statistics; per-batch B_0 and CV for their CIs.
  bal = est.balance_stats(L_all)
  bal_B = jax.vmap(est.balance_stats)(L_BE)
  # One vmapped bootstrap (one compiled sort) for the four per-batch series: γ L1, γ OLS, B_0, CV.
  series = jnp.stack([g_batch, ols_batch, bal_B["max_over_mean"], bal_B["cv"]])
  cis = jnp.stack(jax.vmap(lambda v, k: est.bootstrap_ci(v, k, n_boot=n_boot))(
      series, jax.random.split(b_key, 4)), axis=-1)  # [4, (mean, lo, hi)]
  kept_frac = jnp.mean(kept_NK.astype(jnp.float32))
  return dict(
      loads=L_all, gamma_batch=g_batch, gamma_ci=cis[0], gamma_ols_ci=cis[1],
      gamma_pooled=g_pooled, gamma_ols_pooled=ols_pooled, b0_ci=cis[2], cv_ci=cis[3], balance=bal, gamma_fit_half=g_fit, gamma_ols_fit_half=gamma_ols_fit,
      tau=tau, l1_mfg=l1_mfg, l1_mfg_ols=l1_ols, l1_softmax=l1_soft, l1_uniform=l1_unif, gamma_multi=g_multi,
      l1_multi=l1_multi, dropped_frac=1.0 - kept_frac)


def analyse_record(rec: RoutingRecord, *, n_types: int = 4, sigma: float = 1.0, phi: str = "linear",
                   gamma_lo: float = 0.0, gamma_hi: float = 200.0, iters: int = 400, n_boot: int = 1000,
                   seed: int = 0) -> dict:
  """The estimates of one routing record (one layer at one checkpoint) as a JSON-able dict; see the module
  docstring. ``n_types`` token types for the multi-type extension."""
  if rec.n_batches < 2:
    raise ValueError(f"step {rec.step} layer {rec.layer}: need >= 2 batches (fit and held-out), got "
                     f"{rec.n_batches}")
  has_contrib = rec.contrib is not None
  contrib = rec.contrib if has_contrib else np.zeros(rec.gates.shape, np.float32)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), rec.step), rec.layer)
  out = jax.device_get(_core(
      jnp.asarray(rec.router_logits, jnp.float32), jnp.asarray(rec.experts, jnp.int32),
      jnp.asarray(rec.gates, jnp.float32), jnp.asarray(rec.kept), jnp.asarray(contrib, jnp.float32),
      jnp.asarray(rec.batch, jnp.int32), jnp.asarray(np.nonzero(rec.batch % 2 == 0)[0], jnp.int32), key,
      n_batches=rec.n_batches, n_experts=rec.n_experts, n_types=n_types,
      sigma=float(sigma), phi=phi, gamma_lo=float(gamma_lo), gamma_hi=float(gamma_hi), iters=int(iters),
      n_boot=int(n_boot), has_contrib=has_contrib))
  names = est.QUALITY_ESTIMATORS if has_contrib else est.QUALITY_ESTIMATORS[:3]
  f = lambda x: float(np.asarray(x))  # noqa: E731
  triple = lambda v: {"mean": f(v[0]), "lo": f(v[1]), "hi": f(v[2])}  # noqa: E731
  at_bound = lambda g: bool(abs(f(g) - gamma_lo) < 1e-3 or abs(f(g) - gamma_hi) < 1e-3)  # noqa: E731
  l1_single = f(out["l1_mfg"])
  return {
      "step": rec.step, "layer": rec.layer, "n_tokens": int(rec.router_logits.shape[0]),
      "n_batches": rec.n_batches, "n_experts": rec.n_experts, "top_k": rec.top_k,
      # γ_eff: L1 fit per batch (mean of the per-batch fits with its bootstrap CI) and pooled over all batches
      "gamma_eff": {**triple(out["gamma_ci"]), "pooled": f(out["gamma_pooled"][0]),
                    "pooled_at_bound": at_bound(out["gamma_pooled"][0])},
      "gamma_ols": {**triple(out["gamma_ols_ci"]), "pooled": f(out["gamma_ols_pooled"][0])},
      "gamma_by_quality": {n: {"l1": f(out["gamma_pooled"][i]), "ols": f(out["gamma_ols_pooled"][i])}
                           for i, n in enumerate(names)},
      "balance": {**{k: f(v) for k, v in out["balance"].items()}, "b0": f(out["balance"]["max_over_mean"]),
                  "b0_ci": triple(out["b0_ci"]), "cv_ci": triple(out["cv_ci"]),
                  "dropped_frac": f(out["dropped_frac"])},
      "loads": [f(x) for x in out["loads"]],
      "heldout_l1": {"mfg": l1_single, "mfg_ols_gamma": f(out["l1_mfg_ols"]), "softmax": f(out["l1_softmax"]),
                     "uniform": f(out["l1_uniform"]), "multitype": f(out["l1_multi"]),
                     "gamma_fit_half": f(out["gamma_fit_half"]), "tau_fit_half": f(out["tau"]),
                     "gamma_multitype": f(out["gamma_multi"])},
      # multi-type gain: relative held-out L1 improvement over the single-type equilibrium
      "multitype_gain": (1.0 - f(out["l1_multi"]) / l1_single) if l1_single > 0 else None,
      "scope": {"k_over_m": est.scope_k_over_m(rec.top_k, rec.n_experts),
                "epsilon_l": f(est.epsilon_l(out["l1_mfg"], out["l1_uniform"]))},
  }


def analyse_run(paths: dict[int, dict[int, str]], read, **kw) -> dict:
  """``{"checkpoints": [per-(step, layer) dicts], "layers": {layer: trajectory + phases + agreement}}`` for the
  routing files ``{step: {layer: path}}`` (read by ``read(path)``)."""
  rows = []
  for step, layers in paths.items():
    for layer, path in sorted(layers.items()):
      rows.append(analyse_record(read(path), **kw))
  layers = {}
  for layer in sorted({r["layer"] for r in rows}):
    rs = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["step"])
    steps = [r["step"] for r in rs]
    g = [r["gamma_eff"]["mean"] for r in rs]
    lo, hi = [r["gamma_eff"]["lo"] for r in rs], [r["gamma_eff"]["hi"] for r in rs]
    names = list(rs[0]["gamma_by_quality"])
    traj = {n: [r["gamma_by_quality"][n]["l1"] for r in rs] for n in names}
    agree = {f"{a}~{b}": est.pearson(traj[a], traj[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    layers[str(layer)] = {
        "steps": steps, "gamma_eff": g, "gamma_lo": lo, "gamma_hi": hi,
        "b0": [r["balance"]["b0"] for r in rs], "cv": [r["balance"]["cv"] for r in rs],
        "phases": est.annotate_phases(steps, g, lo, hi), "gamma_by_quality": traj,
        "quality_agreement_r": agree,
        "gamma_l1_vs_ols_r": est.pearson(g, [r["gamma_ols"]["mean"] for r in rs]),
    }
  return {"checkpoints": rows, "layers": layers}
