"""Labeling: the engine every transport shares, the run's lock, interrupts, and the
transports that decide where a stage runs.

``plan``        which features to label, their detection negatives
``engine``      units, stage results, outcomes applied exactly once, budget, stopping
``lock``        one labeler per run folder
``interrupts``  Ctrl-C and SIGTERM
``stages``      one stage run in this process
``transports``  ``local`` (in-process); the Celery fleet's driver is ``workers.driver``
"""

from labeler.labeling.engine import Engine, LabelReport
from labeler.labeling.plan import negatives_for, plan_features
from labeler.labeling.stages import run_stage
from labeler.labeling.transports.local import label_judges, label_run

__all__ = [
    "Engine",
    "LabelReport",
    "label_judges",
    "label_run",
    "negatives_for",
    "plan_features",
    "run_stage",
]
