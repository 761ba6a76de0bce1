"""jinfer: a JAX/XLA research inference stack for Llama-family language models.

Mechanism lives here (configs, model, loading, tokenizer, KV cache, attention backends);
policy lives in `scheduler/`, sharding in `sharding/`, kernels in `pallas_kernels/`.
"""

import os as _os

__version__ = "0.1.0"

# The embedded default model (HF format): a small Llama trained on the Python standard library
# by tools/train_default_model.py; see its README.md (model card).
DEFAULT_MODEL_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "default_model")
