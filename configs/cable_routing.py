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
from lmx.core import blocks
from lmx.core.config import parse_arg
from lmx.core.schema import F, build

VARIANTS = ("", "smoke", "berkeley_cable_routing")

_COUNT = dict(ge=1, integer=True)  # a positive whole number


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS, seed=0)
  c = build("cable_routing", dict(
      variant=F(a.variant, choices=VARIANTS),
      # 'sim' (lmx.envs.cable) | 'oxe' (berkeley_cable_routing, the route BC policy only)
      source=F("sim", choices=("sim", "oxe")),
      seeds=F((0, 1, 2), each=dict(ge=0, integer=True), nonempty=True),
      # the simulator; decisions >= 2 * clips (a goto and a route per clip; the driver checks)
      env=dict(clips=F(3, **_COUNT), particles=F(28, ge=8, integer=True), p_snag=F(0.03, ge=0, le=1),
               slip_stretch=F(1.08, gt=1), res=F(32, ge=8, integer=True), decisions=F(12, ge=2, integer=True),
               steps=F(12, **_COUNT), goto_sigma=F(0.015, ge=0)),
      demos=dict(
          # training layouts 0..episodes-1, one noisy oracle episode each (all arms train on these)
          episodes=F(40, **_COUNT),
          action_sigma=F(0.2, ge=0)),
      model=dict(widths=F((8, 16), each=_COUNT, nonempty=True), hidden=F((64, 64), each=_COUNT),
                 history=F(6, **_COUNT), embed=F(4, **_COUNT), selector_hidden=F(64, **_COUNT)),
      train=dict(
          bc_steps=F(400, **_COUNT), sel_steps=F(400, **_COUNT), batch=F(32, **_COUNT),
          augment_shift=F(2, ge=0, integer=True),
          # lmx.core.optim blocks: AdamW, linear warmup then cosine decay to 0, global-norm clipping
          bc_optim=blocks.optim(name="adamw", lr=1e-3, warmup_steps=50, weight_decay=3e-3, clip_norm=1.0),
          sel_optim=blocks.optim(name="adamw", lr=3e-4, warmup_steps=50, weight_decay=1e-2, clip_norm=1.0)),
      dagger=dict(
          # more training layouts (ids after the demos'), rolled out with the learned selector
          episodes=F(16, **_COUNT),
          steps=F(300, **_COUNT),
          optim=blocks.optim(name="adamw", lr=3e-4, warmup_steps=15, weight_decay=1e-2, clip_norm=1.0)),
      # strips: evaluation episodes of the first seed drawn as rollout strips
      eval=dict(episodes=F(32, **_COUNT), batch=F(32, **_COUNT), strips=F(4, ge=0, integer=True)),
      # source='oxe': the prepared tfds data set in data_dir, max_episodes of it (0: all), images resized to res
      real=dict(data_dir="", split="train", max_episodes=F(0, ge=0, integer=True), res=F(64, **_COUNT),
                steps=F(2000, **_COUNT), batch=F(64, **_COUNT)),
  ))

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
