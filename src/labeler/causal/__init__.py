"""The causal check of labels: what the model does when the features a label names are
ablated or added (the paper's hesitation study). ``measures``: what is counted in the
model's generations and how effects are compared."""
