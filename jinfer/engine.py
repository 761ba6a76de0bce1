"""The engine: requests in, per-step outputs out. Glue between scheduler, runner and detokenizer."""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid

import jax

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.detokenizer import IncrementalDetokenizer
from jinfer.request import Request, RequestOutput, Status, Usage
from jinfer.runner import ModelRunner
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler, SchedulingPolicy, StepPlan

DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jinfer", "xla")


def enable_compilation_cache(path: str = DEFAULT_COMPILATION_CACHE) -> None:
    """JAX's persistent compilation cache: restarts reuse compiled step buckets."""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class Engine:
    """Continuous batching over a paged KV cache.

    add_request() queues work; each step() schedules one batch, runs it and returns the
    requests' new tokens and text; generate() loops step() until a batch of prompts finishes.
    """

    def __init__(self, model, tokenizer, cache_config: CacheConfig = CacheConfig(),
                 scheduler_config: SchedulerConfig = SchedulerConfig(),
                 policy: SchedulingPolicy | None = None, *, warmup: bool = False,
                 compilation_cache: str | None = None):
        if compilation_cache:
            enable_compilation_cache(compilation_cache)
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.sched_cfg = scheduler_config
        self.runner = ModelRunner(model, cache_config, scheduler_config)
        self.scheduler = Scheduler(cache_config, scheduler_config, self.runner.num_pages, policy)
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()
        self._seed_rng = random.Random(0)
        self.eos_ids = set(tokenizer.eos_ids) | set(model.config.eos_token_ids)
        if warmup:
            self.runner.warmup()

    # -- API -------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        """Queues a request; raises ValueError naming the bad value. Returns its id."""
        params = params or SamplingParams()
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt is empty")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        limit = self.sched_cfg.max_model_len
        if len(ids) + params.max_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len={limit}")
        if len(ids) + params.max_tokens > self.runner.num_pages * self.runner.page_size:
            raise ValueError(f"prompt + max_tokens = {len(ids) + params.max_tokens} tokens cannot fit "
                             f"in the KV pool ({self.runner.num_pages} pages)")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        seed = params.seed if params.seed is not None else self._seed_rng.randrange(2**31)
        req = Request(request_id, ids, params, seed, time.monotonic(), next(self._arrivals),
                      priority=priority)
        self.requests[request_id] = req
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its pages; False if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self._detok.pop(request_id, None)
        self.scheduler.finish(req)
        req.status, req.finish_reason = Status.FINISHED, "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.seqs:
            return []
        tokens, logprobs = self.runner.execute(plan)
        return self._postprocess(plan, tokens, logprobs)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Runs prompts to completion; returns each one's final output, in prompt order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while any(i not in final for i in ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    # -- after the device step -----------------------------------------------------------------

    def _postprocess(self, plan: StepPlan, tokens, logprobs) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for seq, token, logprob in zip(plan.seqs, tokens, logprobs):
            req = self.requests[seq.request_id]
            req.num_computed_tokens += len(seq.token_ids)
            if not seq.sample:
                continue
            if len(seq.token_ids) > 1:
                self.scheduler.on_prefill_done(req)
            token = int(token)
            req.output_ids.append(token)
            req.output_logprobs.append(float(logprob))
            if req.first_token_time is None:
                req.first_token_time = now
            detok = self._detok[req.request_id]
            detok.append(token)
            reason = self._finish_reason(req, token, detok)
            if reason:
                req.status, req.finish_reason, req.finish_time = Status.FINISHED, reason, now
                self.scheduler.finish(req)
                del self.requests[req.request_id], self._detok[req.request_id]
            outputs.append(self._output(req, detok, n_new=1))
        return outputs

    def _finish_reason(self, req: Request, token: int, detok: IncrementalDetokenizer) -> str | None:
        if detok.find_stop():
            return "stop"  # text already cut before the stop string; nothing pending is emitted
        p = req.params
        eos = (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
        length = len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.sched_cfg.max_model_len
        if not (eos or length):
            return None
        detok.flush()
        if detok.find_stop():
            return "stop"
        return "stop" if eos else "length"

    def _output(self, req: Request, detok: IncrementalDetokenizer, n_new: int) -> RequestOutput:
        finished = req.status is Status.FINISHED
        new_ids = req.output_ids[-n_new:]
        return RequestOutput(
            request_id=req.request_id, new_token_ids=new_ids, new_text=detok.delta(finished),
            new_logprobs=req.output_logprobs[-n_new:] if req.params.logprobs else None,
            token_ids=list(req.output_ids), text=detok.text[:detok.emitted], finished=finished,
            finish_reason=req.finish_reason,
            usage=Usage(len(req.prompt_ids), len(req.output_ids), req.num_cached_prompt_tokens),
            arrival_time=req.arrival_time, first_token_time=req.first_token_time,
            finish_time=req.finish_time)
