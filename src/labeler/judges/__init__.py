"""Judges: explain, score and classify a feature. Built from plain names by the registry."""

from labeler.judges.base import Judge, make_judge, register_backend

__all__ = ["Judge", "make_judge", "register_backend"]
