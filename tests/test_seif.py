"""SEIF: rewards on hand-made cases, the miniature's data pieces, the GRPO batch, the report, and the smoke config
end to end through ``run``."""
import importlib
import json
import os

import numpy as np
import pytest

from lmx.envs import instructions as I
from lmx.methods.seif import data as D
from lmx.methods.seif import report
from lmx.methods.seif.rewards import follower_reward, instructor_reward, parse_proposal
from tests import config_check

P = I.parse


# ------------------------------------------------------------------------------------------ rewards


def test_instructor_reward_hand_cases():
  cs = P("lower; incl sun; words<4; end bye")
  # the frozen Follower follows 2 of 4 (lowercase fails, 4 words is not < 4): reward 1 - 2/4
  assert instructor_reward(cs, "The sun says bye", use_filter=True) == pytest.approx(0.5)
  assert instructor_reward(cs, "sun bye", use_filter=True) == 0.0  # all followed: nothing to learn from
  assert instructor_reward(None, "anything") == 0.0  # unparsable
  assert instructor_reward(cs, "   ") == 0.0  # empty answer
  bad = P("lower; upper")
  assert instructor_reward(bad, "Mixed Case", use_filter=True) == 0.0  # the Filter rejects a contradiction
  # without the Filter the contradiction pays: "Mixed Case" follows neither -> 1 - 0
  assert instructor_reward(bad, "Mixed Case", use_filter=False) == 1.0
  assert instructor_reward(bad, "lower", use_filter=False) == 0.5
  # the length budget of the Filter
  assert instructor_reward(P("words>=30"), "a b", use_filter=True, max_chars=48) == 0.0
  assert instructor_reward(P("words>=30"), "a b", use_filter=True) == 1.0


def test_instructor_reward_none_followed_case():
  # "Nothing": lower fails (capital N), 'sun' missing, 1 word < 4 follows, does not end with bye -> 1/4 followed
  assert instructor_reward(P("lower; incl sun; words<4; end bye"), "Nothing") == pytest.approx(0.75)


def test_follower_reward_and_parse_proposal():
  cs = P("nocomma; quote")
  assert follower_reward('"a, b"', cs) == 0.5
  assert follower_reward('"a b"', cs) == 1.0
  assert parse_proposal("lower; incl sun", max_constraints=2) == P("lower; incl sun")
  assert parse_proposal("lower; incl sun; nocomma", max_constraints=2) is None
  assert parse_proposal("lower; incl", max_constraints=4) is None


# ------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("spec", ["lower; incl sun; words<6", "upper; end the end; nocomma", "quote; start well; "
                                  "excl sea", "nochar e; words>=5", "incl moon; incl star; words<5; lower"])
def test_solver_follows(spec):
  cs = P(spec)
  rng = np.random.default_rng(0)
  for topic in ("sea", "garden", "tower"):
    ans = D.solve(topic, cs, rng, max_chars=48)
    assert len(ans) <= 48
    assert all(I.check_all(ans, cs)), (spec, ans, I.check_all(ans, cs))


def test_solver_by_hand():
  class Fixed:  # base_words form 2 ("I like the <topic> , it is <adj> .") with adjective index 0
    def integers(self, n, *a):
      return 2 if n == 3 else 0
  assert D.solve("sea", (), Fixed(), max_chars=48) == "I like the sea, it is calm."
  assert D.solve("sea", P("lower; nocomma; end bye"), Fixed(), max_chars=48) == "i like the sea it is calm bye"
  assert D.solve("sea", P("words<4; incl sun"), Fixed(), max_chars=48) == "I like sun."


def test_sample_set_and_heldout():
  v = D.Vocab()
  rng = np.random.default_rng(1)
  for n in (1, 2, 3, 4):
    cs = D.sample_set(v, rng, n, max_chars=48)
    assert len(set(cs)) == n and I.is_valid(cs, max_chars=48)
  h1 = D.heldout_set(v, (1, 3), 5, 7, max_chars=48)
  h2 = D.heldout_set(v, (1, 3), 5, 7, max_chars=48)
  assert [x["constraints"] for x in h1] == [x["constraints"] for x in h2]  # fixed by its seed
  assert [x["level"] for x in h1] == [1] * 5 + [3] * 5
  assert all(len(x["constraints"]) == x["level"] for x in h1)
  assert {x["question"] for x in h1} <= {q for _, q in D.questions("heldout")}
  assert not {q for _, q in D.questions("heldout")} & {q for _, q in D.questions("train")}


def test_prompt_styles():
  cs = P("lower; incl sun")
  assert D.prompt_text("Describe the sea.", cs) == "Describe the sea.\nC: lower; incl sun\nA:"
  assert D.prompt_text("Describe the sea.", ()) == "Describe the sea.\nA:"
  assert D.prompt_text("Q?", cs, "short") == 'Q?\nWrite in lowercase only.\nUse the word "sun".\nA:'


# ------------------------------------------------------------------------------------------ policy pieces


def test_sft_rows_by_hand():
  from lmx.methods.seif.policy import BOS, EOS, PAD, sft_rows
  rows = sft_rows(["ab"], ["c"], 6)
  assert rows["tokens_BT"].tolist() == [[BOS, 97, 98, 99, EOS, PAD]]
  assert rows["loss_mask_BT"].tolist() == [[0, 0, 0, 1, 1, 0]]
  assert rows["segment_ids_BT"].tolist() == [[1, 1, 1, 1, 1, 0]]
  cut = sft_rows(["ab"], ["cdef"], 5)
  assert cut["loss_mask_BT"].tolist() == [[0, 0, 0, 1, 1]]


def test_grpo_batch_advantages_numpy():
  from lmx.methods.seif.policy import grpo_batch
  r = np.array([1.0, 0.0, 0.5, 0.5, 0.25, 0.75, 0.0, 1.0, 1.0, 0.5])
  gen = {"tokens": np.zeros((10, 4), np.int32), "new_tokens": np.zeros((10, 2), np.int32),
         "mask": np.ones((10, 2), bool), "sequence_mask": np.ones((10, 4), bool), "logprobs": np.zeros((10, 2))}
  batch, adv = grpo_batch(gen, r, 5)
  g = r.reshape(2, 5)
  want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
  np.testing.assert_allclose(adv, want, rtol=1e-5)
  np.testing.assert_allclose(batch["advantages_BT"][:, 2:], np.repeat(want[:, None], 2, 1), rtol=1e-5)
  assert batch["advantages_BT"][:, :2].sum() == 0  # prompt tokens carry no advantage
  assert batch["mask"].tolist() == [1.0] * 10 and all(isinstance(v, np.ndarray) for v in batch.values())


def _tiny_policy(**rl):
  import ml_collections

  from lmx.methods.seif.policy import Policy
  model = ml_collections.ConfigDict(dict(vocab_size=260, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                                         max_seq_len=24, tie_embeddings=False, dtype="float32",
                                         param_dtype="float32", remat="none", attention_impl="xla"))
  optim = ml_collections.ConfigDict(dict(name="adamw", lr=1e-2, schedule="constant", b2=0.99, weight_decay=0.01,
                                         clip_norm=1.0))
  cfg = dict(clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.01, kl_kind="k3", agg="token-mean")
  return Policy.build(model, prompt_len=12, new_tokens=8, rl_optim=optim, rl_cfg={**cfg, **rl}), optim


def test_grpo_step_is_one_optax_step_of_the_policy_loss_and_records_the_batch_stats():
  """One minibatch: the loop step equals a plain optax step of ``policy_loss_fn`` on the whole buffer (the
  reference, built here from optax directly); the batch's scalars land in row ``step`` of the state's record."""
  import jax
  import optax

  from lmx.methods.seif.policy import grpo_batch
  from lmx.rl.rollout import policy_loss_fn
  pol, optim = _tiny_policy()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32),
                        pol.model.abstract_params())
  new_mask = np.arange(8)[None, :] < np.array([[8], [3], [5], [1]])  # EOS at different positions
  out = {"tokens": rng.integers(0, 256, (4, 20)).astype(np.int32), "new_tokens": np.zeros((4, 8), np.int32),
         "mask": new_mask, "sequence_mask": np.concatenate([np.arange(12)[None, :] >= np.array([[2], [0], [5], [9]]),
                                                             new_mask], 1),
         "logprobs": -rng.uniform(0.5, 6.0, (4, 8)).astype(np.float32)}
  rows, _ = grpo_batch(out, [0.0, 1.0, 0.5, 0.25], 2)
  key = np.asarray(jax.random.key_data(jax.random.key(2)))
  ref = jax.tree.map(lambda x: x * 0.9, params)
  step = pol.grpo_step(rows=4, minibatches=1)
  assert step is pol.grpo_step(rows=4, minibatches=1)  # one step object: one compilation per shape
  state = {"params": params, "opt_state": pol.rl_tx.init(params), "stats": np.zeros((3, 2), np.float32),
           "step": np.int32(1)}
  batch = {"rows": rows, "stats": {"reward": np.float32(0.4), "len": np.float32(5.0)}, "key": key}
  new, m = jax.jit(step)(state, {"ref_params": ref}, batch, None)
  tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                   optax.adamw(optim.lr, b2=optim.b2, weight_decay=optim.weight_decay))
  loss_fn = policy_loss_fn(pol.model.apply, clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.01, kl_kind="k3",
                           agg="token-mean")
  plain = {k: v for k, v in rows.items() if k != "mask"}
  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, {"ref_params": ref}, plain, None)
  upd, _ = tx.update(grads, tx.init(params), params)
  want = optax.apply_updates(params, upd)
  for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(m["kl_ref"]), float(aux["kl_ref"]), rtol=1e-5)
  assert float(m["reward"]) == pytest.approx(0.4) and float(m["updates"]) == 1.0
  np.testing.assert_allclose(np.asarray(new["stats"]), [[0, 0], [5.0, 0.4], [0, 0]])  # sorted names: len, reward


# ------------------------------------------------------------------------------------------ report


def test_summarize_by_hand():
  def rec(a):
    return {"eval": {"L1/adherence": a, "L1/all_followed": a, "mean/adherence": a}, "pool": {}, "instructor": {}}

  per_seed = {0: {"variants": {"seif": {"rounds": [rec(0.5), rec(0.9)]}, "random": {"rounds": [rec(0.5), rec(0.6)]}}},
              1: {"variants": {"seif": {"rounds": [rec(0.5), rec(0.7)]}, "random": {"rounds": [rec(0.5), rec(0.8)]}}},
              2: {"variants": {"seif": {"rounds": [rec(0.5), rec(0.5)]}}}}  # a sweep part-way: no random yet
  s = report.summarize(per_seed, ["seif", "random"], [1], 1)
  f = s["final"]["seif"]["L1/adherence"]
  assert f["mean"] == pytest.approx(0.7) and f["n"] == 3
  assert f["std"] == pytest.approx(np.std([0.9, 0.7, 0.5], ddof=1))  # the sample std (0.2), not the population's
  p = s["paired_vs_random"]["seif"]["L1/adherence"]
  assert p["per_seed"] == pytest.approx([0.3, -0.1]) and p["n"] == 2
  assert p["mean"] == pytest.approx(0.1) and p["std"] == pytest.approx(np.std([0.3, -0.1], ddof=1))
  assert s["per_round"]["random"]["L1/adherence"][0]["mean"] == 0.5
  one = report.summarize({0: per_seed[0]}, ["seif"], [1], 1)["final"]["seif"]["L1/adherence"]
  assert one["n"] == 1 and one["std"] is None  # no spread from one seed
  table = report.markdown({"summary": s, "variants": ["seif", "random"], "levels": [1], "hard_level": 1})
  assert "n = 3 seeds" in table and "0.700 ± 0.200" in table


# ------------------------------------------------------------------------------------------ config and run


def _config(arg=""):
  return config_check.config("seif", arg)


def test_validate_names_fields():
  from lmx.core.config import ConfigError
  seif_run = importlib.import_module("lmx.methods.seif.driver")
  for field, value, match in [
      ("variants", ("seif", "other"), "variants"),  # a choice of each element
      ("variants", ("seif", "seif"), "variants"),  # distinct
      ("seeds", (0, 0), "seeds"),
      ("grpo.group_size", 1, "grpo.group_size"),
      ("grpo.minibatches", 99, "grpo.minibatches"),  # <= rounds.prompts_per_step × group_size
      ("rounds.follower_epochs", (1,), "rounds.follower_epochs"),  # one per round
      ("eval.levels", (1, 9), "eval.levels"),  # <= instructor.max_constraints + 2
      ("eval.hard_level", 2, "eval.hard_level"),
      ("vocab.kinds", ("lower", "nope"), r"vocab.kinds\[1\]"),
      ("follower.prompt_len", 200, "follower.prompt_len"),
      ("follower.new_tokens", 40, "follower.new_tokens"),  # >= answer_chars + 1
      ("rl_optim.lr", -1.0, "rl_optim.lr"),
  ]:
    config_check.refuses(seif_run.validate, _config("smoke"), field, value, match)
  with pytest.raises(ConfigError, match="paper.enabled"):
    seif_run.validate(_config("qwen2_5_7b"))


def test_schema_errors_name_the_field_and_safe_fields():
  """A typo'd field, an out-of-range value and an unknown choice each give a one-line ConfigError naming the
  field; GRPO's optimiser must be constant; a resume may change the logging cadence and plotting only."""
  from lmx.core import schema
  from lmx.methods.seif import driver
  for field, value, match in [
      ("grpo.kl_coeff", 0.1, r"grpo: unknown field\(s\) \['kl_coeff'\]"),
      ("instructor.max_constraints", 9, "instructor.max_constraints: must be"),
      ("sft.batch", -1, "sft.batch: must be"),
      ("follower.prompt_style", "long", "follower.prompt_style: 'long' is not one of"),
      ("rl_optim.schedule", "cosine", "rl_optim.schedule: 'cosine' is not one of"),
      ("sft_optim.name", "lion", "sft_optim.name: 'lion' is not one of"),
  ]:
    config_check.refuses(driver.validate, _config("smoke"), field, value, match)
  assert set(schema.safe_fields("seif")) == {"train.log_every", "train.plot"}


def test_config_choices_match_the_driver():
  """The config file imports no method code, so it states the compared variants and the constraint kinds again:
  they must be the driver's (whose order indexes the random streams)."""
  from lmx.methods.seif import driver
  cfg = config_check.module("seif")
  assert cfg.COMPARED == driver.VARIANTS
  assert cfg.KINDS == D.Vocab().kinds


class _StubPolicy:
  """A policy without a network (trivial jitted steps): the Instructor writes fixed proposals, the Follower fixed
  answers; every GRPO update adds 1 to the parameter ``w``, so a stage's output counts its updates. Exercises the
  whole driver (stages, loops, sweep, report) in seconds."""
  max_seq_len = 136

  def __init__(self):
    import optax

    from lmx.methods.seif.policy import with_batch_stats
    self.compile_cache = {}
    self.rl_tx = optax.sgd(0.0)

    def update(state, frozen, buffer, key):
      assert buffer["tokens_BT"].shape[0] % 5 == 0
      return dict(state, params={"w": state["params"]["w"] + 1}), {"loss": buffer["mask"].sum() * 0.0}

    self._grpo = with_batch_stats(update)

  def init_params(self, key):
    return {"w": np.zeros((1,), np.float32)}

  def pack(self, params):
    return [np.asarray(params["w"])]

  def unpack(self, leaves):
    return {"w": np.asarray(leaves[0])}

  def sft_step(self, optim, steps):
    import optax
    return (lambda state, frozen, batch, rng: (state, {"loss": batch["loss_mask_BT"].sum() * 0.0})), optax.sgd(0.0)

  def grpo_step(self, *, rows, minibatches):
    return self._grpo

  def sample(self, params, prompts, key, temperature):
    texts = [(["lower; incl sun", "lower; upper", "nonsense"][i % 3] if p.endswith("C:") else "the sun is here")
             for i, p in enumerate(prompts)]
    b = len(prompts)
    return {"texts": texts, "tokens": np.zeros((b, 6), np.int32), "new_tokens": np.zeros((b, 2), np.int32),
            "mask": np.ones((b, 2), bool), "sequence_mask": np.ones((b, 6), bool),
            "logprobs": np.zeros((b, 2), np.float32), "lengths": np.full((b,), 2)}

  def sample_batched(self, params, prompts, key, temperature, batch):
    return self.sample(params, prompts, key, temperature)["texts"]


def test_driver_end_to_end_with_stub_policies(tmp_path, monkeypatch):
  """The smoke config through ``run`` with network-free policies (the real networks: the launcher runs below)."""
  from lmx.core import stages
  seif_run = importlib.import_module("lmx.methods.seif.driver")
  fol, inst = _StubPolicy(), _StubPolicy()
  monkeypatch.setattr(seif_run, "build_policies", lambda config: (fol, inst))
  res = seif_run.run(_config("smoke"), str(tmp_path))
  s = res["per_seed"][0]["variants"]
  for v in ("seif", "random", "no_filter"):  # equal Follower steps in every variant: 2 + 1, one update each
    out, _ = stages.load_outputs(stages.stage_dir(str(tmp_path), f"s0/{v}/r2/follower"))
    assert out["params"][0].tolist() == [3.0] and s[v]["follower_steps"] == 3
  out, _ = stages.load_outputs(stages.stage_dir(str(tmp_path), "s0/seif/r2/instructor"))
  assert out["params"][0].tolist() == [4.0]  # 2 rounds x 2 Instructor steps, going on from round to round
  # per-step scalars: the Instructor's proposals cycle 'lower; incl sun' (valid), 'lower; upper' (a
  # contradiction), 'nonsense' (unparsable) over its 10 rollouts
  np.testing.assert_allclose(out["stats"]["parsed"], [0.7, 0.7])
  np.testing.assert_allclose(out["stats"]["filter_pass"], [0.4, 0.4])
  assert not stages.is_finished(str(tmp_path), "s0/random/r1/instructor")
  assert s["random"]["instructor_steps"] == 0 and s["seif"]["instructor_steps"] == 4
  seif_pool, nf_pool = s["seif"]["rounds"][1]["pool"], s["no_filter"]["rounds"][1]["pool"]
  assert seif_pool["filter_reject"] == pytest.approx(nf_pool["filter_reject"])
  assert 0 < seif_pool["filter_reject"] < 1
  assert s["random"]["rounds"][1]["pool"]["filter_reject"] == 0.0  # random sets pass the Filter
  ex = s["seif"]["rounds"][1]["examples"][0]
  assert ex["answer"] == "the sun is here" and ex["followed"] == I.check_all(ex["answer"], P(ex["instruction"]))
  assert os.path.exists(tmp_path / "plots" / "heldout_levels.png")
  assert res["summary"]["final"]["seif"]["L3/adherence"]["n"] == 1 and "wall_s" in res
  # a rerun reads every stage back and writes the same results
  again = seif_run.run(_config("smoke"), str(tmp_path))
  assert json.dumps(again["summary"]) == json.dumps(res["summary"])


# ------------------------------------------------------------------------------------------ the launcher's runs

SMOKE = "configs/seif.py:smoke"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One uninterrupted run of the smoke config through the launcher, shared by the tests below."""
  from resume_check import reference_run
  return reference_run(tmp_path_factory, "seif", SMOKE)[0]


def test_smoke_run_layout_and_results(smoke_run):
  from resume_check import check_layout, results
  check_layout(smoke_run)
  saved = results(smoke_run)
  assert saved["variants"] == ["seif", "random", "no_filter"] and saved["wall_s"] > 0
  for v in saved["variants"]:
    rec = saved["per_seed"]["0"]["variants"][v]
    assert len(rec["rounds"]) == 3 and rec["rounds"][0]["round"] == 0
    assert rec["follower_steps"] == 3  # equal Follower steps: 2 + 1
    for r in rec["rounds"]:
      assert 0.0 <= r["eval"]["L3/adherence"] <= 1.0
  assert saved["per_seed"]["0"]["variants"]["random"]["instructor_steps"] == 0
  assert saved["per_seed"]["0"]["variants"]["seif"]["instructor_steps"] == 4
  assert saved["summary"]["final"]["seif"]["L3/adherence"]["n"] == 1
  for name in ("heldout_hard", "heldout_levels", "proposal_conflicts"):
    assert os.path.exists(smoke_run / "plots" / f"{name}.png")
  with open(smoke_run / "metrics.jsonl") as f:
    keys = set().union(*(json.loads(line) for line in f))
  assert {"s0/seif/r1/instructor/reward", "s0/seif/r1/instructor/filter_pass", "s0/seif/r1/follower/kl_ref",
          "s0/random/r2/follower/reward"} <= keys


def test_sigterm_resume_matches_the_uninterrupted_run(tmp_path, smoke_run):
  """SIGTERM right after the first checkpoint (step 1 of the first Instructor GRPO stage), rerun: the same
  results.json."""
  from resume_check import check_sigterm_resume
  check_sigterm_resume(tmp_path, SMOKE, reference=smoke_run)


def test_nan_in_the_sft_stops_the_run(tmp_path):
  from resume_check import check_nan_stops
  check_nan_stops(tmp_path, SMOKE, "sft_follower", 1, "--config.sft.follower_steps=2")


def test_nan_in_a_grpo_update_stops_the_run(tmp_path):
  from resume_check import check_nan_stops
  check_nan_stops(tmp_path, SMOKE, "s0/seif/r1/instructor", 1)


@pytest.mark.slow
def test_paper_scale_grpo_step_lowers_for_cuda():
  from lmx.methods.seif import paper
  c = _config("qwen2_5_7b")
  low, model = paper.lower_step(c, ("cuda",), rows=1)
  assert model.cfg.d_model == 3584 and model.cfg.n_kv_heads == 4 and model.cfg.qkv_bias
  hlo = low.as_text()
  assert "stablehlo" in hlo or "HloModule" in hlo
  assert "10240" in hlo  # the paper's prompt + response length
