r"""SEIF: Self-Evolving Reinforcement Learning for Instruction Following (Ren et al., arXiv 2605.07465) in miniature.

  python launch/run.py --config=configs/seif.py --workdir=runs/seif
  python launch/run.py --config=configs/seif.py:smoke --workdir=runs/seif-smoke
  python launch/run.py --config=configs/seif.py --config.seeds="(0,)" --workdir=runs/seif-1seed

Variants: default (CPU: three variants x three seeds, byte-level tiny Instructor and Follower trained in process;
minutes on one core, results in experiments/seif/README.md), ``smoke`` (CI, seconds), ``long`` (twice the RL steps
at twice the RL learning rate), ``qwen2_5_7b`` (the paper's model, group size, KL and clipping: its GRPO step
builds and lowers for GPU with abstract shapes, see ``lmx.methods.seif.paper``; it does not run here).

Variants compared at equal Follower GRPO steps (``variants``): ``seif`` (Instructor evolution with the Filter),
``random`` (uniformly random instructions that the Filter accepts; no Instructor), ``no_filter`` (Instructor
rewarded 1 − adherence without the Filter gate).
"""
import ml_collections

from lmx.core import blocks
from lmx.core.config import parse_arg
from lmx.core.schema import F, build, open_block

VARIANTS = ("", "smoke", "long", "qwen2_5_7b")
# the compared variants (lmx.methods.seif.driver.VARIANTS, in the same order: it indexes the random streams)
COMPARED = ("seif", "random", "no_filter")
# the constraint kinds the Instructor may propose and the random sampler draws (lmx.methods.seif.data.Vocab.kinds)
KINDS = ("lower", "upper", "nocomma", "quote", "incl", "excl", "nochar", "words_lt", "words_ge", "end", "start")


def _model(**kw):
  """A byte-level transformer (checked by lmx.models.transformer.TransformerConfig); a resume may change none of
  its keys."""
  base = dict(vocab_size=260, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256, max_seq_len=256,
              tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none", attention_impl="xla")
  base.update(kw)
  return open_block(base)


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS)
  c = build("seif", dict(
      variant=F(a.variant, choices=VARIANTS),
      # seeds and compared variants: each distinct (the driver checks)
      seeds=F((0, 1, 2), each=dict(ge=0, integer=True), nonempty=True),
      variants=F(COMPARED, each=dict(choices=COMPARED), nonempty=True),
      vocab=dict(
          keywords=("sun", "sea", "tree", "bird", "cat", "rain", "moon", "star", "fish", "wind"),
          end_phrases=("bye", "the end", "ok", "thanks"), start_phrases=("yes", "well", "so"),
          nochars=("a", "e", "o", "s", "t"), max_words_lt=(4, 12), min_words_ge=(3, 10),
          kinds=F(KINDS, each=dict(choices=KINDS), nonempty=True)),
      answer_chars=48,  # the Follower's answer budget (bytes); also the Filter's length budget
      # prompt_style 'spec': the question, then the constraints in the Instructor's text form ('short' / 'ifeval':
      # rendered sentences, 2-4x longer prompts)
      follower=dict(model=_model(max_seq_len=136), prompt_len=80, new_tokens=49,
                    prompt_style=F("spec", choices=("spec", "short", "ifeval"))),
      instructor=dict(model=_model(max_seq_len=80), prompt_len=32, new_tokens=48,
                      max_constraints=F(4, ge=1, le=8, integer=True)),
      # the warm starts (trained once with sft.seed, shared by all seeds and variants, as the paper's base model)
      sft=dict(seed=F(0, ge=0, integer=True), follower_steps=F(400, ge=0, integer=True),
               instructor_steps=F(150, ge=0, integer=True), batch=F(16, ge=0, integer=True),
               follower_max_constraints=2),
      # lmx.core.optim.make_optimizer blocks; SFT: linear warmup, then constant (min_lr_ratio 1)
      sft_optim=blocks.optim(name="adamw", lr=3e-3, warmup_steps=50, min_lr_ratio=1.0, b2=0.99, weight_decay=0.01,
                             clip_norm=1.0),
      # The paper: lr 1e-6 for a 7B model; a 0.2M-parameter byte LM needs a much larger step. Constant: every GRPO
      # stage (role, round) restarts Adam from the previous round's policy with one compiled update for all of them.
      rl_optim={**blocks.optim(name="adamw", lr=1e-4, b2=0.99, weight_decay=0.01, clip_norm=1.0),
                "schedule": F("constant", choices=("constant",))},
      # The paper's GRPO: n = 5 rollouts at temperature 1, k3 KL as a loss with beta 0.01, clip 0.2 / 0.3, dual
      # clip 3, token-mean aggregation; minibatches <= rounds.prompts_per_step × group_size.
      grpo=dict(group_size=F(5, ge=2, integer=True, doc="GRPO's group baseline needs two"), temperature=1.0,
                kl_coef=0.01, kl_kind="k3", clip_low=0.2, clip_high=0.3, dual_clip=3.0, agg="token-mean",
                minibatches=F(1, ge=1, integer=True)),
      # follower_epochs: one entry per round (at least rounds.n)
      rounds=dict(n=F(3, ge=1, integer=True), follower_steps=F(8, ge=0, integer=True), follower_epochs=(3, 1, 1),
                  instructor_steps=F(8, ge=0, integer=True), prompts_per_step=F(4, ge=1, integer=True),
                  pool_size=F(80, ge=0, integer=True), gen_temperature=0.7, random_constraints=(1, 4)),
      # levels: constraint counts, at most instructor.max_constraints + 2; hard_level one of them
      eval=dict(levels=F((1, 2, 3, 4), each=dict(ge=1)), per_level=20, seed=1234, hard_level=4),
      train=dict(log_every=F(10, safe=True), plot=F(True, safe=True), examples=4),
      # The paper's scale (variant qwen2_5_7b): Qwen2.5-7B-Instruct, its GRPO step built and lowered only
      # (lmx.methods.seif.paper); a run would read the checkpoint hf_path with model.name='hf' (lmx.models.hf)
      # and its tokenizer. The architecture is stated so the step lowers without the weights.
      paper=dict(
          enabled=F(False, doc="True only to lower the step (lmx.methods.seif.paper); a run refuses it"),
          hf_path="~/models/Qwen2.5-7B-Instruct",
          model=open_block(dict(
              vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
              max_seq_len=2048 + 8192, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=False, norm_eps=1e-6,
              dtype="bfloat16", param_dtype="bfloat16", remat="full", attention_impl="xla")),
          optim=blocks.optim(name="adamw", lr=1e-6, weight_decay=1e-2, clip_norm=1.0, schedule="constant"),
          max_prompt=2048, max_response=8192, micro_batch=4, rollout_batch_prompts=384, global_batch=96),
  ))

  if a.variant == "smoke":
    c.seeds = (0,)
    # one tiny shape for both roles: they share one compiled SFT step, GRPO step and sampler
    c.follower.model.update(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=136)
    c.instructor.model = ml_collections.ConfigDict(c.follower.model.to_dict())
    c.instructor.update(prompt_len=80, new_tokens=49)
    c.sft.update(follower_steps=0, instructor_steps=0, batch=8)  # no SFT compilation (the tests add steps)
    c.rounds.update(n=2, follower_steps=1, follower_epochs=(2, 1), instructor_steps=2, prompts_per_step=2,
                    pool_size=10)
    c.grpo.update(minibatches=1)
    c.eval.update(levels=(1, 3), per_level=2, hard_level=3)
    c.train.update(log_every=1, examples=2)
  elif a.variant == "long":  # twice the RL steps per round at twice the RL learning rate
    c.rounds.update(follower_steps=16, instructor_steps=16)
    c.rl_optim.update(lr=2e-4)
  elif a.variant == "qwen2_5_7b":
    c.paper.enabled = True
  return c
