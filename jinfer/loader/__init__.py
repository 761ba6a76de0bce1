"""Reading HF checkpoint directories."""
