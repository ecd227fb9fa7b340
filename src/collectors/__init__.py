"""Run a model with its adapter over a corpus and keep, per feature, examples and statistics.

``collectors.run_format`` (no torch) defines the run folder; ``collectors.collect`` does
the work and needs the ``model`` extra.
"""
