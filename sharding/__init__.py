"""Meshes, logical-axis rules and partition specs for parameters and the KV cache."""
