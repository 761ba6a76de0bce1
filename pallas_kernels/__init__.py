"""Attention kernels (decode, ragged prefill+decode, KV write), each with a same-signature jnp
reference. Imports nothing from jinfer."""
