"""The 5.1M-parameter test model (jinfer/test_model) on one device: the tests' server config (fast to
compile and to run; its text is weak).

  python tools/launch_server.py --config=configs/test_5m.py --config.serving.port=50051
"""

from jinfer.launch import default_config


def get_config():
    c = default_config()
    c.model.path = "test-5m"
    c.model.dtype = "float32"
    c.cache.page_size = 16
    c.cache.num_pages = 512  # 8192 tokens of KV: 16 MiB for this model
    c.scheduler.max_num_batched_tokens = 256
    c.scheduler.max_num_seqs = 32
    c.scheduler.max_model_len = 512  # the model was trained on 256-token blocks
    c.engine.warmup = True
    c.engine.compilation_cache = "~/.cache/jinfer/xla"  # restarts skip most compilation
    c.serving.port = 50051
    # First = highest priority. Targets (TTFT ms : TPOT ms [: weight]) as the demo judges them on
    # 2 CPU cores: GetServerStats and /metrics count each tier's goodput by them, and
    # --config.engine.scheduling_policy=slo schedules by them.
    c.serving.tiers = ("interactive:250:50:4", "batch:2000:100")
    c.serving.metrics_port = 9090
    return c
