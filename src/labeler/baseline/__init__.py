"""Control runs: a run's model with a random adapter matched to its firing rates, to read
the run's scores against (``labeler baseline``, docs/baseline.md)."""
