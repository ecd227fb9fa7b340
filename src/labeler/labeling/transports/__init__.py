"""Transports decide where a stage runs; the engine (``labeling.engine``) does the rest.

``local``: an asyncio loop in this process. The Celery fleet's driver lives in
``workers.driver`` (it needs the fleet extra); provider batch APIs are a third.
"""
