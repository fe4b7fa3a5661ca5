r"""Self-Lengthen (Quan et al. 2024, arXiv 2410.23933; QwenLM/Self-Lengthen) in miniature.

  python launch/run.py --config=configs/self_lengthen.py --workdir=runs/sl
  python launch/run.py --config=configs/self_lengthen.py:smoke --workdir=runs/sl-smoke

Variants: ``smoke`` (CI, seconds: a random-init base, tiny shapes, one macro-iteration), default (a byte LM
pretrained on the stdlib docstrings, then Generator / Extender bootstrap, 3 macro-iterations and the
length-following fine-tune per seed), ``qwen2_7b`` (the paper's model, Qwen2-7B-Instruct from a local Hugging
Face checkpoint, its decoding settings and cutoff; the SFT step and the sampler lower for GPU with abstract
shapes: ``lmx.methods.self_lengthen.paper.lower``; the pipeline itself is not run at that scale here).

The paper's numbers kept: 3 macro-iterations, 2 drafts per prompt, 2 extension jobs per draft, 3 micro-
iterations, acceptance above 1.2× the words, ⌊2/3⌋ of stage 1's paragraphs kept, line keep probability 0.8,
drop_short keep probability max(0, 1 − 2·rank³), 4 SFT epochs with warmup 0.1 and cosine, temperature 0.7,
top_p 0.8, top_k 20; the constraint mix about 0.4 / range 0.25 / above 0.1 / below 0.25, rounding unit coarse
with probability 0.2. Scaled down: words (the paper keeps 2000–8000-word responses for the length fine-tune;
here ``length_sft.min_words``/``max_words``), the prompt set (seed docstring topics instead of self-instruct), the
retry counts (20 in the released code).
"""
import ml_collections

from lmx.core.config import parse_arg
from lmx.core.mesh import DEFAULT_AXIS_RULES

VARIANTS = ("", "smoke", "qwen2_7b")


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS, seed=0)
  c = ml_collections.ConfigDict()
  c.method = "self_lengthen"
  c.variant = a.variant
  c.seed = a.seed  # the base's seed and the held-out order
  c.seeds = (0, 1, 2)  # self-lengthen loop seeds (bootstrap, prompts, sampling, SFT order)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, expert=1))
  c.axis_rules = DEFAULT_AXIS_RULES

  c.base = ml_collections.ConfigDict(dict(
      steps=300, corpus="stdlib_docstrings", seq_len=128, global_batch=16,
      model=ml_collections.ConfigDict(dict(
          vocab_size=260, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=192, max_seq_len=512,
          tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none", attention_impl="xla")),
      optim=ml_collections.ConfigDict(dict(
          name="adamw", lr=3e-3, warmup_steps=50, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
          weight_decay=0.1, clip_norm=1.0))))

  c.data = ml_collections.ConfigDict(dict(
      max_topic_chars=40,  # topics (dotted names) longer than this are skipped
      heldout_fraction=0.15,  # modules (by path hash) whose topics are held out for evaluation
      max_chars=128,  # every response fits this many bytes (the sampler's max_new_tokens)
      draft_chars=40))  # the bootstrap Generator's targets: first paragraphs of at most this many characters

  c.bootstrap = ml_collections.ConfigDict(dict(gen_steps=60, ext_steps=100, max_examples=4000, lr=1e-3))

  c.loop = ml_collections.ConfigDict(dict(
      macro_iters=3, n_prompts=32, samples_per_prompt=2, draft_retries=1, ext_jobs=2, ext_retries=1,
      micro_iters=3, min_gain=1.2, line_keep=0.8, drop_short=True,
      flavour="llama",  # English: whitespace-word 10-grams, ASCII terminal punctuation, meta-talk words
      meta_talk=True))

  c.sft = ml_collections.ConfigDict(dict(
      batch=8, epochs=4.0,
      warmup_ratio=0.1,  # every SFT: linear warmup over this share of its steps, then cosine to 0
      # lmx.core.optim.make_optimizer's block: the paper's lr (1e-4) for the macro-iterations' SFT (bootstrap.lr
      # for the roles' starting SFT)
      optim=ml_collections.ConfigDict(dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0,
                                           clip_norm=1.0, min_lr_ratio=0.0))))

  c.sampling = ml_collections.ConfigDict(dict(
      batch=64, temperature=0.7, top_k=20, top_p=0.8,
      prompt_buckets=(96, 208, 336)))  # Generator / stage 1 / stage 2 prompts (left-padded to a bucket)

  c.length_sft = ml_collections.ConfigDict(dict(
      min_words=4, max_words=30, epochs=4.0, p_coarse=0.2, coarse_unit=2000, fine_unit=1000,
      eval_buckets=((6, 10), (10, 14), (14, 20)), eval_topics=8))

  c.eval = ml_collections.ConfigDict(dict(n_topics=48, n_samples=1))
  c.train = ml_collections.ConfigDict(dict(log_every=50, eval_batches=2, plot=True))

  if a.variant == "smoke":
    c.seeds = (0,)
    c.base.update(steps=0)
    c.base.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=256)
    c.data.update(max_chars=64, draft_chars=48, max_topic_chars=24)
    c.bootstrap.update(gen_steps=2, ext_steps=2, max_examples=64)
    c.loop.update(macro_iters=1, n_prompts=4, draft_retries=0, ext_retries=0, micro_iters=1)
    c.sft.update(batch=8, epochs=1.0)
    c.sampling.update(batch=8, prompt_buckets=(128,))
    c.length_sft.update(min_words=1, max_words=30, epochs=1.0, eval_buckets=((2, 6),), eval_topics=1)
    c.eval.update(n_topics=4)
  elif a.variant == "qwen2_7b":
    c.seeds = (0,)
    # Qwen2-7B-Instruct: model.name='hf' reads a local checkpoint; paper.lower() builds the same architecture from
    # its config.json fields (paper.QWEN2_7B) to lower the SFT step and the sampler without the weights.
    c.base.update(steps=0)
    c.base.model = ml_collections.ConfigDict(dict(name="hf", hf_path="~/models/Qwen2-7B-Instruct", dtype="bfloat16",
                                                  max_seq_len=32768, attention_impl="auto", remat="dots"))
    c.data.update(max_chars=16384, draft_chars=16384, max_topic_chars=2000)
    c.loop.update(n_prompts=5000, draft_retries=20, ext_retries=20, flavour="qwen")
    c.sft.update(batch=1, epochs=4.0)
    c.sampling.update(batch=64, prompt_buckets=(2048,))
    c.length_sft.update(min_words=2000, max_words=8000,
                        eval_buckets=((2000, 4000), (4000, 6000), (6000, 8000)), eval_topics=10)
    c.mesh.update(data=1, fsdp=-1)
  return c
