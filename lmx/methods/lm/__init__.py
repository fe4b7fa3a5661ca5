from lmx.methods.lm.run import run  # noqa: F401
