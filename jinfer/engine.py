"""The engine: requests in, per-step outputs out. Glue between scheduler, runner and detokenizer."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import random
import time
import uuid

import jax

from jinfer.attention import MAX_TREE_TOKENS, default_attention_backend, get_backend
from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig, Tier
from jinfer.detokenizer import IncrementalDetokenizer
from jinfer.engine_migration import Migrating
from jinfer.engine_output import Postprocessing
from jinfer.engine_resume import Resuming
from jinfer.engine_weights import WeightUpdating
from jinfer.errors import PlanRejected, StepFailed, shorten
from jinfer.host_kv import HostKVTier
from jinfer.models.llama import set_attention_backend
from jinfer.pausing import PausePolicy
from jinfer.prefix_cache import EvictionLog
from jinfer.programs import ProgramStore
from jinfer.request import Request, RequestOutput
from jinfer.runner import ModelRunner
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler
from jinfer.scheduling_policy import SchedulingPolicy
from jinfer.speculation import DraftBudget, Drafter
from jinfer.step_plan import SpecStats, StepPlan
from sharding.tp import TPLayout

log = logging.getLogger(__name__)

DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jinfer", "xla")


def enable_compilation_cache(path: str = DEFAULT_COMPILATION_CACHE, min_compile_secs: float = 0.0) -> None:
    """JAX's persistent compilation cache: restarts reuse compiled step buckets.

    Programs that compile faster than min_compile_secs are not written. The default keeps
    every program: a restart's many small ones (pool allocation, weight placement) add up to
    seconds, which the start-to-first-token budget does not have.
    """
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    """What the engine holds now: the front door for servers, metrics and routers."""

    waiting: int  # requests (samples) queued, preempted ones included
    running: int
    num_pages: int  # KV pool size
    free_pages: int  # pages in no request and no prefix-cache node
    cached_pages: int  # pages the prefix cache indexes
    page_size: int


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the engine is: fixed from construction (or the last reshard, for tp)."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    page_size: int
    num_pages: int
    attention_backend: str
    tp: int


class Engine(Postprocessing, Migrating, Resuming, WeightUpdating):
    """Continuous batching over a paged KV cache.

    add_request() queues work; each step() schedules one batch, runs it and returns the
    requests' new tokens and text; generate() loops step() until a batch of prompts finishes.

    With async_scheduling (the default) step() dispatches step N+1 before reading step N's
    tokens, so the host's scheduling, array building and detokenizing overlap the device's
    work. Outputs then arrive one step() call later, and a request that stops on EOS or a
    stop string computes one token that is thrown away; tokens are the same either way.

    Reading a step back (engine_output.py), requests moving to another engine or mesh
    (engine_migration.py), paused requests' resume and host-tier swaps (engine_resume.py) and
    weight updates (engine_weights.py) are its mixins.
    """

    def __init__(self, model, tokenizer, cache_config: CacheConfig = CacheConfig(),
                 scheduler_config: SchedulerConfig = SchedulerConfig(),
                 policy: SchedulingPolicy | None = None, options: EngineOptions = EngineOptions(), *,
                 mesh=None, progress: bool = False, drafter: Drafter | None = None,
                 max_spec_tokens: int = 8, draft_budget: DraftBudget | None = None,
                 pause_policy: PausePolicy | None = None, programs: ProgramStore | None = None):
        """options: how steps run (async scheduling, warm-up, compilation cache, attention
        backend, vocabulary-parallel embedding under tp). mesh: a 1-D `tp` mesh
        (sharding.tp.make_mesh) to run tensor-parallel; None = one device. progress: show a
        progress bar while warm-up compiles the step buckets. drafter: speculative decoding
        (jinfer.speculation) with drafts of up to max_spec_tokens tokens, trimmed by
        draft_budget when given (it hears every step's size and time); None: off. Steps that
        carry drafts, chains or trees, pipeline like plain ones (options.drafts_in_flight). model may
        hold the weights' shapes only (one device): update_weights() then brings the arrays.
        pause_policy: what happens to the K/V of a request paused at one of its
        intercept_token_ids until resume() (jinfer.pausing; default: discarded into the prefix
        cache). programs: compiled step programs shared with other engines of this model
        (jinfer.programs; Instances keeps one so that a regroup takes what precompile compiled)."""
        max_spec_tokens = max_spec_tokens if drafter is not None else 0
        if not 0 <= max_spec_tokens < MAX_TREE_TOKENS:
            raise ValueError(f"max_spec_tokens={max_spec_tokens} must be in [0, {MAX_TREE_TOKENS})")
        self.options = options
        if options.compilation_cache:
            enable_compilation_cache(options.compilation_cache)
        self.vocab_parallel = vocab_parallel = options.vocab_parallel
        layout = None if mesh is None else TPLayout.for_model(model.config, mesh, vocab_parallel)  # may refuse tp
        if options.launch_thread and mesh is not None and jax.process_count() > 1:
            raise ValueError(f"launch_thread=True needs one process; this mesh spans {jax.process_count()}")
        # "xla" or "pallas"; empty picks pallas on NVIDIA GPUs and xla elsewhere.
        self.attention_backend = options.attention_backend or default_attention_backend()
        set_attention_backend(model, self.attention_backend)
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.sched_cfg = scheduler_config
        self.async_scheduling = options.async_scheduling
        self.runner = ModelRunner(model, cache_config, scheduler_config, layout,
                                  decode_steps=get_backend(self.attention_backend).decode_path,
                                  max_spec_tokens=max_spec_tokens, min_token_bucket=options.min_token_bucket,
                                  programs=programs, launch_thread=options.launch_thread)
        self.eos_ids = set(tokenizer.eos_ids) | set(model.config.eos_token_ids)
        self.scheduler = Scheduler(cache_config, scheduler_config, self.runner.num_pages, policy,
                                   drafter, max_spec_tokens, draft_budget if max_spec_tokens else None,
                                   pause_policy, eos_ids=self.eos_ids,
                                   drafts_in_flight=options.drafts_in_flight and options.async_scheduling)
        self.host_kv = HostKVTier()  # paused requests' K/V swapped out of the pool
        self.scheduler.trees = self.runner.trees  # a model the tree mask cannot serve gets chains
        self.scheduler.token_buckets = self.runner.token_buckets
        self._groups: dict[str, list[Request]] = {}  # public id -> its samples still running
        # (plan, its Requests, runner handle, it compiled, drafting mode, pipelined) not yet read
        self._inflight = None
        self._last_read, self._busy = 0.0, False  # perf_counter of the last read; step() left work (_observe)
        self._held_outputs: list[RequestOutput] = []  # read back early (reshard), not yet returned
        self._arrivals = itertools.count()
        self._seed_rng = random.Random(0)
        self._warmup_thread = None
        if options.warmup and options.warmup_background:  # the rest from the first step or release_warmup()
            self._warmup_thread = self.runner.warmup_background(progress, hold=True)
        elif options.warmup:
            self.runner.warmup(progress)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, tier: Tier | None = None,
                    intercept_after: int | None = None) -> str:
        """Queues a request (params.n samples); raises ValueError naming the bad value, or
        jinfer.scheduling_policy.AdmissionRefused when the scheduling policy's admission check refuses
        it. priority: the policy's hint (a tier's rank, lower first); tier: its SLO targets.
        intercept_after: pause it after that many output tokens, as if it had sampled an
        intercept token there (replaying a trace whose tool calls' positions are known)."""
        if intercept_after is not None and not 1 <= intercept_after:
            raise ValueError(f"intercept_after={intercept_after} must be >= 1")
        params = params or SamplingParams()
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt is empty")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._groups or "/" in request_id:
            raise ValueError(f"request_id={shorten(request_id)} is already in use or contains '/'")
        seed = params.seed if params.seed is not None else self._seed_rng.randrange(2**31)
        arrival, index = time.monotonic(), next(self._arrivals)
        samples = [Request(request_id if i == 0 else f"{request_id}/{i}", list(ids), params, seed,
                           arrival, index, priority=priority, tier=tier, sample_group=i,
                           intercept_after=intercept_after)
                   for i in range(params.n)]
        self.scheduler.admit(samples[0])
        for req in samples:  # its text: the settling applies stop and intercept strings to it
            req.text = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.intercept)
        self._groups[request_id] = samples
        # The first sample computes the prompt; the scheduler starts the others on its pages.
        samples[0].followers = samples[1:]
        self.scheduler.add(samples[0])
        return request_id

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError naming the problem if add_request would refuse these prompt ids for
        their length or vocabulary. Reads only fixed configuration: safe from any thread (a
        server checks before it admits)."""
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

    def abort(self, request_id: str) -> bool:
        """Stops all samples of a request and frees their pages; False if unknown or finished."""
        samples = self._groups.pop(request_id, None)
        if samples is None:
            return False
        for req in samples:
            self.host_kv.drop(req.request_id)
        self.scheduler.abort(samples)
        return True

    def release_warmup(self) -> None:
        """Starts a held background warm-up's other buckets (a server calls it once it listens)."""
        self.runner.release_warmup()

    def stop_warmup(self, timeout: float | None = None) -> None:
        """Stops a background warm-up after the compilation under way (servers, on shutdown)."""
        self.runner.stop_warmup(timeout)

    def warming_up(self) -> bool:
        """Whether a background warm-up (options.warmup_background) is still compiling buckets."""
        return not self.runner.wait_warmup(0)

    def has_unfinished(self) -> bool:
        """Whether a request is unfinished, or outputs read back early (reshard, migration)
        wait for the next step() to return them."""
        sched = self.scheduler  # (paused requests are not: they wait for resume())
        return bool(sched.running or sched.waiting or self._held_outputs)

    def load(self) -> EngineLoad:
        sched = self.scheduler
        return EngineLoad(len(sched.waiting), len(sched.running), self.runner.num_pages,
                          sched.kv.num_free, sched.kv.num_cached, self.runner.page_size)

    def info(self) -> EngineInfo:
        cfg, layout = self.sched_cfg, self.runner.layout
        return EngineInfo(self.model_config.vocab_size, cfg.max_model_len, cfg.max_num_seqs,
                          cfg.max_num_batched_tokens, self.runner.page_size, self.runner.num_pages,
                          self.attention_backend, 1 if layout is None else layout.mesh.size)

    def set_drafter(self, drafter: Drafter | None, budget: DraftBudget | None = None) -> None:
        """Swaps the drafter and its budget (e.g. fresh ones per experiment) while no request is
        unfinished. An engine built without a drafter stays without (its steps were compiled
        for plain decoding)."""
        if self.has_unfinished() or self.scheduler.paused:
            raise ValueError("set_drafter: requests are still running or paused; wait until has_unfinished() "
                             "is False and none is paused")
        if drafter is not None and not self.runner.max_spec_tokens:
            raise ValueError("set_drafter: this engine was built without a drafter (max_spec_tokens=0)")
        self.scheduler.drafter, self.scheduler.budget = drafter, budget

    @property
    def policy(self) -> SchedulingPolicy:
        """The scheduling policy ordering this engine's queue (its counters, e.g. SloAware's
        demotions, are what servers report)."""
        return self.scheduler.policy

    def spec_stats(self) -> SpecStats:
        """Speculation since start (all zero without a drafter): drafted, accepted, verifying
        steps, drafter time. A snapshot."""
        return dataclasses.replace(self.scheduler.spec)

    def eviction_log(self, wanted=lambda: True) -> EvictionLog | None:
        """This engine's prefix-cache evictions (KVManager.eviction_log): drain it between steps."""
        return self.scheduler.kv.eviction_log(wanted)

    def reset_prefix_cache(self) -> int:
        """Drops every prefix-cache page no request holds (between steps); returns how many."""
        cache = self.scheduler.prefix_cache
        return cache.clear() if cache is not None else 0

    def reset(self) -> None:
        """Forgets every request and the prefix cache: no request queued or running, every KV
        page free. The weights, the KV pool's arrays, the compiled steps, the policy and the
        speculation counters stay, so nothing recompiles. A step in flight is dropped unread.

        For a server whose engine loop crashed: the books may be half-updated, so they are
        replaced by a fresh scheduler rather than unwound request by request (a new prefix
        cache has no eviction log: take a new one with eviction_log())."""
        old = self.scheduler
        try:  # the drafter and draft budget hear that these requests ended, if the old books allow
            old.abort([r for group in self._groups.values() for r in group])
        except Exception:  # noqa: BLE001 - their pages go with the old scheduler anyway
            log.exception("reset: the old scheduler could not abort its requests; dropping it as it is")
        fresh = Scheduler(self.runner.cache_cfg, self.sched_cfg, self.runner.num_pages, old.policy,
                          old.drafter, old.max_spec_tokens, old.budget, old.pause_policy, old.clock,
                          eos_ids=old.eos_ids, drafts_in_flight=old.drafts_in_flight)
        fresh.trees, fresh.token_limit, fresh.spec = old.trees, old.token_limit, old.spec
        fresh.token_buckets = old.token_buckets
        if hasattr(old.policy, "bind"):  # a policy reading the books (its prefix cache) follows them
            old.policy.bind(fresh)
        self.scheduler = fresh
        self._groups = {}
        self._inflight, self._held_outputs, self._busy = None, [], False
        self.runner.drop_launch()  # one under way in the launch thread goes too, its error with it
        self.host_kv = HostKVTier()

    def is_unfinished(self, request_id: str) -> bool:
        """Whether some sample of the request is still queued or running."""
        return request_id in self._groups

    def unfinished_ids(self) -> list[str]:
        """The public ids of the requests with a sample queued, running or paused here."""
        return list(self._groups)

    def samples(self, request_id: str) -> list[Request]:
        """The Request objects of an unfinished request's samples by sample index (one that
        finished stays until its siblings do); ValueError if it is not unfinished here."""
        if request_id not in self._groups:
            raise ValueError(f"request_id={shorten(request_id)} is not unfinished in this engine")
        return list(self._groups[request_id])

    @property
    def step_in_flight(self) -> bool:
        """Whether a dispatched step's tokens are not yet read back (async scheduling: the
        next step(), or anything that settles the step first, reads them)."""
        return self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Schedules and dispatches one step; returns what the previous one (async) or this
        one (sync) produced.

        With a drafter and async scheduling, steps carrying drafts (chains or trees) pipeline as
        plain ones do (options.drafts_in_flight; off: a step with drafts runs synchronously, and
        a step in flight is settled before drafts resume).
        RuntimeError, and nothing changes, while an engine built on the weights' shapes awaits
        them (update_weights)."""
        if self.runner.awaiting_weights:
            raise RuntimeError("the engine was built on the model's shapes: update_weights() before step()")
        start = time.perf_counter()
        # idle (or out-of-band work) since the last step was read: no step's time; busy again at the end
        self._last_read, self._busy = self._last_read if self._busy else start, False
        drafts = self.scheduler.drafter is not None and self.scheduler.wants_drafts()
        outputs, self._held_outputs = self._held_outputs, []
        if drafts and self._inflight is not None and not self.scheduler.drafts_in_flight:  # planned on read tokens
            done, self._inflight = self._inflight, None
            outputs += self._postprocess(*done)
        if self._warmup_thread is not None:  # steps stay within the buckets compiled so far
            self.runner.release_warmup()
            ready = self.runner.ready_tokens()
            self.scheduler.token_limit = None if ready >= self.sched_cfg.max_num_batched_tokens else ready
            if self.scheduler.token_limit is None:
                self._warmup_thread = None
        plan = self.scheduler.schedule(drafts=drafts)
        self._swap(plan)
        launched = None
        if plan.seqs:
            reqs = [self._request(seq.request_id) for seq in plan.seqs]
            try:
                # (pipelined: the step before it was not read yet, so the time from that read to this
                # step's is one pipeline period, not its planning, dispatch and whole device time)
                launched = (plan, reqs, self.runner.dispatch(plan), self.runner.compiled_last, drafts,
                            self._inflight is not None)
            except PlanRejected as e:
                self._held_outputs = outputs + self._held_outputs  # the next step returns them
                self.scheduler.unplan(plan, reqs)
                raise self._blame(plan, e.__cause__) from e
        done, self._inflight = self._inflight, launched
        if done and launched and launched[3]:  # this step compiled before the last one was read
            done = (*done[:3], True, *done[4:])
        outputs += self._postprocess(*done) if done else []
        sync = not self.async_scheduling or any(self.scheduler.read_first(seq) for seq in plan.seqs)
        if sync and self._inflight:
            done, self._inflight = self._inflight, None
            outputs += self._postprocess(*done)
        self._busy = bool(self.scheduler.running or self.scheduler.waiting)  # the caller steps again at once
        return outputs

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Runs prompts to completion; returns the final outputs in prompt order (n per prompt,
        by sample index). It runs them as a closed batch (closed_batch)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        if any(sp is not None and (sp.intercept_token_ids or sp.intercept) for sp in params):
            raise ValueError("generate() runs requests to their finish; a request with intercept_token_ids "
                             "pauses at a tool call: add_request, step and resume it instead")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        want = {(i, k) for i, sp in zip(ids, params) for k in range((sp or SamplingParams()).n)}
        final: dict[tuple[str, int], RequestOutput] = {}
        with self.closed_batch():
            while len(final) < len(want):
                for out in self.step():
                    if out.finished and (out.request_id, out.index) in want:
                        final[(out.request_id, out.index)] = out
        return [final[key] for key in sorted(want, key=lambda k: (ids.index(k[0]), k[1]))]

    @contextlib.contextmanager
    def closed_batch(self):
        """Within it the caller adds no request until every one in the engine (those added
        before too) is done: a closed batch, whose drafts keep to the draft budget's lead limit
        (speculation.max_lead, docs/speculation.md). generate() runs in one; a server never."""
        was, self.scheduler.closed_batch = self.scheduler.closed_batch, True
        try:
            yield
        finally:
            self.scheduler.closed_batch = was

    def _blame(self, plan: StepPlan, cause: Exception) -> StepFailed:
        """The requests whose own sequence cannot be built into a step (each tried alone, on
        the host); every request of the plan if none fails alone."""
        culprits = {}
        for seq in plan.seqs:
            try:
                self.runner.prepare(StepPlan((seq,)))
            except Exception as e:  # noqa: BLE001 - the reason this request is failed
                culprits.setdefault(seq.request_id.partition("/")[0], e)
        if not culprits:
            culprits = {seq.request_id.partition("/")[0]: cause for seq in plan.seqs}
        return StepFailed(culprits, cause)
