r"""DATM (and MTT) dataset distillation: ``python launch/run.py --config=configs/datm.py[:variant]``.

Variants (experiments/datm/README.md has what each measured)
  (default)        MNIST-5k (embedded, no download), ConvNet-3 width 16, IPC 1, early window [0, 3), N = 25 inner
                   steps (the paper's inner-steps-per-expert-epoch ratio) in a rolled scan with per-step remat,
                   1,000 iterations, experts at lr 0.03: experts → distillation → evaluation on a CPU in minutes.
  ipc1             the default (alias).
  smoke            scikit-learn 8×8 digits, tiny net, IPC 1 (CI).
  ipc10            MNIST-5k at IPC 10, DATM's sequential window [0, 3 → 6), N = 25, 120 iterations, spike guard 10.
  ipc50            MNIST-5k at IPC 50, late window, N = 25.
  ipc100           MNIST-5k at IPC 100 (1,000 images, a quarter of the training split: the "lossless" regime),
                   late window, N = 25, against a full-data reference trained for 15 epochs.
  ipc10_n10        N = 10 unrolled, lr_img 30, experts at lr 0.01, no spike guard.
  ipc10_n25        ipc10 with the lr-0.01 experts. Every other MNIST-5k variant trains the same experts
                   (3 × 8 epochs at lr 0.03), so one buffer serves them all: ``--config.experts.dir=<a run>/experts``.
  digits_ipc{10,50,100}
                   scikit-learn's 8×8 digits (1,437 training images, where a random 10 % subset is ~9 points below
                   the full set, unlike MNIST-5k) with the smoke variant's ConvNet-2 width 8, N = 20, 300 iterations,
                   sequential window at IPC 10, late window above, full-data reference trained 150 epochs (converged).
  mtt              MTT preset of the same code: hard labels, real init, no window growth, no loss threshold.
  cifar10_ipc{1,10,50,500,1000}, cifar100_ipc{1,10,50,100}
                   the DATM paper's hyperparameters for an accelerator: ZCA, ConvNet-3 width 128, 100 FTD (GSAM)
                   experts × 100 epochs, 10,000 iterations, 1000-epoch evaluation; rolled lax.scan with per-step remat.

  evaluate         evaluate a saved set on its own (no experts, no distillation): ``--config.synthetic=PATH`` to a
                   synthetic.npz a run wrote (set ``data.dataset``/``data.zca``/``model`` to the run's); evaluates on
                   the ConvNet and on ``eval.cross_arch`` = (mlp, lenet, resnet18).

Device memory budget of the paper presets: 80 GB (one A100/H100 80GB). ``lmx.methods.datm.memory.estimate(config)``
gives the bytes of each stage (expert step, chunked expert forward passes, meta-step, evaluation step; the expert
buffer and soft-label logits on the host) and tests/test_datm_memory.py checks every preset's device parts against
the budget.

Overrides: ``--config.distill.iterations=500 --config.experts.dir=/path/to/buffer``; or ``:variant=ipc1,seed=3``.
"""
from __future__ import annotations

import ml_collections

from lmx.core.config import parse_arg
from lmx.core.schema import F, build

# (N, M, T⁻, T⁺₀ (current_max_start), T⁺, SG expansion its or 0 = off, batch_syn, lr_img, lr_lr, lr_y, thr, init)
PAPER = {
    ("cifar10", 1): (80, 2, 0, 4, 4, 0, 10, 100, 1e-7, 5.0, 1.1, "correct"),
    ("cifar10", 10): (80, 2, 0, 10, 20, 1000, 100, 100, 1e-5, 2.0, 1.0, "correct"),
    ("cifar10", 50): (80, 2, 0, 20, 40, 2000, 500, 1000, 1e-5, 2.0, 1.0, "correct"),
    ("cifar10", 500): (40, 2, 40, 60, 60, 0, 1000, 50, 1e-5, 10.0, 1.0, "correct"),
    ("cifar10", 1000): (100, 2, 40, 60, 60, 0, 1000, 50, 1e-5, 10.0, 1.0, "correct"),
    ("cifar100", 1): (40, 3, 0, 10, 20, 1000, 100, 1000, 1e-5, 10.0, 1.0, "correct"),
    ("cifar100", 10): (80, 2, 0, 30, 50, 2000, 1000, 1000, 1e-5, 10.0, 1.0, "correct"),
    ("cifar100", 50): (80, 2, 20, 70, 70, 0, 1000, 1000, 1e-5, 10.0, 1.0, "real"),
    ("cifar100", 100): (80, 2, 30, 70, 70, 0, 1000, 50, 1e-5, 10.0, 1.0, "correct"),
}
DIGITS_IPCS = (10, 50, 100)
VARIANTS = ["", "smoke", "ipc1", "ipc10", "ipc10_n10", "ipc10_n25", "ipc50", "ipc100", "mtt", "evaluate"] + [
    f"digits_ipc{i}" for i in DIGITS_IPCS] + [f"{d}_ipc{i}" for d, i in PAPER]

# Convolution implementations of lmx.models.convnet (CONV_IMPLS) and the architectures the evaluation can train on a
# distilled set (registered image classifiers); tests check both against the code that reads them.
CONV_IMPLS = ("auto", "xla", "im2col", "mixed")
EVAL_ARCHS = ("convnet", "mlp", "lenet", "resnet18")

_COUNT = dict(ge=1, integer=True)  # a positive whole number
_MOMENTUM = dict(ge=0, lt=1)


def _base(variant: str, seed: int) -> ml_collections.ConfigDict:
  """The default variant's config; every field declared once (lmx.core.schema), the checks that relate fields in
  lmx.methods.datm.checks."""
  return build("datm", dict(
      variant=F(variant, choices=tuple(VARIANTS)),
      seed=F(seed, ge=0, integer=True),
      data=dict(
          dataset=F("mnist5k", doc="a dataset of lmx.datasets.images.DATASETS"),
          zca=False,
          zca_eps=F(0.1, gt=0),
          data_dir=F("", doc='"" = the default tfds data directory'),
          # DSA strategy; MNIST drops 'flip' (digits are not mirror-symmetric), CIFAR uses all six groups.
          dsa_strategy="color_crop_cutout_scale_rotate"),
      # conv_impl 'auto': native convolutions on accelerators; on CPU, where XLA's convolution backward is slow,
      # im2col (patches × matmul) in the meta-step and 'mixed' (im2col in the 1-channel first layer only) for plain
      # training.
      model=dict(
          name=F("convnet", choices=("convnet",)),
          depth=F(3, **_COUNT),
          width=F(16, **_COUNT),
          norm=F("instancenorm", choices=("instancenorm", "none")),
          conv_impl=F("auto", choices=CONV_IMPLS, safe=True)),
      # batch 64: 63 steps per MNIST-5k epoch (CIFAR at 256: 196), so an "epoch" moves the expert comparably far.
      # fwd_chunk_experts × fwd_chunk_images: the block of expert forward passes (initial-image selection, soft
      # labels, expert test accuracy) the device holds at once; one compiled shape, the last block padded.
      # lr 0.03: stronger experts than at 0.01 (experiments/datm/LOG.md compares them). Every MNIST variant but
      # ipc10_n10/ipc10_n25 shares them, so one buffer serves all (--config.experts.dir).
      experts=dict(
          num=F(3, **_COUNT),
          epochs=F(8, **_COUNT),
          lr=F(0.03, gt=0),
          batch=F(64, **_COUNT),
          momentum=F(0.0, **_MOMENTUM),
          weight_decay=F(0.0, ge=0),
          dsa=True,
          gsam=False,
          gsam_rho=F(0.01, ge=0),
          gsam_alpha=F(0.3, ge=0),
          parallel=F(3, **_COUNT, safe=True),
          dir=F("", doc='the experts/ folder of a DATM run to reuse ("" = train new experts)'),
          # vmap=False: on XLA:CPU an unrolled loop over networks beats vmap (grouped conv)
          vmap=F(False, safe=True),
          fwd_chunk_experts=F(10, **_COUNT, safe=True),
          fwd_chunk_images=F(1000, **_COUNT, safe=True)),
      distill=dict(
          ipc=F(10, **_COUNT),
          iterations=F(120, **_COUNT),
          syn_steps=F(10, **_COUNT),
          expert_epochs=F(2, **_COUNT),
          # the window of start epochs [min_start_epoch, max_start_epoch); with sequential, its upper end starts at
          # current_max_start_epoch and grows to max_start_epoch by iteration expansion_end
          min_start_epoch=F(0, ge=0, integer=True),
          max_start_epoch=F(6, **_COUNT),
          sequential=True,
          current_max_start_epoch=F(3, integer=True),
          expansion_end=F(80, **_COUNT),
          batch_syn=F(50, **_COUNT),
          lr_img=F(100.0, gt=0),
          lr_lr=F(1e-5, gt=0),
          lr_y=F(2.0, gt=0),
          momentum_img=F(0.5, **_MOMENTUM),
          momentum_lr=F(0.5, **_MOMENTUM),
          momentum_y=F(0.9, **_MOMENTUM),
          threshold=F(1.0, gt=0),
          init=F("correct", choices=("correct", "real", "noise")),
          soft_labels=True,
          learn_labels=True,
          learn_lr=True,
          lr_init=F(0.03, gt=0),
          lr_param=F("log_sgd", choices=("log", "log_sgd", "raw")),
          lr_min=F(1e-4, gt=0),
          lr_max=F(1.0, gt=0),
          unroll=True,
          remat=False,
          # augment the N minibatches of an iteration in one call before the inner loop, not inside each
          # (rematerialised) step: the same function, less time per iteration on CPU
          # (benchmarks/results/datm_step_hoist.json)
          hoist_dsa=True,
          log_every=F(10, **_COUNT, safe=True),
          ckpt_every=F(50, **_COUNT, safe=True),
          max_nonfinite=F(20, **_COUNT, safe=True),
          # > 0: skip updates whose image gradient exceeds spike_factor × its running mean (not in DATM); 0 = off
          spike_factor=0.0,
          # every eval_every iterations (0 = off) train eval_nets fresh nets for eval_epochs on the current set; the
          # best set so far is kept in <workdir>/best_synthetic.npz (DATM's periodic evaluation, shorter here).
          eval_every=F(0, ge=0, integer=True, safe=True),
          eval_nets=F(2, **_COUNT, safe=True),
          eval_epochs=F(50, **_COUNT, safe=True)),
      # The evaluation happens after the distillation, from scratch: a resume may change any of it.
      # init: also evaluate the initial synthetic set (real images + soft labels, learned α, no image updates), so a
      # run shows what the trajectory matching adds on top of DATM's initialisation.
      eval=dict(
          num=F(5, **_COUNT, safe=True),
          epochs=F(150, **_COUNT, safe=True),
          batch=F(128, **_COUNT, safe=True),
          momentum=F(0.9, **_MOMENTUM, safe=True),
          weight_decay=F(5e-4, ge=0, safe=True),
          lr_real=F(0.01, gt=0, safe=True),
          full_epochs=F(3, **_COUNT, safe=True),
          random=F(True, safe=True),
          full=F(True, safe=True),
          vmap=F(False, safe=True),
          init=F(True, safe=True),
          cross=F(True, safe=True),  # (final images, initial labels) and (initial images, final labels)
          # other architectures trained on the distilled set, e.g. ("mlp", "lenet", "resnet18")
          cross_arch=F((), each=dict(choices=EVAL_ARCHS), safe=True)),
      # A synthetic.npz (x, y, lr, labels) to evaluate on its own: no experts, no distillation (the 'evaluate'
      # variant).
      synthetic="",
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The DATM config for variant ``arg`` (see module docstring)."""
  a = parse_arg(arg, variants=VARIANTS, seed=0)
  c = _base(a.variant, a.seed)
  d = c.distill
  if a.variant == "smoke":
    c.data.dataset = "digits"
    c.model.update(depth=2, width=8)
    c.experts.update(num=3, epochs=5, batch=32, parallel=3, lr=0.01)
    d.update(ipc=1, iterations=30, syn_steps=5, batch_syn=10, max_start_epoch=3, sequential=False,
             current_max_start_epoch=3, lr_y=5.0, log_every=5, ckpt_every=10, lr_init=0.01)
    c.eval.update(num=3, epochs=40, full_epochs=1, full=False, cross=False)
  elif a.variant in ("", "ipc1"):
    # N = 25: N : M·steps-per-epoch = 25 : 126 ≈ 0.2, the paper's ratio; the early window, as DATM at small IPC
    d.update(ipc=1, batch_syn=10, syn_steps=25, min_start_epoch=0, max_start_epoch=3, sequential=False,
             current_max_start_epoch=3, lr_lr=1e-7, lr_y=5.0, threshold=1.1, iterations=1000, unroll=False,
             remat=True)
  elif a.variant == "ipc50":
    d.update(ipc=50, batch_syn=100, syn_steps=25, min_start_epoch=3, max_start_epoch=6, sequential=False,
             current_max_start_epoch=6, lr_img=1000.0, iterations=80, unroll=False, remat=True)
    c.eval.update(epochs=60, full_epochs=15)
  elif a.variant == "ipc100":  # 1,000 images, 25 % of the training split (CIFAR-10 IPC 1000's ratio)
    d.update(ipc=100, batch_syn=100, syn_steps=25, min_start_epoch=3, max_start_epoch=6, sequential=False,
             current_max_start_epoch=6, lr_img=50.0, iterations=60,  # lr_img: the paper's at IPC 500/1000
             unroll=False, remat=True)
    c.eval.update(epochs=40, full_epochs=15)  # the full-data reference trained to convergence (15 epochs)
  elif a.variant in ("ipc10", "ipc10_n25"):
    # N = 25 (N : M·steps-per-epoch = 25 : 126 ≈ 0.2, the paper's ratio) as a rolled scan with per-step remat
    # (benchmarks/results/datm_step_n25.json compares it with unrolling); the guard skips an image update whose
    # gradient exceeds 10× its running mean (not in DATM).
    d.update(syn_steps=25, unroll=False, remat=True, spike_factor=10.0)
    if a.variant == "ipc10_n25":  # the lr-0.01 experts
      c.experts.update(lr=0.01)
      d.update(lr_init=0.01)
  elif a.variant == "mtt":
    d.update(init="real", soft_labels=False, learn_labels=False, sequential=False, threshold=1e30,  # no skip
             lr_param="raw")
  elif a.variant == "evaluate":  # --config.synthetic=PATH (required) --config.data.dataset=... to match the file
    c.eval.update(cross_arch=("mlp", "lenet", "resnet18"), init=False, cross=False, full=False)
  elif a.variant == "ipc10_n10":
    # lr_img 30, not the 100 the other variants keep (experiments/datm/LOG.md compares 10 / 30 / 100)
    d.update(lr_img=30.0)
    c.experts.update(lr=0.01)
    d.update(lr_init=0.01)
  elif a.variant.startswith("digits_ipc"):
    ipc = int(a.variant.split("_ipc")[1])
    c.data.dataset = "digits"
    c.model.update(depth=2, width=8)
    # 45 steps per epoch; lr 0.1: experts at 94 % test accuracy after 8 epochs (lr 0.01: 72 %, 0.03: 90 %), whose
    # soft labels and trajectories carry what the full data teaches (the full-data reference reaches 98.4 %)
    c.experts.update(num=3, epochs=8, batch=32, parallel=3, lr=0.1)
    d.update(ipc=ipc, batch_syn=100, syn_steps=20, iterations=300, lr_init=0.1, log_every=20, ckpt_every=100)
    if ipc == 10:  # DATM's sequential window, as ipc10
      d.update(min_start_epoch=0, current_max_start_epoch=3, max_start_epoch=6, sequential=True, expansion_end=200)
    else:  # the late window and the image lr of ipc50 / ipc100
      d.update(min_start_epoch=3, current_max_start_epoch=6, max_start_epoch=6, sequential=False,
               lr_img=1000.0 if ipc == 50 else 50.0)
    c.eval.update(num=5, epochs=150, full_epochs=150, cross=False)  # 150 full-data epochs: converged (subset_gap)
  else:  # paper configs
    name, ipc = a.variant.split("_ipc")
    ipc = int(ipc)
    n, m, tmin, tcur, tmax, sg, bsyn, lr_img, lr_lr, lr_y, thr, init = PAPER[(name, ipc)]
    c.data.update(dataset=name, zca=True, dsa_strategy="color_crop_cutout_flip_scale_rotate")
    c.model.update(depth=3, width=128)
    # batch 256 (the paper's buffer_FTD.py --batch_train): 196 steps per CIFAR epoch
    c.experts.update(num=100, epochs=100, lr=0.01, batch=256, gsam=True, parallel=10, vmap=True,
                     fwd_chunk_experts=10, fwd_chunk_images=500)
    d.update(ipc=ipc, syn_steps=n, expert_epochs=m, min_start_epoch=tmin, current_max_start_epoch=tcur,
             max_start_epoch=tmax, sequential=bool(sg), expansion_end=max(sg, 1),
             batch_syn=min(bsyn, ipc * (100 if name == "cifar100" else 10)), lr_img=float(lr_img), lr_lr=lr_lr,
             lr_y=lr_y, threshold=thr, init=init, iterations=10000, lr_init=0.01, lr_param="log_sgd", lr_max=10.0,
             unroll=False, remat=True, log_every=50, ckpt_every=500, eval_every=1000, eval_nets=3, eval_epochs=300)
    c.eval.update(epochs=1000, full_epochs=50, vmap=True, init=False, cross=False)
  return c
