"""Datasets for pretraining and the shared synthetic shape renderer (the embedded default)."""
