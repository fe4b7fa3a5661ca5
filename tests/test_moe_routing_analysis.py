"""moe_routing (routing-phase analysis): estimators against hand-computed numbers and independent references,
γ recovery on synthetic routing from a known γ, bootstrap coverage, the .npz reader's rejections, the lmx
routing forward against the model's own records, and the analyze / smoke variants through launch/run.py (the smoke
run's stages and a SIGTERM resume)."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.methods.moe_routing import analysis
from lmx.methods.moe_routing import estimators as est
from lmx.methods.moe_routing import driver as run_lib
from lmx.methods.moe_routing import records as rec_lib
from tests import config_check, resume_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant=None):
  spec = importlib.util.spec_from_file_location("moe_routing_config", os.path.join(ROOT, "configs",
                                                                                 "moe_routing.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


# ------------------------------------------------------------------------------------------ loads, balance


def test_loads_and_balance_on_a_hand_made_routing():
  experts = jnp.array([[0, 1], [0, 2], [1, 0], [3, 0]])  # counts [4, 2, 1, 1] of 8 choices
  L = est.expert_loads(experts, 4)
  np.testing.assert_allclose(L, [0.5, 0.25, 0.125, 0.125])
  s = jax.device_get(est.balance_stats(L))
  np.testing.assert_allclose(s["cv"], np.sqrt(1.5) / 2, rtol=1e-6)  # counts: mean 2, population std sqrt(6/4)
  np.testing.assert_allclose(s["max_over_mean"], 2.0)
  np.testing.assert_allclose(s["maxvio"], 1.0)
  h = -(0.5 * np.log(0.5) + 0.25 * np.log(0.25) + 2 * 0.125 * np.log(0.125)) / np.log(4)
  np.testing.assert_allclose(s["entropy"], h, rtol=1e-6)  # = 0.875
  np.testing.assert_allclose(s["gini"], 20 / 64, rtol=1e-6)  # Σ_ij |x_i - x_j| = 20 over 2·n²·mean = 64
  assert s["dead"] == 0
  L5 = est.expert_loads(experts, 5)
  assert float(est.balance_stats(L5)["dead"]) == 1
  np.testing.assert_allclose(est.b0(L5), 0.5 / 0.2)
  # kept-weighted loads drop the dropped choices
  kept = jnp.array([[1, 1], [1, 0], [1, 1], [1, 1]], bool)
  np.testing.assert_allclose(est.expert_loads(experts, 4, kept), [4 / 7, 2 / 7, 0, 1 / 7], rtol=1e-6)  # token 1 loses e2
  # per-batch loads: two batches of two tokens
  LB = est.batch_loads(experts, jnp.array([0, 0, 1, 1]), 2, 4)
  np.testing.assert_allclose(LB, [[0.5, 0.25, 0.25, 0], [0.5, 0.25, 0, 0.25]])


def test_quality_scores_by_hand():
  z = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [4.0, 0.0, 0.0]])
  experts = jnp.array([[0], [1], [0]])
  gates = jnp.array([[0.6], [0.5], [0.9]])
  q = jax.device_get(est.quality_scores(z, experts, gates, jnp.array([0, 0, 1]), 2))
  np.testing.assert_allclose(q["logit"], [[1.0, 0.5, -0.5], [4.0, 0.0, 0.0]])
  p = np.exp(np.asarray(z)) / np.exp(np.asarray(z)).sum(-1, keepdims=True)
  np.testing.assert_allclose(q["prob"][0], np.log(p[:2].mean(0)), rtol=1e-5)
  np.testing.assert_allclose(q["gate"][0], [np.log(0.6), np.log(0.5), np.log(est.LOAD_EPS)], rtol=1e-5)
  np.testing.assert_allclose(q["gate"][1, 0], np.log(0.9), rtol=1e-5)
  assert np.isnan(q["contrib"]).all()


def test_gamma_explicit_by_hand():
  assert est.gamma_explicit(0.01, 64, 8, "assign_frac") == pytest.approx(0.64)
  assert est.gamma_explicit(0.01, 64, 8, "assign_per_token") == pytest.approx(5.12)
  assert est.scope_k_over_m(8, 64) == 0.125


# ------------------------------------------------------------------------------------------ the equilibrium


@pytest.mark.parametrize("gamma,sigma", [(0.0, 1.0), (3.0, 1.0), (40.0, 1.0), (7.5, 0.5)])
def test_log_congestion_equilibrium_is_the_closed_form_softmax(gamma, sigma):
  q = jax.random.normal(jax.random.key(1), (16,)) * 2.0
  rho = est.equilibrium(q, gamma, sigma=sigma, phi="log")
  ref = np.exp(np.asarray(q, np.float64) / (sigma + gamma))
  np.testing.assert_allclose(rho, ref / ref.sum(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(est.equilibrium_log_closed_form(q, gamma, sigma=sigma), ref / ref.sum(), rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 5.0, 30.0, 150.0])
def test_linear_equilibrium_is_a_fixed_point(gamma):
  q = np.asarray(jax.random.normal(jax.random.key(2), (8,)) * 1.5, np.float64)
  rho = np.asarray(est.equilibrium(q, gamma, phi="linear"), np.float64)
  ref = np.exp(q - gamma * rho)
  np.testing.assert_allclose(rho, ref / ref.sum(), atol=2e-5)  # ρ = softmax(q − γρ), checked in float64
  # multi-type with one type is the single-type equilibrium
  np.testing.assert_allclose(est.multitype_equilibrium(q[None], np.ones(1), gamma), rho, atol=2e-5)


def _sampled_loads(rho, n, seed):
  return np.random.default_rng(seed).multinomial(n, np.asarray(rho, np.float64)) / n


@pytest.mark.parametrize("gamma_true", [5.0, 20.0, 40.0])
def test_fits_recover_a_known_gamma_within_5_percent(gamma_true):
  q = jax.random.normal(jax.random.key(3), (8,)) * 1.5
  L = _sampled_loads(est.equilibrium(q, gamma_true), 2_000_000, int(gamma_true))
  g_l1 = float(est.fit_gamma_l1(q, jnp.asarray(L, jnp.float32)))
  g_ols = float(est.fit_gamma_ols(q, jnp.asarray(L, jnp.float32)))
  assert abs(g_l1 - gamma_true) < 0.05 * gamma_true, g_l1
  assert abs(g_ols - gamma_true) < 0.05 * gamma_true, g_ols


def test_temperature_fit_recovers_tau_and_log_game_temperature_is_sigma_plus_gamma():
  q = jax.random.normal(jax.random.key(4), (8,)) * 2.0
  L = jax.nn.softmax(q / 2.7)
  assert float(est.fit_temperature(q, L)) == pytest.approx(2.7, rel=1e-3)
  L = est.equilibrium(q, 9.0, phi="log")
  assert float(est.fit_temperature(q, L)) == pytest.approx(10.0, rel=1e-3)


def _synthetic_record(gamma, *, n_batches=40, per_batch=2000, e=8, seed=0, step=0, layer=0):
  """Top-1 routing whose expert shares follow the linear-congestion equilibrium of quality q and γ; logits are
  q plus zero-mean noise (so the mean-logit estimator sees q)."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=e) * 1.5
  rho = np.asarray(est.equilibrium(q, gamma), np.float64)
  n = n_batches * per_batch
  experts = rng.choice(e, size=(n, 1), p=rho / rho.sum())
  noise = rng.normal(size=(n, e))
  logits = (q + noise - noise.mean(0)).astype(np.float32)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return rec_lib.RoutingRecord(
      router_logits=logits, experts=experts.astype(np.int32),
      gates=np.take_along_axis(p, experts, -1).astype(np.float32), kept=np.ones((n, 1), bool),
      token_ids=rng.integers(0, 256, n).astype(np.int32), positions=np.tile(np.arange(per_batch), n_batches),
      batch=np.repeat(np.arange(n_batches), per_batch).astype(np.int32), step=step, layer=layer)


# One record shape and analysis setting for the in-process analyses below, so that they share one compile.
SYN = dict(n_batches=20, per_batch=4000)
AN = dict(n_boot=200)


def test_analysis_recovers_gamma_from_synthetic_records():
  out = analysis.analyse_record(_synthetic_record(20.0, **SYN), **AN)
  assert abs(out["gamma_eff"]["pooled"] - 20.0) < 1.0, out["gamma_eff"]
  assert abs(out["gamma_ols"]["pooled"] - 20.0) < 1.0, out["gamma_ols"]
  assert out["gamma_eff"]["lo"] <= out["gamma_eff"]["mean"] <= out["gamma_eff"]["hi"]
  ho = out["heldout_l1"]
  assert ho["mfg"] < ho["uniform"] and ho["mfg"] < 0.05, ho  # the true model predicts the held-out loads
  assert out["scope"]["k_over_m"] == 1 / 8


def test_analyze_variant_in_process(tmp_path):
  d = tmp_path / "routing"
  for step, gamma in ((10, 10.0), (20, 20.0), (30, 30.0)):
    rec_lib.write_record(rec_lib.record_path(str(d / "toy"), step, 0),
                         _synthetic_record(gamma, **SYN, step=step, seed=step))
  c = _config("analyze")
  c.routing_dir, c.analysis.n_boot = str(d), AN["n_boot"]
  res = run_lib.run(c, str(tmp_path / "wd"))
  traj = res["runs"]["toy"]["layers"]["0"]
  assert traj["steps"] == [10, 20, 30]
  np.testing.assert_allclose(traj["gamma_eff"], [10, 20, 30], rtol=0.1)  # per-batch means, 4000 tokens each
  assert json.load(open(tmp_path / "wd" / "results.json"))["summary"]["heldout_l1"]["paper"]["mfg"] == 0.199
  assert os.path.exists(tmp_path / "wd" / "plots" / "gamma_eff_layer0.png")
  bad = tmp_path / "bad" / "step_1"
  bad.mkdir(parents=True)
  np.savez(bad / "layer_0.npz", router_logits=np.zeros((3, 4), np.float32))
  c.routing_dir = str(tmp_path / "bad")
  with pytest.raises(rec_lib.RoutingFileError, match="layer_0.npz: missing key"):
    run_lib.run(c, str(tmp_path / "wd2"))


# ------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_covers_the_true_mean_about_95_percent():
  reps, n = 400, 50
  draws = jax.random.exponential(jax.random.key(5), (reps, n)) * 2.0 + 1.0  # skewed, true mean 3
  keys = jax.random.split(jax.random.key(6), reps)
  _, lo, hi = jax.jit(jax.vmap(lambda v, k: est.bootstrap_ci(v, k, n_boot=1000)))(draws, keys)
  coverage = float(jnp.mean((lo <= 3.0) & (3.0 <= hi)))
  assert 0.90 <= coverage <= 0.98, coverage  # percentile bootstrap at n = 50: a little under 95 %
  m, lo1, hi1 = est.bootstrap_ci(jnp.array([1.0, 2.0, jnp.nan, 3.0]), jax.random.key(0), n_boot=500)
  assert float(m) == pytest.approx(2.0) and 1.0 <= float(lo1) <= 2.0 <= float(hi1) <= 3.0  # NaN left out


# ------------------------------------------------------------------------------------------ token types


def test_kmeans_recovers_separated_clusters():
  centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 300)
  x = centers[labels] + rng.normal(size=(300, 2)) * 0.3
  cents, assign = est.kmeans(jnp.asarray(x), 3, jax.random.key(2))
  assign = np.asarray(assign)
  for c in range(3):  # each true cluster maps to one found cluster, and vice versa
    assert len(set(assign[labels == c])) == 1
  assert len(set(assign)) == 3


def test_multitype_fits_two_type_loads_better_than_single_type():
  q = np.array([[3.0, 0.0, 0.0, -1.0], [-1.0, 0.0, 0.0, 3.0]])
  w = np.array([0.5, 0.5])
  L = est.multitype_equilibrium(q, w, 4.0)
  g = float(est.fit_gamma_multitype(q, w, L))
  assert g == pytest.approx(4.0, rel=0.02)
  q_single = jnp.asarray(w @ q)
  g1 = est.fit_gamma_l1(q_single, L)
  assert float(est.l1(est.equilibrium(q_single, g1), L)) > 10 * float(est.l1(est.multitype_equilibrium(q, w, g), L))


# ------------------------------------------------------------------------------------------ phases


def test_phase_annotation_rule():
  steps = list(range(8))
  g = [10, 20, 30, 31, 30, 20, 12, 11]
  lo = [x - 1 for x in g]
  hi = [x + 1 for x in g]
  ph = est.annotate_phases(steps, g, lo, hi)
  assert ph["labels"] == ["surge"] * 4 + ["stabilisation"] + ["relaxation"] * 3
  assert ph["all_three"] and ph["peak_step"] == 3
  flat = est.annotate_phases(steps, [10] * 8, [5] * 8, [15] * 8)  # no significant rise: no surge
  assert not flat["shows"]["surge"] and not flat["all_three"]


# ------------------------------------------------------------------------------------------ the .npz reader


def test_npz_round_trip_and_directory_scan(tmp_path):
  r = _synthetic_record(5.0, n_batches=3, per_batch=10, step=7, layer=2)
  path = rec_lib.write_record(rec_lib.record_path(str(tmp_path / "runA"), 7, 2), r)
  back = rec_lib.read_record(path)
  np.testing.assert_array_equal(back.router_logits, r.router_logits)
  assert back.step == 7 and back.layer == 2 and back.contrib is None and back.n_batches == 3
  assert rec_lib.find_runs(str(tmp_path)) == {"runA": {7: {2: path}}}
  assert rec_lib.find_runs(str(tmp_path / "runA")) == {"runA": {7: {2: path}}}
  with pytest.raises(FileNotFoundError, match="holds no step_"):
    rec_lib.find_runs(str(tmp_path / "runA" / "step_7"))


def _bad(tmp_path, name, **changes):
  r = _synthetic_record(5.0, n_batches=2, per_batch=6)
  arrays = {k: np.asarray(getattr(r, k)) for k in rec_lib.REQUIRED}
  arrays.update(changes)
  for k in [k for k, v in changes.items() if v is None]:
    del arrays[k]
  path = str(tmp_path / f"{name}.npz")
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("name,changes,message", [
    ("missing", dict(gates=None), r"missing key\(s\) \['gates'\]"),
    ("shape", dict(router_logits=np.zeros((12, 8, 1), np.float32)), "router_logits must be \\[N, E\\]"),
    ("gates_shape", dict(gates=np.zeros((12, 2), np.float32)), "gates must be \\[N, K\\]"),
    ("tokens_shape", dict(token_ids=np.zeros(11, np.int32)), "token_ids must be \\[N\\]"),
    ("nan", dict(router_logits=np.full((12, 8), np.nan, np.float32)), "router_logits has 96 NaN/Inf"),
    ("range", dict(experts=np.full((12, 1), 8, np.int32)), r"experts has ids out of range \[0, 8\)"),
    ("negative", dict(experts=np.full((12, 1), -1, np.int32)), "out of range"),
    ("float_ids", dict(experts=np.zeros((12, 1), np.float32)), "experts must be integers"),
    ("kept_dtype", dict(kept=np.ones((12, 1), np.int32)), "kept must be bool"),
    ("step", dict(step=np.zeros(2, np.int64)), "step must be an integer scalar"),
])
def test_npz_reader_rejects_malformed_files_naming_file_and_problem(tmp_path, name, changes, message):
  path = _bad(tmp_path, name, **changes)
  with pytest.raises(rec_lib.RoutingFileError, match=message) as e:
    rec_lib.read_record(path)
  assert str(e.value).startswith(path)


def test_bad_values_name_their_row_batch_and_position(tmp_path):
  """A bad value names the file, the key, how many rows have the problem and the first one (its index in the file,
  its batch and position, its values): enough to find the token in a file of a million rows."""
  r = _synthetic_record(5.0, n_batches=2, per_batch=6)  # rows 0-5: batch 0, rows 6-11: batch 1; positions 0..5
  logits = r.router_logits.copy()
  logits[9, 3] = np.nan
  logits[10, 0] = np.inf
  ex = r.experts.copy()
  ex[7, 0] = 8
  gates = r.gates.copy()
  gates[4, 0] = -0.25
  top2 = np.stack([r.experts[:, 0], (r.experts[:, 0] + 1) % 8], 1).astype(np.int32)
  top2[8] = [5, 5]
  two = dict(experts=top2, gates=np.full((12, 2), 0.5, np.float32), kept=np.ones((12, 2), bool))
  pos = np.asarray(r.positions).copy()
  pos[11] = -1
  cases = [(dict(router_logits=logits), r"router_logits has 2 NaN/Inf value\(s\); 2 of 12 rows, the first row 9 "
                                        r"\(batch 1, position 3\): \[.*nan.*\]"),
           (dict(experts=ex), r"experts has ids out of range \[0, 8\): min \d, max 8; 1 of 12 rows, the first row 7 "
                              r"\(batch 1, position 1\): \[8\]"),
           (dict(gates=gates), r"gates must be >= 0, got min -0.25; 1 of 12 rows, the first row 4 \(batch 0, "
                               r"position 4\): \[-0.25\]"),
           (two, r"experts repeats an expert within a token's top-K; 1 of 12 rows, the first row 8 \(batch 1, "
                 r"position 2\): \[5, 5\]"),
           (dict(positions=pos), r"positions must be >= 0, got min -1; 1 of 12 rows, the first row 11 \(batch 1, "
                                 r"position -1\)")]
  for i, (changes, message) in enumerate(cases):
    path = _bad(tmp_path, f"bad{i}", **changes)
    with pytest.raises(rec_lib.RoutingFileError) as e:
      rec_lib.read_record(path)
    assert str(e.value).startswith(f"{path}: ") and re.search(message, str(e.value)), str(e.value)


def test_npz_reader_rejects_a_file_that_is_not_npz(tmp_path):
  path = tmp_path / "layer_0.npz"
  path.write_text("not a zip")
  with pytest.raises(rec_lib.RoutingFileError, match="not a readable .npz"):
    rec_lib.read_record(str(path))


# ------------------------------------------------------------------------------------------ lmx collection


def test_routing_forward_matches_the_models_own_routing_records():
  from lmx.models.registry import build_model

  # block 0 dense, block 1 MoE (moe_every=2): the router input of block 1 depends on the re-run of block 0
  m = build_model(dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16,
                       moe_every=2, n_experts=4, top_k=2, moe_d_ff=16, init_std=0.2))
  params = m.init(jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 32)
  _, aux = jax.jit(lambda p, t: m.apply(p, t, return_aux=True, return_routing=True))(params, tokens)
  fwd = jax.jit(rec_lib.routing_forward(m))
  mine = fwd(params, tokens)
  assert sorted(mine) == [1]
  for i in (1,):
    ref = aux["routing"][f"layer{i}"]
    np.testing.assert_allclose(mine[i]["router_logits"], ref["router_logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mine[i]["experts"], ref["experts"])
    np.testing.assert_allclose(mine[i]["gates"], ref["gates"], rtol=1e-5, atol=1e-6)
    assert mine[i]["contrib"].shape == (3, 10, 2) and np.all(np.asarray(mine[i]["contrib"]) >= 0)
  recs = rec_lib.collect_params(m, params, np.asarray(tokens).reshape(3, 1, 10), step=5, forward=fwd)
  assert sorted(recs) == [1] and recs[1].n_batches == 3 and recs[1].router_logits.shape == (30, 4)
  rec_lib.check_record(recs[1])


def test_hf_exporter_on_a_tiny_random_mixtral(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  spec = importlib.util.spec_from_file_location("export_hf_routing", os.path.join(ROOT, "tools",
                                                                                 "export_hf_routing.py"))
  exporter = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exporter)
  torch.manual_seed(0)
  cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                   num_experts_per_tok=2, max_position_embeddings=64)
  model = transformers.MixtralForCausalLM(cfg).eval()
  batches = np.random.default_rng(0).integers(0, 64, (3, 2, 8))
  # Independent reference: each router module's own output, captured by forward hooks. Older transformers
  # route with an nn.Linear (output: the logits); 5.x with MixtralTopKRouter (output: logits, top-k scores,
  # top-k indices), whose choices and renormalised gates the exported records must then equal as well.
  seen = []

  def capture(mod, inp, out):
    parts = out if isinstance(out, (tuple, list)) else (out,)
    seen.append([x.detach().float().numpy() for x in parts])

  hooks = [mod.register_forward_hook(capture) for name, mod in model.named_modules() if name.endswith("mlp.gate")
           or name.endswith("block_sparse_moe.gate")]
  assert len(hooks) == 2, [n for n, _ in model.named_modules()]
  paths = exporter.export(model, batches, str(tmp_path / "mixtral"), step=3)
  for h in hooks:
    h.remove()
  assert len(paths) == 2 and len(seen) == 2 * 3  # 2 layers x 3 batches, in forward order
  for layer, path in enumerate(paths):
    rec = rec_lib.read_record(path)
    assert rec.router_logits.shape == (3 * 2 * 8, 4) and rec.top_k == 2 and rec.n_batches == 3
    np.testing.assert_array_equal(rec.token_ids, batches.reshape(-1))
    np.testing.assert_array_equal(rec.experts, np.argsort(-rec.router_logits, -1, kind="stable")[:, :2])
    np.testing.assert_allclose(rec.gates.sum(-1), 1.0, rtol=1e-5)  # Mixtral renormalises the top-2
    mine = [seen[layer + 2 * b] for b in range(3)]
    np.testing.assert_allclose(rec.router_logits, np.concatenate([m[0].reshape(-1, 4) for m in mine]),
                               rtol=1e-5, atol=1e-6)
    if len(mine[0]) == 3:  # the router's own top-k choice and gates
      hf_idx = np.concatenate([m[2].reshape(-1, 2) for m in mine]).astype(np.int64)
      hf_gate = np.concatenate([m[1].reshape(-1, 2) for m in mine])
      np.testing.assert_array_equal(np.sort(rec.experts, -1), np.sort(hf_idx, -1))
      order_mine, order_hf = np.argsort(rec.experts, -1), np.argsort(hf_idx, -1)
      np.testing.assert_allclose(np.take_along_axis(rec.gates, order_mine, -1),
                                 np.take_along_axis(hf_gate, order_hf, -1), rtol=1e-5, atol=1e-6)
  out = analysis.analyse_record(rec_lib.read_record(paths[0]), n_boot=50)
  assert np.isfinite(out["gamma_eff"]["pooled"])


# ------------------------------------------------------------------------------------------ configs, launch


def test_configs_validate(tmp_path):
  for v in (None, "smoke"):
    run_lib.validate(_config(v))
  c = _config("analyze")
  with pytest.raises(Exception, match="needs --config.routing_dir"):
    run_lib.validate(c)
  c.routing_dir = str(tmp_path)
  run_lib.validate(c)
  c = _config("smoke")
  c.routing.ckpt_steps = (10, 5)
  with pytest.raises(Exception, match="routing.ckpt_steps"):
    run_lib.validate(c)



def test_schema_errors_name_the_field_and_safe_fields():
  """A typo'd field, an out-of-range value and an unknown choice each give a one-line ConfigError naming the
  field (also in the blocks taken from configs/lm.py); a resume may change the logging and evaluation cadence,
  plotting, the mesh and the model's numerics-neutral implementation choices."""
  from lmx.core import schema
  from lmx.core.config import ConfigError

  for field, value, match in [
      ("analysis.n_boots", 10, r"analysis: unknown field\(s\) \['n_boots'\]"),
      ("analysis.sigma", 0.0, r"analysis.sigma: must be > 0, got 0.0"),
      ("analysis.phi", "quadratic", "analysis.phi: 'quadratic' is not one of"),
      ("routing.n_batches", 1, r"routing.n_batches: must be a whole number and >= 2, got 1"),
      ("sweep.lb_loss_coef", (0.0, -0.1), r"sweep.lb_loss_coef\[1\]: must be >= 0"),
      ("data.seq_len", 0, r"data.seq_len: must be a whole number and >= 1, got 0"),
      ("train.ckpt_evry", 5, r"train: unknown field\(s\) \['ckpt_evry'\]"),
      ("optim.name", "lion", "optim.name: 'lion' is not one of"),
  ]:
    config_check.refuses(run_lib.validate, _config("smoke"), field, value, match)
  c = _config("smoke")
  c.sweep.lb_loss_coef = (0.1, 0.1)
  with pytest.raises(ConfigError, match="sweep.lb_loss_coef: must be distinct"):
    run_lib.validate(c)
  assert set(schema.safe_fields("moe_routing")) == {
      "train.log_every", "train.eval_every", "train.eval_batches", "train.plot", "mesh.data", "mesh.fsdp",
      "mesh.model", "mesh.expert", "axis_rules", "model.attention_impl", "model.remat", "model.moe_impl"}


def test_config_choices_match_the_code():
  """The config file imports no method code, so it states the congestion functions again."""
  spec = importlib.util.spec_from_file_location("moe_routing_cfg", os.path.join(ROOT, "configs", "moe_routing.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.PHIS == est.PHIS

def _launch(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "run.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_analyze_variant_through_launch(tmp_path):
  d = tmp_path / "routing"
  for step in (10, 20):
    rec_lib.write_record(rec_lib.record_path(str(d / "toy"), step, 0),
                         _synthetic_record(5.0 + step, n_batches=4, per_batch=500, step=step))
  wd = tmp_path / "wd"
  r = _launch(["--config=configs/moe_routing.py:analyze", f"--config.routing_dir={d}", f"--workdir={wd}",
               "--config.analysis.n_boot=100"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.load(open(wd / "results.json"))["runs"]["toy"]["layers"]["0"]["steps"] == [10, 20]
  bad = tmp_path / "bad" / "step_1"
  bad.mkdir(parents=True)
  np.savez(bad / "layer_0.npz", router_logits=np.zeros((3, 4), np.float32))
  r = _launch(["--config=configs/moe_routing.py:analyze", f"--config.routing_dir={tmp_path / 'bad'}",
               f"--workdir={tmp_path / 'wd2'}"], tmp_path)
  assert r.returncode == 2 and "layer_0.npz: missing key(s)" in r.stderr, r.stderr[-2000:]


CONFIG = "configs/moe_routing.py:smoke"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run of the smoke config through launch/run.py, shared by the tests below."""
  return resume_check.reference_run(tmp_path_factory, "moe", CONFIG)[0]


def test_smoke_stages_and_results(reference):  # the CI's run of the smoke config
  resume_check.check_layout(reference)
  res = json.load(open(reference / "results.json"))
  coefs = _config("smoke").sweep.lb_loss_coef
  assert set(res["runs"]) == {run_lib.arm_name(w) for w in coefs}
  for name, run in res["runs"].items():
    assert run["layers"]["0"]["steps"] == list(_config("smoke").routing.ckpt_steps), name
    for stage in (name, f"routing/{name}"):
      assert json.load(open(reference / "stages" / stage / "stage.json"))["status"] == "finished", stage
  assert os.path.exists(reference / "plots" / "gamma_eff_layer0.png")


def test_sigterm_after_the_first_arm_resumes_to_the_same_results(tmp_path, reference):
  # the first checkpoint save is the first arm's last step: the run stops before that arm's routing records
  resume_check.check_sigterm_resume(tmp_path, CONFIG, reference=reference)


@pytest.mark.slow
def test_olmoe_variant_train_step_and_routing_forward_lower_for_cuda(tmp_path):
  from lmx.core import loop
  from lmx.core import mesh as mesh_lib

  c = _config("olmoe")
  c.model.attention_impl = "xla"  # 'auto' picks cuDNN on cuda, which cannot be traced on a CPU host
  run_lib.validate(c)
  arm = run_lib.arm_config(c, c.sweep.lb_loss_coef[0])
  model = run_lib.lm_run.validate(arm)
  assert (model.cfg.n_experts, model.cfg.top_k, len(model.cfg.moe_layers)) == (64, 8, 16)
  mesh = mesh_lib.make_mesh(arm.mesh)
  step_fn, init_fn, shardings = run_lib.lm_run.make_step(arm, model, mesh)
  lp = loop.Loop(step_fn=step_fn, init_fn=init_fn, mesh=mesh, workdir=str(tmp_path), total_steps=arm.train.steps,
                 seed=0, state_shardings=shardings, ckpt_every=0)
  bsh = mesh_lib.batch_sharding(mesh, arm.axis_rules)
  tokens = jax.ShapeDtypeStruct((arm.data.global_batch, arm.data.seq_len + 1), jnp.int32, sharding=bsh)
  with jax.set_mesh(mesh):
    text = lp.lower(lp.abstract_state(), tokens, lowering_platforms=("cuda",)).as_text()
  assert "stablehlo" in text or "func.func" in text
  params = jax.eval_shape(model.init, jax.random.key(0))
  batch = jax.ShapeDtypeStruct((c.routing.batch_windows, c.data.seq_len), jnp.int32)
  fwd_text = jax.jit(rec_lib.routing_forward(model)).trace(params, batch).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "func.func" in fwd_text
