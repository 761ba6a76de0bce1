"""jinfer: a JAX/XLA research inference stack for Llama-family language models.

Mechanism lives here (configs, model, loading, tokenizer, KV cache, attention backends);
policy lives in `scheduler/`, sharding in `sharding/`, kernels in `pallas_kernels/`.
"""

__version__ = "0.1.0"
