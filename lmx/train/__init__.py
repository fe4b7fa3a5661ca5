"""Stages shared by several methods (LM pretraining, loading a base model); no method imports another method."""
