r"""LET: Late-to-Early Training (a small trained teacher's final layer guides an early student layer early on).

  python launch/run.py --config=configs/let.py:smoke --workdir=runs/let-smoke
  python launch/run.py --config=configs/let.py --config.let.lam0=0.3
  python launch/run.py --config=configs/let.py --config.compare.seeds="(0,1,2)" --workdir=runs/let-compare

Variants: ``smoke`` (CI), default (CPU-sized), ``pile_1b4`` (the paper's sizes: a LLaMA-style 1.4B student,
SmolLM-135M as teacher, ~10x smaller; builds and lowers, not run here).

Stages (named stages of the one workdir, each skipped when finished): (1) ``teacher``: ``teacher.source='pretrain'``
trains a small LM in-process on the same corpus (an ``lm`` training, checkpoints in ``checkpoints/teacher/``),
``'run'`` restores the params of the lmx run in ``teacher.workdir``, ``'hf'`` reads the Hugging Face checkpoint in
``teacher.hf_path`` (same tokenizer as the student: positions align one to one). It is frozen and passed to the step
as a frozen input. (2) With ``let.with_baseline`` (default on), ``baseline``: the same student with λ0 = 0.
(3) ``let``: steps [0, S_stop) CE + λ(s)·align with the teacher's forward (``let/align``); steps [S_stop, steps)
plain CE, no teacher, a second compiled step (``let/ce``). results.json's ``vs_baseline`` holds both final
validation CEs and the speedup (baseline steps / steps LET needs to reach the baseline's final CE);
``plots/vs_baseline.png`` the two curves. With ``compare.seeds`` set, the run is instead the comparison of
``compare.arms`` at each seed on one shared teacher (``lmx.methods.let.compare``).

Defaults for the paper's unknowns (all inferred unless stated):
  * ``let.student_layer`` k: the residual stream after block k (0-based); default ≈ 20-30% of depth
    (block 1 of 6 here; block 5 of 24 at pile_1b4).
  * ``let.teacher_layer``: ``-1`` = the teacher's final layer *after* its final RMSNorm (the state its
    unembedding reads); a block index i ≥ 0 takes the residual stream after block i (before any norm).
  * ``let.lam0`` = 0.1 (the paper's best of {0.01, 0.1, 0.3, 1, 3}, second-hand).
  * ``let.s_stop`` = 1/3 of the steps; ``let.s_stop_fraction`` sets it when ``let.s_stop`` is 0.
  * ``let.align`` = 'interp': the teacher's features linearly interpolated along the feature axis to the
    student's width (reported by a reviewer); 'project' = a learned [dS, dT] projector on the student side,
    initialised to the interpolation matrix and trained with the student.
  * ``let.schedule`` = 'linear' (the paper's); 'constant' keeps λ = λ0 until S_stop (the ablation).
"""
import os

from lmx.core import blocks, schema
from lmx.core.config import load_config_file, parse_arg
from lmx.core.schema import F, build

VARIANTS = ("", "smoke", "pile_1b4")
# Where the teacher comes from, how its features meet the student's, how λ decays (lmx.methods.let.losses), the arms
# of a comparison (lmx.methods.let.compare.ARMS); tests check these against the code that reads them.
TEACHER_SOURCES = ("pretrain", "run", "hf")
ALIGN_MODES = ("interp", "project")
SCHEDULES = ("linear", "constant")
ARMS = ("baseline", "let", "l2l", "constant", "large")


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS, seed=0)
  # The student is trained as configs/lm.py trains a model (mesh, rules, model, data, optimiser and loop blocks
  # from there); this file states only what LET changes.
  lm = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm.py"))
  c = build("let", dict(
      variant=F(a.variant, choices=VARIANTS),
      seed=F(a.seed, ge=0, integer=True),
      mesh=blocks.mesh(**lm.mesh),
      axis_rules=F(lm.axis_rules, safe=True),
      # The student (target model M): 6 layers, d = 128, ~10x the teacher's parameters; batches of 16 x 64 bytes.
      model=blocks.transformer(**dict(lm.model, n_layers=6)),
      data=dict(
          # configs/lm.py's data block without its text_file / tokenizer (LET's own tokenizer field is below)
          **schema.block_of("lm", "data", exclude=("text_file", "tokenizer"), seq_len=64, global_batch=16),
          # 'embedded' (lmx.datasets.text) or 'tfds': a prepared tfds text set (tfds_name, train/eval splits, the
          # record's text_key) read through Grain, tokenized by ``tokenizer`` ('' = bytes, else a dir with
          # tokenizer.json) and packed into windows (lmx.datasets.tfds_text); data_dir '' = $TFDS_DATA_DIR or
          # ~/tensorflow_datasets.
          source=F("embedded", choices=("embedded", "tfds")),
          tfds_name="", tfds_split="train", tfds_eval_split="validation", data_dir="", text_key="text",
          tokenizer=""),
      optim=blocks.optim(**lm.optim),
      # 12 points on the validation curve, 128 held-out windows
      train=blocks.lm_train(**dict(lm.train, eval_every=50, eval_batches=8)),
      teacher=dict(
          source=F("pretrain", choices=TEACHER_SOURCES),
          workdir=F("", doc="source='run': an lmx run's workdir, e.g. an lm run or another LET run (its teacher "
                    "stage)"),
          hf_path=F("", doc="source='hf': a local Hugging Face checkpoint directory (Llama / Qwen2)"),
          steps=F(1000, ge=1, integer=True, doc="source='pretrain': training steps of the teacher on the same corpus"),
          model=blocks.transformer(
              vocab_size=260, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=256,
              tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none", attention_impl="xla"),
          optim=blocks.optim(**lm.optim)),
      let=dict(
          # the residual stream after student block k (0-based) is aligned with the teacher's layer teacher_layer
          # (-1: its final layer after the final norm)
          student_layer=F(1, ge=0, integer=True),
          teacher_layer=F(-1, ge=-1, integer=True),
          lam0=F(0.1, ge=0),
          s_stop=F(0, ge=0, integer=True, doc="0: round(s_stop_fraction · train.steps)"),
          s_stop_fraction=1 / 3,
          align=F("interp", choices=ALIGN_MODES),
          schedule=F("linear", choices=SCHEDULES),
          # also train the paired baseline (λ0 = 0, same seed, data order and steps) as the stage 'baseline' first
          # and report the speedup; the multi-seed comparison with the ablations is compare.seeds below
          with_baseline=True),
      # compare.seeds non-empty: instead of one run, the comparison of compare.arms (baseline, let, l2l, constant,
      # large; lmx.methods.let.compare) at each seed, on one shared teacher
      compare=dict(
          seeds=F((), each=dict(ge=0, integer=True)),
          arms=F(("baseline", "let"), each=dict(choices=ARMS), nonempty=True)),
  ))

  if a.variant == "smoke":
    c.model.update(d_model=64, n_layers=3, d_ff=192, max_seq_len=64)
    c.teacher.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=96, max_seq_len=64)
    c.teacher.update(steps=30)
    c.teacher.optim.update(warmup_steps=5)
    c.data.update(seq_len=64, global_batch=8)
    c.optim.update(warmup_steps=5)
    c.let.update(student_layer=0)
    c.train.update(steps=40, log_every=5, eval_every=20, eval_batches=2, ckpt_every=20)
  elif a.variant == "pile_1b4":
    # Student: LLaMA-style 1.4B (24 layers, d 2048, SwiGLU 5632, RMSNorm, BF16), SmolLM's 49152-token vocabulary.
    c.model.update(vocab_size=49152, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=5632,
                   max_seq_len=2048, dtype="bfloat16", attention_impl="auto", remat="dots")
    # Teacher: SmolLM-135M (Llama architecture, d 576, 30 layers), ~10x smaller, read from a local HF copy.
    # teacher.model states its architecture so the step can be built and lowered without the weights.
    c.teacher.update(source="hf", hf_path="~/models/SmolLM-135M")
    c.teacher.model.update(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                           max_seq_len=2048, tie_embeddings=True, dtype="bfloat16", param_dtype="float32",
                           attention_impl="auto", rope_theta=10000.0)
    c.mesh.update(data=1, fsdp=-1)
    # The paper trains on The Pile, which the tfds catalogue lacks: c4/en is the nearest web corpus tfds prepares;
    # point data.tfds_name at a locally built Pile builder for the paper's data. SmolLM's tokenizer for both.
    c.data.update(source="tfds", tfds_name="c4/en", seq_len=2048, global_batch=512,
                  tokenizer="~/models/SmolLM-135M")
    c.optim.update(lr=3e-4, warmup_steps=2000)
    c.let.update(student_layer=5)
    # ~20B tokens at 2048 x 512 per step.
    c.train.update(steps=19_000, log_every=50, eval_every=1000, eval_batches=8, ckpt_every=1000)
  return c
