"""The Celery worker fleet of the labeler.

Run a worker with ``celery -A workers worker -Q QUEUES``; the queues are named
``STAGE.PROVIDER`` with STAGE in explain, score, classify, label and PROVIDER in
openai, anthropic, local (in-process hf models), heuristic. Settings come from the
environment (see ``workers.settings``).
"""

from workers.app import app

__all__ = ["app"]
