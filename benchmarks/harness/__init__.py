"""Orchestrator of the machinery benchmark harness (run with benchmarks/run.py)."""
