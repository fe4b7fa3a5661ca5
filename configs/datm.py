r"""DATM (and MTT) dataset distillation: ``python launch/run.py --config=configs/datm.py[:variant]``.

Variants (experiments/datm/README.md has what each measured)
  (default)        MNIST-5k (embedded, no download), ConvNet-3 width 16, IPC 10, N = 25 inner steps (the paper's
                   inner-steps-per-expert-epoch ratio) in a rolled scan with per-step remat, experts at lr 0.03,
                   spike guard 10: experts → distillation → evaluation on a CPU.
  ipc10            the default (alias).
  smoke            scikit-learn 8×8 digits, tiny net, IPC 1 (CI).
  ipc1             MNIST-5k at IPC 1, early window, N = 25, 1,000 iterations.
  ipc50            MNIST-5k at IPC 50, late window, N = 25.
  ipc100           MNIST-5k at IPC 100 (1,000 images, a quarter of the training split: the "lossless" regime),
                   late window, N = 25, against a full-data reference trained for 15 epochs.
  ipc10_n10        N = 10 unrolled, lr_img 30, experts at lr 0.01, no spike guard.
  ipc10_n25        N = 25 as the default but with the lr-0.01 experts. Every other MNIST-5k variant trains the same
                   experts (3 × 8 epochs at lr 0.03), so one buffer serves them all:
                   ``--config.experts.dir=<a default run>/experts``.
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
VARIANTS = ["", "smoke", "ipc1", "ipc10", "ipc10_n10", "ipc10_n25", "ipc50", "ipc100", "mtt", "evaluate"] + [
    f"{d}_ipc{i}" for d, i in PAPER]


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "datm"
  c.variant = ""
  c.seed = 0
  c.data = dict(dataset="mnist5k", zca=False, zca_eps=0.1, data_dir="",
                # DSA strategy; MNIST drops 'flip' (digits are not mirror-symmetric), CIFAR uses all six groups.
                dsa_strategy="color_crop_cutout_scale_rotate")
  # conv_impl 'auto': native convolutions on accelerators; on CPU, where XLA's convolution backward is slow, im2col
  # (patches × matmul) in the meta-step and 'mixed' (im2col in the 1-channel first layer only) for plain training.
  c.model = dict(name="convnet", depth=3, width=16, norm="instancenorm", conv_impl="auto")
  # batch 64: 63 steps per MNIST-5k epoch (CIFAR at 256: 196), so an "epoch" moves the expert comparably far.
  # fwd_chunk_experts × fwd_chunk_images: the block of expert forward passes (initial-image selection, soft labels,
  # expert test accuracy) the device holds at once; one compiled shape, the last block padded.
  # lr 0.03: stronger experts than at 0.01 (experiments/datm/README.md compares them). Every MNIST variant but
  # ipc10_n10/ipc10_n25 shares them, so one buffer serves all (--config.experts.dir).
  c.experts = dict(num=3, epochs=8, lr=0.03, batch=64, momentum=0.0, weight_decay=0.0, dsa=True,
                   gsam=False, gsam_rho=0.01, gsam_alpha=0.3, parallel=3, dir="",
                   vmap=False,  # vmap=False: on XLA:CPU an unrolled loop over networks beats vmap (grouped conv)
                   fwd_chunk_experts=10, fwd_chunk_images=1000)
  c.distill = dict(
      ipc=10, iterations=120, syn_steps=10, expert_epochs=2, min_start_epoch=0, max_start_epoch=6,
      sequential=True, current_max_start_epoch=3, expansion_end=80, batch_syn=50,
      lr_img=100.0, lr_lr=1e-5, lr_y=2.0, momentum_img=0.5, momentum_lr=0.5, momentum_y=0.9,
      threshold=1.0, init="correct", soft_labels=True, learn_labels=True, learn_lr=True,
      lr_init=0.03, lr_param="log_sgd", lr_min=1e-4, lr_max=1.0,
      unroll=True, remat=False,
      # augment the N minibatches of an iteration in one call before the inner loop, not inside each (rematerialised)
      # step: the same function, less time per iteration on CPU (benchmarks/results/datm_step_hoist.json)
      hoist_dsa=True,
      log_every=10, ckpt_every=50, max_nonfinite=20,
      spike_factor=0.0,  # > 0: skip updates whose image gradient exceeds spike_factor × its running mean (not in DATM)
      # every eval_every iterations (0 = off) train eval_nets fresh nets for eval_epochs on the current set; the best
      # set so far is kept in <workdir>/best_synthetic.npz (DATM's periodic evaluation, shorter here).
      eval_every=0, eval_nets=2, eval_epochs=50)
  # init: also evaluate the initial synthetic set (real images + soft labels, learned α, no image updates), so a
  # run shows what the trajectory matching adds on top of DATM's initialisation.
  c.eval = dict(num=5, epochs=150, batch=128, momentum=0.9, weight_decay=5e-4, lr_real=0.01, full_epochs=3,
                random=True, full=True, vmap=False, init=True,
                cross=True,  # (final images, initial labels) and (initial images, final labels)
                cross_arch=())  # other architectures trained on the distilled set, e.g. ("mlp", "lenet", "resnet18")
  # A synthetic.npz (x, y, lr, labels) to evaluate on its own: no experts, no distillation (the 'evaluate' variant).
  c.synthetic = ""
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The DATM config for variant ``arg`` (see module docstring)."""
  a = parse_arg(arg, variants=VARIANTS, seed=0)
  c = _base()
  c.variant, c.seed = a.variant, a.seed
  d = c.distill
  if a.variant == "smoke":
    c.data.dataset = "digits"
    c.model.update(depth=2, width=8)
    c.experts.update(num=3, epochs=5, batch=32, parallel=3, lr=0.01)
    d.update(ipc=1, iterations=30, syn_steps=5, batch_syn=10, max_start_epoch=3, sequential=False,
             current_max_start_epoch=3, lr_y=5.0, log_every=5, ckpt_every=10, lr_init=0.01)
    c.eval.update(num=3, epochs=40, full_epochs=1, full=False, cross=False)
  elif a.variant == "ipc1":
    # N = 25 (the paper's ratio, as the default)
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
  elif a.variant in ("", "ipc10", "ipc10_n25"):
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
    # lr_img 30, not the 100 the other variants keep (experiments/datm/README.md compares 10 / 30 / 100)
    d.update(lr_img=30.0)
    c.experts.update(lr=0.01)
    d.update(lr_init=0.01)
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
  from lmx.methods.datm.checks import validate  # pylint: disable=g-import-not-at-top
  validate(c, for_run=False)  # the evaluate variant gets its --config.synthetic from the command line
  return c
