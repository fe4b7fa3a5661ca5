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
  np.testing.assert_allclose(np.asarray(batch["advantages_BT"])[:, 2:], np.repeat(want[:, None], 2, 1), rtol=1e-5)
  assert np.asarray(batch["advantages_BT"])[:, :2].sum() == 0  # prompt tokens carry no advantage


# ------------------------------------------------------------------------------------------ report


def test_summarize_by_hand():
  def rec(a):
    return {"eval": {"L1/adherence": a, "L1/all_followed": a, "mean/adherence": a}, "pool": {}, "instructor": {}}

  per_seed = {0: {"variants": {"seif": {"rounds": [rec(0.5), rec(0.9)]}, "random": {"rounds": [rec(0.5), rec(0.6)]}}},
              1: {"variants": {"seif": {"rounds": [rec(0.5), rec(0.7)]}, "random": {"rounds": [rec(0.5), rec(0.8)]}}}}
  s = report.summarize(per_seed, ["seif", "random"], [1], 1)
  assert s["final"]["seif"]["L1/adherence"]["mean"] == pytest.approx(0.8)
  assert s["final"]["seif"]["L1/adherence"]["std"] == pytest.approx(0.1)
  assert s["paired_vs_random"]["seif"]["L1/adherence"]["per_seed"] == pytest.approx([0.3, -0.1])
  assert s["paired_vs_random"]["seif"]["L1/adherence"]["mean"] == pytest.approx(0.1)
  assert s["per_round"]["random"]["L1/adherence"][0]["mean"] == 0.5


# ------------------------------------------------------------------------------------------ config and run


def _config(arg=""):
  from lmx.core.config import load_config_file
  return load_config_file("configs/seif.py" + (f":{arg}" if arg else ""))


def test_validate_names_fields():
  from lmx.core.config import ConfigError
  seif_run = importlib.import_module("lmx.methods.seif.run")
  c = _config("smoke")
  c.variants = ("seif", "other")
  with pytest.raises(ConfigError, match="variants"):
    seif_run.validate(c)
  c = _config("smoke")
  c.grpo.group_size = 1
  with pytest.raises(ConfigError, match="grpo.group_size"):
    seif_run.validate(c)
  c = _config("smoke")
  c.follower.prompt_len = 200
  with pytest.raises(ConfigError, match="follower.prompt_len"):
    seif_run.validate(c)
  with pytest.raises(ConfigError, match="paper.enabled"):
    seif_run.validate(_config("qwen2_5_7b"))


class _StubPolicy:
  """A policy without a network (no compilation): the Instructor writes fixed proposals, the Follower fixed
  answers; training steps count their calls. Exercises the whole driver in seconds."""

  class _Model:
    class cfg:  # noqa: N801
      max_seq_len = 136

  model = _Model()

  def __init__(self):
    self.grpo_calls = 0

  def init_state(self, key, tx="sft", params=None):
    return {"params": {"w": np.zeros(1)} if params is None else params}

  def sft_step(self, state, batch):
    return state, {"loss": 0.0}

  def grpo_step(self, state, ref, batch):
    self.grpo_calls += 1
    assert batch["tokens_BT"].shape[0] % 5 == 0
    return state, {"loss": 0.0, "kl_ref": 0.0}

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
  """The smoke config through ``run`` with network-free policies (the real networks: the slow test below)."""
  seif_run = importlib.import_module("lmx.methods.seif.run")
  fol, inst = _StubPolicy(), _StubPolicy()
  monkeypatch.setattr(seif_run, "build_policies", lambda config: (fol, inst))
  res = seif_run.run(_config("smoke"), str(tmp_path))
  s = res["per_seed"][0]["variants"]
  # the stub Follower's answer "the sun is here" follows 'lower' and 'incl sun' of every held-out set it meets
  assert fol.grpo_calls == 3 * 3  # 3 variants x (2 + 1) Follower steps, 1 minibatch each
  assert inst.grpo_calls == 2 * 2  # seif and no_filter: 2 rounds x 1 Instructor step
  seif_pool, nf_pool = s["seif"]["rounds"][1]["pool"], s["no_filter"]["rounds"][1]["pool"]
  # proposals: 'lower; incl sun' (valid), 'lower; upper' (a contradiction), 'nonsense' (unparsable, dropped)
  assert seif_pool["filter_reject"] == pytest.approx(nf_pool["filter_reject"])
  assert 0 < seif_pool["filter_reject"] < 1
  assert s["random"]["rounds"][1]["pool"]["filter_reject"] == 0.0  # random sets pass the Filter
  assert s["random"]["instructor_steps"] == 0
  ex = s["seif"]["rounds"][1]["examples"][0]
  assert ex["answer"] == "the sun is here" and ex["followed"] == I.check_all(ex["answer"], P(ex["instruction"]))
  assert os.path.exists(tmp_path / "plots" / "heldout_levels.png")


# The CI's run of the smoke config with the real networks: about 9 s on one idle core.
def test_smoke_end_to_end(tmp_path):
  seif_run = importlib.import_module("lmx.methods.seif.run")
  res = seif_run.run(_config("smoke"), str(tmp_path))
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["variants"] == ["seif", "random", "no_filter"]
  for v in saved["variants"]:
    rounds = saved["per_seed"]["0"]["variants"][v]["rounds"]
    assert len(rounds) == 3 and rounds[0]["round"] == 0
    assert saved["per_seed"]["0"]["variants"][v]["follower_steps"] == 3  # equal Follower steps: 2 + 1
    for r in rounds:
      assert 0.0 <= r["eval"]["L3/adherence"] <= 1.0
  assert saved["per_seed"]["0"]["variants"]["random"]["instructor_steps"] == 0
  assert saved["per_seed"]["0"]["variants"]["seif"]["instructor_steps"] == 2
  assert res["summary"]["final"]["seif"]["L3/adherence"]["n"] == 1
  for name in ("heldout_hard", "heldout_levels", "proposal_conflicts"):
    assert os.path.exists(tmp_path / "plots" / f"{name}.png")


@pytest.mark.slow
def test_paper_scale_grpo_step_lowers_for_cuda():
  from lmx.methods.seif import paper
  c = _config("qwen2_5_7b")
  low, model = paper.lower_step(c, ("cuda",), rows=1)
  assert model.cfg.d_model == 3584 and model.cfg.n_kv_heads == 4 and model.cfg.qkv_bias
  hlo = low.as_text()
  assert "stablehlo" in hlo or "HloModule" in hlo
  assert "10240" in hlo  # the paper's prompt + response length
