"""Small jittable environments: pure ``reset(key)``/``step(key, state, action)`` functions with static shapes, so
rollouts are ``lax.scan`` and batches of environments are ``vmap`` (PureJaxRL/gymnax style)."""
# lmx.envs.textworld: an adapter over Microsoft TextWorld games (Python-side, not jittable; import it explicitly).
