"""Catalog formats: the JSONL catalog and the paper's circuit-tracer feature JSON."""
