"""Llama-3.1-8B on one H100/H200, bf16, Pallas attention.

As written it serves random weights of the 8B shape (`model.preset`) with a byte-level
tokenizer: enough to measure speed and memory without a checkpoint. For the real model:
  python tools/launch_server.py --config=configs/llama3_8b.py \
      --config.model.preset= --config.model.path=/checkpoints/Llama-3.1-8B-Instruct
Tensor parallel over 4 GPUs: --config.model.tp=4.
"""

from jinfer.launch import default_config


def get_config():
    c = default_config()
    c.model.preset = "llama-3.1-8b"
    c.model.dtype = "bfloat16"
    c.engine.attention_backend = ""  # pallas on NVIDIA GPUs
    c.cache.page_size = 16
    c.cache.memory_fraction = 0.85  # num_pages unset: sized from what the weights leave
    c.scheduler.max_num_batched_tokens = 2048
    c.scheduler.max_num_seqs = 128
    c.scheduler.max_model_len = 8192
    c.engine.warmup = True  # every bucket compiled before the first request
    c.engine.compilation_cache = "~/.cache/jinfer/xla"
    c.serving.port = 50051
    # Chat-style targets for an 8B model on one H100/H200 (TTFT ms : TPOT ms [: weight]): a first
    # token within half a second and 50 ms a token (a decode step of 128 sequences of 2k tokens
    # reads ~50 GB of weights and KV: ~15-20 ms at H100 bandwidth, room for prefill chunks);
    # offline batch work within 10 s and 200 ms. Goodput (GetServerStats, /metrics) is counted
    # by them; --config.engine.scheduling_policy=slo schedules by them.
    c.serving.tiers = ("interactive:500:50:4", "batch:10000:200")
    c.serving.max_queued_requests = 1024
    c.serving.metrics_port = 9090
    return c
