"""Pause policies for requests that wait on tools (InferCept and its baselines)."""
