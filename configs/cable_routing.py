r"""Multi-stage cable routing through hierarchical imitation learning (Luo, Xu et al., arXiv 2307.08927) in miniature.

  python launch/run.py --config=configs/cable_routing.py --workdir=runs/cable
  python launch/run.py --config=configs/cable_routing.py:smoke --workdir=runs/cable-smoke
  python launch/run.py --config=configs/cable_routing.py:berkeley_cable_routing --workdir=runs/cable-real \
      --config.real.data_dir=~/tensorflow_datasets

Variants: ``smoke`` (CI: a few episodes and steps), default (the 2-D PBD cable of ``lmx.envs.cable``: demos on
training layouts, route BC + flat BC + the selector (+ DAgger), evaluation on held-out layouts, 3 seeds; CPU),
``berkeley_cable_routing`` (the Open X-Embodiment robot data set: the route BC policy on its wrist images and
end-effector velocities; needs the data set prepared once, see ``lmx/methods/cable_routing/oxe.py``).
"""
import ml_collections

from lmx.core.config import parse_arg

VARIANTS = ("", "smoke", "berkeley_cable_routing")


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS, seed=0)
  c = ml_collections.ConfigDict()
  c.method = "cable_routing"
  c.variant = a.variant
  c.source = "sim"  # 'sim' (lmx.envs.cable) | 'oxe' (berkeley_cable_routing, the route BC policy only)
  c.seeds = (0, 1, 2)
  c.env = ml_collections.ConfigDict(dict(
      clips=3, particles=28, p_snag=0.03, slip_stretch=1.08, res=32, decisions=12, steps=12, goto_sigma=0.015))
  c.demos = ml_collections.ConfigDict(dict(
      episodes=40,  # training layouts 0..episodes-1, one noisy oracle episode each (all arms train on these)
      action_sigma=0.2))
  c.model = ml_collections.ConfigDict(dict(widths=(8, 16), hidden=(64, 64), history=6, embed=4,
                                           selector_hidden=64))
  c.train = ml_collections.ConfigDict(dict(
      bc_steps=400, sel_steps=400, batch=32, augment_shift=2,
      # lmx.core.optim blocks: AdamW, linear warmup then cosine decay to 0, global-norm clipping
      bc_optim=dict(name="adamw", lr=1e-3, warmup_steps=50, weight_decay=3e-3, clip_norm=1.0),
      sel_optim=dict(name="adamw", lr=3e-4, warmup_steps=50, weight_decay=1e-2, clip_norm=1.0)))
  c.dagger = ml_collections.ConfigDict(dict(
      episodes=16,  # more training layouts (ids after the demos'), rolled out with the learned selector
      steps=300, optim=dict(name="adamw", lr=3e-4, warmup_steps=15, weight_decay=1e-2, clip_norm=1.0)))
  c.eval = ml_collections.ConfigDict(dict(episodes=32, batch=32, strips=4))
  c.real = ml_collections.ConfigDict(dict(data_dir="", split="train", max_episodes=0, res=64, steps=2000,
                                          batch=64))

  if a.variant == "smoke":
    c.seeds = (0,)
    c.env.update(decisions=8, steps=10)
    c.demos.update(episodes=4)
    c.train.update(bc_steps=3, sel_steps=3, batch=8)
    c.train.bc_optim.warmup_steps = c.train.sel_optim.warmup_steps = 1
    c.model.update(widths=(4, 8), hidden=(16,), selector_hidden=16)
    c.dagger.update(episodes=2, steps=2)
    c.dagger.optim.warmup_steps = 1
    c.eval.update(episodes=2, batch=2, strips=1)
  elif a.variant == "berkeley_cable_routing":
    c.source = "oxe"
    c.seeds = (24,)  # the released script's seed
    c.real.update(steps=20000, batch=256)  # train_routing_bc.sh: batch 256, 20k steps, lr 1e-3, wd 3e-3
  return c
