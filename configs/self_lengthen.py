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

from lmx.core import blocks
from lmx.core.config import parse_arg
from lmx.core.mesh import DEFAULT_AXIS_RULES
from lmx.core.schema import F, build, open_block

VARIANTS = ("", "smoke", "qwen2_7b")
# the filters' language conventions (lmx.methods.self_lengthen.filters.FLAVOURS)
FLAVOURS = ("llama", "qwen")
# Every SFT's optimiser: each field of the shared block but the warmup, which every SFT sets from sft.warmup_ratio
# × its steps.
SFT_OPTIM = {k: v for k, v in blocks.optim(name="adamw", lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, clip_norm=1.0,
                                           min_lr_ratio=0.0).items() if k != "warmup_steps"}


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS, seed=0)
  c = build("self_lengthen", dict(
      variant=F(a.variant, choices=VARIANTS),
      seed=F(a.seed, ge=0, integer=True),  # the base's seed and the held-out order
      # self-lengthen loop seeds (bootstrap, prompts, sampling, SFT order); distinct
      seeds=F((0, 1, 2), each=dict(ge=0, integer=True), nonempty=True),
      mesh=blocks.mesh(),
      axis_rules=F(DEFAULT_AXIS_RULES, safe=True),
      base=dict(
          steps=F(300, ge=0, integer=True),  # 0: the random initialisation
          corpus=F("stdlib_docstrings", doc="an embedded corpus of lmx.datasets.text.CORPORA"),
          seq_len=128, global_batch=16,
          # the transformer (lmx.models.transformer.TransformerConfig, or model.name='hf' for a local checkpoint,
          # checks it); a resume may change the attention kernel. Its max_seq_len must hold the largest prompt
          # bucket + data.max_chars and the Extender's SFT input.
          model=open_block(dict(
              vocab_size=260, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=192, max_seq_len=512,
              tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none", attention_impl="xla"),
              safe_keys=("attention_impl",)),
          optim=blocks.optim(name="adamw", lr=3e-3, warmup_steps=50, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                             weight_decay=0.1, clip_norm=1.0)),
      data=dict(
          max_topic_chars=F(40, gt=0, integer=True),  # topics (dotted names) longer than this are skipped
          # modules (by path hash) whose topics are held out for evaluation
          heldout_fraction=F(0.15, gt=0, lt=1),
          # every response fits this many bytes (the sampler's max_new_tokens)
          max_chars=F(128, gt=0, integer=True),
          # the bootstrap Generator's targets: first paragraphs of at most this many characters (<= max_chars)
          draft_chars=F(40, gt=0, integer=True)),
      bootstrap=dict(gen_steps=F(60, ge=1, integer=True), ext_steps=F(100, ge=1, integer=True), max_examples=4000,
                     lr=F(1e-3, gt=0)),
      loop=dict(
          macro_iters=F(3, ge=1, integer=True), n_prompts=F(32, ge=1, integer=True),
          samples_per_prompt=F(2, ge=1, integer=True), draft_retries=F(1, ge=0, integer=True),
          ext_jobs=F(2, ge=1, integer=True), ext_retries=F(1, ge=0, integer=True),
          micro_iters=F(3, ge=1, integer=True),
          min_gain=F(1.2, ge=1.0),  # accept an extension above this × the words (the paper: 1.2)
          line_keep=F(0.8, gt=0, le=1),  # the paper: 0.8
          drop_short=True,
          # 'llama' (English): whitespace-word 10-grams, ASCII terminal punctuation, meta-talk words
          flavour=F("llama", choices=FLAVOURS),
          meta_talk=True),
      sft=dict(
          batch=F(8, ge=1, integer=True), epochs=4.0,
          # every SFT: linear warmup over this share of its steps, then cosine to 0
          warmup_ratio=F(0.1, ge=0, lt=1),
          # lmx.core.optim.make_optimizer's block: the paper's lr (1e-4) for the macro-iterations' SFT
          # (bootstrap.lr for the roles' starting SFT)
          optim=SFT_OPTIM),
      sampling=dict(
          batch=64, temperature=F(0.7, gt=0), top_k=20, top_p=F(0.8, gt=0, le=1),
          # Generator / stage 1 / stage 2 prompts (left-padded to a bucket)
          prompt_buckets=F((96, 208, 336), nonempty=True)),
      # min_words < max_words; eval_buckets: (lo, hi) pairs with 0 < lo < hi
      length_sft=dict(
          min_words=F(4, ge=0), max_words=30, epochs=4.0, p_coarse=0.2, coarse_unit=2000, fine_unit=1000,
          eval_buckets=((6, 10), (10, 14), (14, 20)), eval_topics=8),
      eval=dict(n_topics=48, n_samples=1),
      train=dict(log_every=F(50, safe=True), eval_batches=2, plot=F(True, safe=True)),
  ))

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
