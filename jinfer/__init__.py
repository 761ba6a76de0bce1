"""jinfer: a JAX/XLA research inference stack for Llama-family language models.

Mechanism lives here (configs, model, loading, tokenizer, KV cache, attention backends);
policy lives in `scheduler/`, sharding in `sharding/`, kernels in `pallas_kernels/`.
"""

import os as _os

__version__ = "0.1.0"

# The embedded test model (HF format, 5.1M parameters): a small Llama trained on the Python
# standard library by tools/train_default_model.py; see its README.md (model card). The default
# model is SmolLM2-135M-Instruct (jinfer.model_store); this one keeps the tests fast.
TEST_MODEL_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "test_model")
