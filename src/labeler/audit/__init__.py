"""Human audits of the judges' labels: a probability sample of labeled features for people
to decide (``design``), and the estimates their decisions correct (``estimate``)."""
