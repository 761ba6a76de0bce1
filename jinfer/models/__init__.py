"""The Llama-family decoder, its config and RoPE."""
