"""The labeling core and the ``labeler`` CLI: judges, the label store, summaries, export."""
