"""The embedded default model (jinfer/default_model) on one device: what `make demo` serves.

  python tools/launch_server.py --config=configs/default.py --config.serving.port=50051
"""

from jinfer.launch import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # empty: the embedded default model
    c.model.dtype = "float32"
    c.cache.page_size = 16
    c.cache.num_pages = 512  # 8192 tokens of KV: 16 MiB for this model
    c.scheduler.max_num_batched_tokens = 256
    c.scheduler.max_num_seqs = 32
    c.scheduler.max_model_len = 512  # the model was trained on 256-token blocks
    c.engine.warmup = True
    c.engine.compilation_cache = "~/.cache/jinfer/xla"  # restarts skip most compilation
    c.serving.port = 50051
    c.serving.tiers = ("interactive", "batch")  # first = highest priority
    c.serving.metrics_port = 9090
    return c
