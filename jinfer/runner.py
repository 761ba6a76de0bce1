"""Turns a StepPlan into fixed-shape arrays and runs one jitted step (forward + sampling)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import math
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jinfer.attention import AttentionMetadata, tree_bits_from_parents
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.device_drafts import DraftRows, accepted_paths, move_paths
from jinfer.errors import PlanRejected
from jinfer.kv_cache import KVCache
from jinfer.launching import Launching
from jinfer.programs import ProgramStore
from jinfer.sampling import SamplingArrays, sample
from jinfer.speculation import Draft
from jinfer.step_plan import PENDING, StepPlan
from jinfer.warmup import Warmup
from sharding.distributed import agree_min
from sharding.reshard import reshard_tree

# Pool budget when the device reports no memory statistics (CPU).
_HOST_KV_BUDGET_BYTES = 2 << 30


def buckets(limit: int, smallest: int = 1) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `limit`, with `limit` itself last."""
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)


def pick_bucket(n: int, sizes: tuple[int, ...]) -> int:
    return next(b for b in sizes if b >= n)


def num_pages_for(model_cfg, cache_cfg: CacheConfig, dtype, device=None, shards: int = 1) -> int:
    """Pages that fit in memory_fraction of the device memory left after the weights; with the
    KV heads split over `shards` devices each holds 1/shards of every page."""
    if cache_cfg.num_pages is not None:
        return cache_cfg.num_pages
    stats = (device or jax.devices()[0]).memory_stats() or {}
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    if free <= 0:
        free = _HOST_KV_BUDGET_BYTES
    page_bytes = model_cfg.kv_bytes_per_token(jnp.dtype(dtype).itemsize) * cache_cfg.page_size // shards
    return max(1, int(free * cache_cfg.memory_fraction) // page_bytes)


class ModelRunner(Warmup, Launching):
    """Owns the parameters and the KV cache; executes plans. Never sees Request objects.
    Compiling the step buckets ahead of use (warmup, warmup_background) is its mixin
    (warmup.py), launching a step and reading it back another (launching.py)."""

    def __init__(self, model: nnx.Module, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig,
                 layout=None, *, decode_steps: bool = False, max_spec_tokens: int = 0,
                 min_token_bucket: int = 16, programs: ProgramStore | None = None, launch_thread: bool = False):
        """layout: a sharding.tp.TPLayout to run tensor-parallel on its mesh; None = one device.
        decode_steps: mark steps where every sequence has one new token (AttentionMetadata.
        decode_only) so the attention backend can take its decode path; doubles the variants
        of the buckets that can hold such steps. max_spec_tokens: the longest draft a sequence
        may carry (speculative decoding); a step carrying drafts then samples at every draft
        position (its bucket's drafts variant; a step without keeps one row per sequence).
        min_token_bucket: the smallest token bucket (EngineOptions.min_token_bucket).
        programs: compiled step programs shared with other runners of this model (jinfer.
        programs); None: this runner's own. launch_thread: launch each step from a worker
        thread (EngineOptions.launch_thread).

        The model may hold ShapeDtypeStructs in place of its arrays (jinfer.models.llama.
        abstract_model; one device only): the pool is made and step buckets compile as usual,
        and no step runs until set_weights() brings the arrays (a launch compiles while the
        weights load)."""
        self.max_spec_tokens = max_spec_tokens
        self.programs = programs
        # With a launch thread the last step's launch may still be under way there: `kv` and
        # `_prev_tokens` (its outputs) wait for it (join_launch), so a reader never sees the old ones.
        self._setup_launches(launch_thread)
        # Tree drafts need the attention mask of jinfer.attention.tree_bits (a speculating
        # runner's steps that carry drafts have one: their bucket's drafts variant).
        self.trees = max_spec_tokens > 0 and model.config.sliding_window is None
        self.config = model.config
        self.cache_cfg = cache_cfg
        self.layout = layout
        self.page_size = cache_cfg.page_size
        self.pages_per_seq = math.ceil(sched_cfg.max_model_len / cache_cfg.page_size)
        # Token buckets are powers of two; the sequence bucket is tied to the token bucket
        # (min(tokens, max_num_seqs)), so there is one compiled program per token bucket (more
        # where the backend has a decode path, or with speculation: bucket_keys), compiled on
        # first use.
        self.token_buckets = buckets(sched_cfg.max_num_batched_tokens,
                                     smallest=min(min_token_bucket, sched_cfg.max_num_batched_tokens))
        self.graphdef, self.state = nnx.split(model)
        self.awaiting_weights = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.state))
        if self.awaiting_weights and layout is not None:
            raise ValueError("a tensor-parallel runner needs its weights at construction, not their shapes")
        dtype = model.embed.get_value().dtype
        kv_shards = 1 if layout is None or layout.rules["kv_heads"] is None else layout.mesh.size
        # The memory of a device this process holds; over several processes, the pool every
        # process can afford (its shape is part of the programs they all run).
        device = None if layout is None else _local_device(layout.mesh)
        self.num_pages = num_pages_for(self.config, cache_cfg, dtype, device, shards=kv_shards)
        if layout is not None and cache_cfg.num_pages is None:
            self.num_pages = agree_min(self.num_pages)
        self.max_num_seqs = sched_cfg.max_num_seqs
        self.decode_steps = decode_steps
        if layout is None:
            self.kv = KVCache.create(self.config, self.num_pages, self.page_size, dtype=dtype)
        else:
            self.state = layout.place_state(self.state)
            self.kv = KVCache.create_sharded(self.config, self.num_pages, self.page_size, dtype,
                                             layout.kv_sharding)
        self._bind(layout)

    def set_weights(self, state) -> None:
        """Takes `state` (arrays with the runner's structure, shapes and dtypes, checked by the
        caller: Engine.update_weights) as its weights; steps may run from now on."""
        self.join_launch()  # a launch under way took the old ones
        self.state = state
        self.awaiting_weights = False

    def rows(self, t: int, s: int, drafts: bool = True) -> int:
        """Sampling rows of a (tokens, seqs) bucket: one per sequence, or in the variant for
        steps carrying drafts one per token a sequence's draft adds (at most t)."""
        return min(t, s * (1 + self.max_spec_tokens)) if drafts else s

    def _bind(self, layout) -> None:
        """(Re)creates the jitted step for a layout; compiled buckets are dropped."""
        if getattr(self, "_warm_thread", None) is not None:
            self.stop_warmup()  # its programs are for the old layout
        self._warm_stop, self._warm_go, self._warm_thread = threading.Event(), threading.Event(), None
        self.layout = layout
        max_rows = self._max_rows = max(self.rows(*self.bucket(t)) for t in self.token_buckets)
        step = functools.partial(_step, self.graphdef, max_rows, self.max_spec_tokens)
        # The last dispatched step's sampled ids (on device) and which row each request got:
        # PENDING tokens in the next plan are read from here without a host round trip, with
        # the shortfall of each sequence's draft (drafts in flight: _step).
        self._prev_tokens = (jnp.zeros(max_rows, jnp.int32), jnp.zeros(max_rows, jnp.int32))
        if layout is None:
            self._step = jax.jit(step, donate_argnums=(1,))
        else:
            kv_out = jax.tree.map(lambda _: layout.kv_sharding, self.kv)
            self._prev_tokens = jax.device_put(self._prev_tokens, layout.replicated)
            rep = layout.replicated
            self._step = jax.jit(step, donate_argnums=(1,), out_shardings=(rep, rep, kv_out, (rep, rep)))
        self._compiled: dict[tuple[int, int, bool, bool], object] = {}
        self._warming: set = set()  # bucket keys a background warm-up has yet to compile
        self._prev_rows: dict[str, int] = {}
        self._seen: set = set()  # bucket keys run since the last bind
        self._first_use_compiles = 0  # programs compiled on a step's dispatch for the ProgramStore
        self.compiled_last = False
        kv_out = None if layout is None else jax.tree.map(lambda _: layout.kv_sharding, self.kv)
        self._gather = jax.jit(_gather_pages, out_shardings=kv_out)
        self._scatter = jax.jit(_scatter_pages, donate_argnums=(0,), out_shardings=kv_out)

    def reshard(self, layout):
        """Moves weights and the KV pool to a new TP layout (no step may be in flight).

        Page ids and tables are unchanged: the pool keeps its pages, only which device holds
        which KV heads changes. Returns sharding.reshard.MoveStats for weights and for KV.
        """
        if self.awaiting_weights:
            raise RuntimeError("the runner has the weights' shapes only: set_weights() before reshard()")
        self.join_launch()  # a launch under way reads the weights this moves
        self.state, weights = reshard_tree(self.state, layout.state_shardings(self.state))
        kv_targets = jax.tree.map(lambda _: layout.kv_sharding, self.kv)
        self.kv, kv = reshard_tree(self.kv, kv_targets)
        self._bind(layout)
        return weights, kv

    def read_pages(self, pages: Sequence[int]) -> KVCache:
        """The K/V of `pages`, every layer, gathered into a pool of their own on this runner's
        devices (padded to a power of two by repeating the last page). No step may be in flight."""
        with self._mesh():
            return self._gather(self.kv, _padded(pages, 1 << (len(pages) - 1).bit_length()))

    def write_pages(self, pages: Sequence[int], data: KVCache):
        """Writes read_pages output (from this runner or another, on any devices) into `pages`
        of this pool: the data moves onto this pool's sharding first, each device receiving
        only the heads it holds. Returns sharding.reshard.MoveStats of that move."""
        target = self.kv.k[0].sharding
        data, stats = reshard_tree(data, jax.tree.map(lambda _: target, data))
        with self._mesh():
            self.kv = self._scatter(self.kv, data, _padded(pages, data.num_pages))
        return stats

    def _mesh(self):
        """Steps are traced with the mesh set, so backends that partition by hand see it."""
        return contextlib.nullcontext() if self.layout is None else jax.set_mesh(self.layout.mesh)

    def bucket(self, num_tokens: int) -> tuple[int, int]:
        """(tokens, seqs) padded shape of a step with num_tokens tokens (and so at most that
        many sequences)."""
        t = pick_bucket(num_tokens, self.token_buckets)
        return t, min(t, self.max_num_seqs)

    def bucket_keys(self) -> list[tuple[int, int, bool, bool]]:
        """Every (tokens, seqs, decode_only, drafts) variant a plan can map to. A step without
        drafts (every prefill, a decode without speculation) takes a program with one sampling
        row per sequence and no tree mask; with speculation, one carrying drafts takes the
        variant with a row per draft token (and the tree mask where trees are drafted). A
        decode-only step carries no draft (its tokens are its sequences')."""
        keys = [(*self.bucket(t), False, False) for t in self.token_buckets]
        keys += [(*self.bucket(t), False, True) for t in self.token_buckets if self._drafts_variant(*self.bucket(t))]
        if self.decode_steps:  # n decodes: n tokens and n sequences, n <= max_num_seqs
            limit = min(self.max_num_seqs, self.token_buckets[-1])
            keys += sorted({(*self.bucket(n), True, False) for n in range(1, limit + 1)})
        return keys

    def _drafts_variant(self, t: int, s: int, drafted: bool = True) -> bool:
        """Whether a step of bucket (t, s) carrying drafts (drafted) takes the bucket's drafts
        variant: only where that differs from the plain program (more sampling rows than
        sequences, or the tree mask) and can hold a draft (2 tokens or more)."""
        return drafted and t >= 2 and self.max_spec_tokens > 0 and (self.trees or self.rows(t, s) != s)

    def precompile(self, layout) -> int:
        """Compiles every step bucket for another layout (another mesh) without placing
        anything there: the weights and a pool of the size a runner on that mesh would get
        enter as shapes with shardings. The runner's ProgramStore (when it has one) keeps the
        programs, so a runner sharing it that is later built or resharded onto that mesh takes
        them as they are; JAX's persistent compilation cache keeps them too, so one that does
        not loads them from disk instead of compiling (where the pool size is set by memory, a
        different size there is a miss: it compiles then, as without this). Returns the
        programs compiled."""
        kv_shards = 1 if layout.rules["kv_heads"] is None else layout.mesh.size
        dtype = self.kv.k[0].dtype
        num_pages = num_pages_for(self.config, self.cache_cfg, dtype, layout.mesh.devices.flat[0], shards=kv_shards)
        abstract = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
        pool = jax.eval_shape(lambda: KVCache.create(self.config, num_pages, self.page_size, dtype=dtype))
        shadow = copy.copy(self)
        shadow.state = jax.tree.map(lambda sharding, sub: jax.tree.map(lambda x: abstract(x, sharding), sub),
                                    layout.state_shardings(self.state), self.state)
        shadow.kv = jax.tree.map(lambda x: abstract(x, layout.kv_sharding), pool)
        shadow._warm_thread = None  # the copy must not stop this runner's own background warm-up
        shadow._bind(layout)
        shadow.warmup()
        return len(shadow._compiled)

    def prepare(self, plan: StepPlan):
        """Host-side: the plan as padded numpy arrays for its bucket.

        Python only gathers each sequence's lengths, ids and pages; the per-token columns and
        the page table are built with whole-array operations, and only sequences carrying a
        draft take a per-sequence path. It runs on the host every step, so at large batches
        its cost is part of every step's host time."""
        seqs = plan.seqs
        t, s = self.bucket(plan.num_tokens)
        n_seqs = len(seqs)
        lens = np.fromiter((len(q.token_ids) for q in seqs), np.int64, n_seqs)
        counts = np.fromiter((len(q.pages) for q in seqs), np.int64, n_seqs)
        starts = np.fromiter((q.start_pos for q in seqs), np.int64, n_seqs)
        at = int(lens.sum())
        ids = np.zeros(t, np.int32)
        ids[:at] = np.fromiter(itertools.chain.from_iterable(q.token_ids for q in seqs), np.int32, at)
        cu = np.zeros(s + 1, np.int32)
        cu[1:n_seqs + 1] = np.cumsum(lens)
        cu[n_seqs + 1:] = at
        owner = np.repeat(np.arange(n_seqs), lens)  # each token's sequence
        pos = np.zeros(t, np.int32)
        pos[:at] = starts[owner] + np.arange(at) - cu[owner]
        kv_lens = np.zeros(s, np.int32)
        kv_lens[:n_seqs] = starts + lens
        table = _page_table(seqs, counts, s, self.pages_per_seq)
        last = cu[1:n_seqs + 1] - 1
        drafted = self.max_spec_tokens > 0 and any(q.num_draft for q in seqs)
        ndraft = np.fromiter((q.num_draft for q in seqs), np.int64, n_seqs) if drafted else 0
        pending = np.flatnonzero(ids[last - ndraft] == PENDING)  # (a PENDING token comes before a draft)
        # Per token: the previous step's row its sequence's PENDING token is fed from (-1: none);
        # the step moves every token of such a sequence back by that row's draft shortfall.
        src = np.full(t, -1, np.int32)
        if len(pending):
            seq_src = np.full(n_seqs, -1, np.int32)
            seq_src[pending] = [self._prev_rows[seqs[i].request_id] for i in pending]
            src[:at] = seq_src[owner]
        offsets = [[0]] * n_seqs  # per sequence: each sampling row's output-index offset (draft depths)
        parents = [None] * n_seqs  # per sequence: None (causal), or its new tokens' parents (a tree draft)
        # Sampling rows: each sequence's last token, and with a draft every draft position too
        # (row j of a sequence samples its output token sample_index + j).
        variant = self._drafts_variant(t, s, drafted)
        r = self.rows(t, s, variant)
        decode_only = self.decode_steps and plan.num_tokens == n_seqs > 0
        trees = self.trees and variant and not decode_only  # the step may hold tree drafts
        draft_rows = DraftRows.empty(r, trees) if variant else None
        firsts = np.cumsum(1 + ndraft) - 1 - ndraft if drafted else None  # each sequence's first row
        for i, seq in enumerate(seqs):
            if not seq.num_draft:
                continue
            n, k, depths = len(seq.token_ids), seq.num_draft, list(range(1, seq.num_draft + 1))
            known = n - k
            if seq.draft_parents:  # a tree: RoPE positions by depth, attention to ancestors only
                depths = Draft(seq.token_ids[known:], seq.draft_parents).depths()
                pos[cu[i] + known:cu[i] + n] = seq.start_pos + known - 1 + np.array(depths)
                parents[i] = list(range(-1, known - 1)) + [known - 1 if p < 0 else known + p
                                                           for p in seq.draft_parents]
            offsets[i] = [0] + depths
            if draft_rows is not None:
                draft_rows.add(int(firsts[i]), known, seq.token_ids[known:], seq.draft_parents, depths)
        rows = [(seq, d) for seq, depths in zip(seqs, offsets) for d in depths]
        logits_idx = np.zeros(r, np.int32)
        row_seq = np.full(r, s, np.int32)  # each sampling row's sequence (padding: s)
        if len(rows) == n_seqs:  # no drafts: one row per sequence, its last token
            logits_idx[:n_seqs] = last
            row_seq[:n_seqs] = np.arange(n_seqs)
        else:
            logits_idx[:len(rows)] = [cu[i + 1] - 1 - seq.num_draft + j
                                      for i, seq in enumerate(seqs) for j in range(1 + seq.num_draft)]
            row_seq[:len(rows)] = np.repeat(np.arange(n_seqs), 1 + ndraft)
        tree_bits = tree_bits_from_parents(lens.tolist(), parents, t) if trees else None
        md = AttentionMetadata(cu, kv_lens, table, np.array([n_seqs], np.int32), decode_only, tree_bits)
        samp = SamplingArrays.from_rows(rows, r)
        return (t, s, decode_only, variant), (ids, src, pos, md, logits_idx, samp, row_seq, draft_rows)

    def dispatch(self, plan: StepPlan):
        """Enqueues the plan's step on the device and returns at once (JAX async dispatch).

        The result is a handle for fetch(); the next plan may already use this one's samples.
        PlanRejected if the plan cannot be built into a step's arrays (nothing was launched).
        """
        if self.awaiting_weights:
            # (Engine.step checks first)
            raise RuntimeError("the runner has the weights' shapes only: set_weights() before a step")
        try:
            key, args = self.prepare(plan)
        except Exception as e:
            raise PlanRejected(f"the plan could not be built into a step: {e!r}") from e
        fn = self._compiled.get(key)
        if fn is None and self.programs is not None:
            # First use of a bucket no warm-up compiled: through the shared store, so other
            # runners of this model (and this one after a rebind) take the program as it is.
            self._first_use_compiles += self._compile_key(key, self._compiled)
            fn = self._compiled[key]
        self.compiled_last = key not in self._seen  # this step (likely) compiled: its time is not a step's
        self._seen.add(key)
        launch = (fn, self._step, self.state, self.kv, self._prev_tokens, args)
        if self._launches is None:
            tokens, logprobs, self.kv, self._prev_tokens = self._launch(*launch)
        else:  # returns at once; a reader of kv or _prev_tokens (the next dispatch) waits for it
            self._pending = self._launches.submit(self._launch, *launch)
            tokens, logprobs = self._pending, None
        firsts = np.cumsum([0] + [1 + seq.num_draft for seq in plan.seqs])
        # A sequence's PENDING token in the next plan is fed from the row that samples it if its
        # whole draft is accepted; the step leaves the sample actually taken there.
        self._prev_rows = {seq.request_id: int(firsts[i] + seq.num_draft)
                           for i, seq in enumerate(plan.seqs) if seq.sample}
        return tokens, logprobs, int(firsts[-1])

    def execute(self, plan: StepPlan) -> tuple[np.ndarray, np.ndarray]:
        """dispatch + fetch."""
        return self.fetch(self.dispatch(plan))


def _step(graphdef, max_rows, max_depth, state, kv, prev, ids, src, pos, md, logits_idx, samp, row_seq,
          draft_rows):
    """One step: the forward pass over the plan's tokens and sampling at its rows.

    prev: the previous step's (fed ids, shortfalls) by row. A sequence whose PENDING token is
    fed from row src was planned as if that row's draft is all accepted: its positions, KV
    slots (kv_lens) and sampling indices move back by the row's shortfall (0 without a draft).
    Returns the sampled ids and logprobs by row, the pool, and this step's (fed ids,
    shortfalls) by row: at each sequence's rows, the sample after its accepted path and the
    draft tokens not on it (the next step reads them at its last row, where its whole draft is
    accepted). draft_rows (a DraftRows; None: a
    step without drafts) gives the drafts' trees (rows: row_seq): each is verified here as
    jinfer.speculation.verify does on the host, and a tree's accepted path is moved to the K/V
    slots plain decoding gives its tokens, so the next step may be planned before this one is
    read (drafts in flight, chains and trees alike). max_depth (static): the longest draft."""
    prev_ids, prev_short = prev
    fed, at = src >= 0, jnp.maximum(src, 0)
    ids = jnp.where(fed & (ids < 0), prev_ids[at], ids)
    short = jnp.where(fed, prev_short[at], 0)  # per token
    cu = md.cu_q_lens
    seq_short = jnp.where(cu[1:] > cu[:-1], short[jnp.minimum(cu[:-1], ids.shape[0] - 1)], 0)
    md = dataclasses.replace(md, kv_lens=md.kv_lens - seq_short)
    samp = dataclasses.replace(samp, index=samp.index - jnp.append(seq_short, 0)[row_seq])
    logits, kv = nnx.merge(graphdef, state)(ids, pos - short, kv, md, logits_idx)
    tokens, logprobs = sample(logits, samp)
    pad = lambda x: jnp.pad(x, (0, max_rows - x.shape[0]))  # noqa: E731 - fixed shape: the next step reads them
    if draft_rows is None:
        return pad(tokens), pad(logprobs), kv, (pad(tokens), jnp.zeros(max_rows, jnp.int32))
    num_segments = seq_short.shape[0] + 1  # (padding rows: sequence s)
    acc, deepest, shortfall = accepted_paths(tokens, row_seq, draft_rows, max_depth, num_segments)
    if draft_rows.move is not None:
        kv = move_paths(kv, md, row_seq, acc, draft_rows.move)
    # Every row of a sequence carries its values; the next step reads its last (dispatch: _prev_rows).
    return pad(tokens), pad(logprobs), kv, (pad(tokens[deepest[row_seq]]), pad(shortfall[row_seq]))


def _page_table(seqs, counts: np.ndarray, s: int, pages_per_seq: int) -> np.ndarray:
    """i32[s, pages_per_seq]: row i holds sequence i's pages (counts[i] of them) in order, then
    zeros; rows past the sequences are zeros (padding)."""
    table = np.zeros((s, pages_per_seq), np.int32)
    total = int(counts.sum())
    first = np.cumsum(counts) - counts
    table[np.repeat(np.arange(len(seqs)), counts), np.arange(total) - np.repeat(first, counts)] = np.fromiter(
        itertools.chain.from_iterable(q.pages for q in seqs), np.int32, total)
    return table


def _local_device(mesh):
    """The mesh's first device that this process holds (memory statistics are local)."""
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


def _padded(pages: Sequence[int], n: int) -> np.ndarray:
    pages = list(pages)
    return np.array(pages + [pages[-1]] * (n - len(pages)), np.int32)


def _gather_pages(kv: KVCache, pages) -> KVCache:
    return KVCache(tuple(k[:, pages] for k in kv.k), tuple(v[:, pages] for v in kv.v))


def _scatter_pages(kv: KVCache, data: KVCache, pages) -> KVCache:
    """A repeated page gets the same data again (read_pages pads by repeating the last)."""
    return KVCache(tuple(k.at[:, pages].set(d) for k, d in zip(kv.k, data.k)),
                   tuple(v.at[:, pages].set(d) for v, d in zip(kv.v, data.v)))
