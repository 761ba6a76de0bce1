"""Requests paused for a tool call (augmented LLMs): the mechanism and the interface of the
policy that decides what happens to their K/V while they wait (InferCept).

A request whose SamplingParams.intercept_token_ids include the token it just sampled pauses:
it leaves the running set holding its pages. Before every step the scheduler asks its
PausePolicy about the paused requests that still hold pages on the device, and applies each
answer:
- PRESERVE: keep the pages (they stay pinned: nobody else can use them);
- DISCARD: release them into the prefix cache (nothing is freed that another request could
  still match, and only what gets evicted meanwhile is computed again on resume);
- SWAP: copy their K/V to the host tier (StepPlan.swap_out, done before the step runs) and
  return the pages to the pool; on resume they come back (StepPlan.swap_in) into new pages.
  A policy with a per-step swap budget (`swap_budget_tokens`) gets swaps in chunks: each step
  moves the last pages still on the device that the budget allows (SWAP answers take it in the
  order the policy gave them), and a swap under way goes on, first in the budget, until the
  request's K/V has all left (it is not asked again meanwhile); a request resumed before then
  swaps out the rest at the start of the next step's planning (that rest is outside the
  budget). Swap-ins take the same budget: when a resumed request's turn to be admitted comes
  and its chunks do not all fit what is left (and other requests run), it gets pages for its
  K/V and next tokens (preempting nobody) and the chunks the budget allows come back into
  them (first swapped-out last, so in position order, the first whatever the budget); while
  some are still in the host tier it waits holding those pages ("restoring": no other
  request's page hunt takes them, it takes no seat, and it does not hold up the requests
  behind it), its next chunks go first in each step's budget (one at least per step, all of
  them when nothing runs), and once all are in it is planned before any other request (on
  the pages it holds: running it is what gives them back). The budget's order each step:
  restores under way, swap-outs under way, the policy's SWAP answers, new restores.
A policy may answer differently at every step (preserve now, swap later). Resuming
(Scheduler.resume) folds the request's prompt, output and the tool's tokens into its new
prompt, so the tokens that follow are exactly those of a fresh request over that prompt.
Policies live in scheduler/infercept/; `Discard` is the default (what an engine that ends a
request at its tool call and re-sends it does, minus the lost queue position).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence

from jinfer.request import Request, Status

PRESERVE, DISCARD, SWAP = "preserve", "discard", "swap"
ACTIONS = (PRESERVE, DISCARD, SWAP)


@dataclasses.dataclass
class Pause:
    """A paused request's state (Request.pause)."""

    since: float  # the policy clock's time when it paused
    action: str = PRESERVE  # what was done with its K/V so far
    swapped_tokens: int = 0  # tokens whose K/V sit in the host tier (SWAP), 0 otherwise
    context: int = 0  # tokens whose K/V it had at the pause (computed or in flight)
    swap_chunks: list[int] = dataclasses.field(default_factory=list)  # pages per chunk in the host tier,
    # in the order they went out (a swap-in takes the last first)
    restoring: bool = False  # resumed, its chunks coming back in (waiting with their pages)


@dataclasses.dataclass
class PauseStats:
    """Counts over an engine's (or simulated replica's) life."""

    paused: int = 0  # pauses (tool calls)
    resumed: int = 0
    discarded_tokens: int = 0  # K/V tokens dropped into the prefix cache
    swapped_out_tokens: int = 0  # K/V tokens copied to the host tier
    swapped_in_tokens: int = 0
    recomputed_tokens: int = 0  # of resumed requests' context at their pause, computed again
    idle_page_s: float = 0.0  # pages held by paused requests x seconds (the policy clock's)
    _held: int = 0  # pages paused requests held after the last decision
    _at: float | None = None  # the clock then

    @property
    def holding(self) -> bool:
        """Whether paused requests held pages at the last decision (their time still counts)."""
        return self._held > 0

    def hold(self, pages: int, now: float) -> None:
        """Paused requests hold `pages` from now on."""
        if self._at is not None:
            self.idle_page_s += self._held * (now - self._at)
        self._held, self._at = pages, now


@dataclasses.dataclass(frozen=True)
class PauseView:
    """What a PausePolicy sees of the engine before a step."""

    page_size: int
    num_free_pages: int
    num_pages: int
    running_tokens: int  # context tokens (computed K/V) of the running requests
    running: int  # running requests
    waiting: int  # waiting requests (resumed ones included)
    last_step_s: float  # the last step's time (what a swap can hide behind), 0 before any
    swap_budget: int | None = None  # tokens this step's swaps may still move (swap_budget_tokens less the
    # swaps under way); None: no budget


class PausePolicy(Protocol):
    """requeue (optional attribute, default False): a resumed request queues behind every
    request that arrived before its resume, as a new arrival would (vLLM ends a request at its
    tool call and takes the continuation as a new request), instead of by its first arrival."""

    def decide(self, paused: Sequence[Request], view: PauseView) -> Mapping[str, str]:
        """For paused requests that hold device pages (each with its Pause, num_computed_tokens
        and pages; swaps under way aside): request id -> PRESERVE, DISCARD or SWAP. Requests
        left out are preserved this step.

        Optional: `swap_budget_tokens(view) -> int | None`, the tokens of K/V (whole pages) one
        step's swaps may move, out and in (None: no limit); with it, swaps go in chunks (module
        docstring) and SWAP answers take the budget in the mapping's order, after the chunks of
        swaps (in and out) under way. (The rest of a swap whose request was resumed mid-way goes
        out outside the budget.)"""


class Discard:
    """Drops every paused request's K/V into the prefix cache at once."""

    def decide(self, paused: Sequence[Request], view: PauseView) -> Mapping[str, str]:
        return {r.request_id: DISCARD for r in paused}


def check_actions(actions: Mapping[str, str], paused: Sequence[Request]) -> None:
    """Raises ValueError naming a policy's answer that is no action or no request it was asked about."""
    asked = {r.request_id for r in paused}
    for rid, action in actions.items():
        if action not in ACTIONS:
            raise ValueError(f"pause policy answered {action!r} for {rid}: must be one of {ACTIONS}")
        if rid not in asked:
            raise ValueError(f"pause policy answered for {rid}, which is not a paused request holding pages")


class Pausing:
    """The scheduler's side of pausing (jinfer.scheduling.Scheduler mixes it in): it owns
    `paused`, `_swap_rest` (requests resumed mid-swap), `_restoring` (resumed ones whose
    chunks are coming back in, until admitted), `pause_policy` and `clock`, and uses the
    scheduler's kv, queues and drafter."""

    def _pause(self, req: Request) -> None:
        """req sampled an intercept token (update): out of the running set, pages held."""
        req.status = Status.PAUSED
        # (off the running set, or the waiting one: a step in flight preempted it since)
        (self.running if req in self.running else self.waiting).remove(req)
        # A step in flight past the pause computes its last token's K/V (kept) and, with drafts
        # in flight, a draft past it (not the request's: positions past its tokens hold nothing)
        req.num_computed_tokens = min(req.num_computed_tokens, len(req.prompt_ids) + len(req.output_ids))
        req.pause = Pause(self.clock(), context=req.num_computed_tokens)
        self.paused.append(req)
        self.pause_stats.paused += 1

    def _decide_pauses(self, step) -> None:
        """Moves the swaps under way (a resumed one's rest, restores' next chunks, swap-outs'),
        asks the pause policy about the paused requests holding device pages and applies its
        answers: the copies go onto step.swap_out / swap_in, step.swap_budget keeps what the
        budget has left for the admissions' swap-ins."""
        stats = self.pause_stats
        for req in self._swap_rest:  # resumed mid-swap: the pages they kept follow the rest out, so
            if req.pause is not None and req.pages:  # a waiting request holds only whole swaps or nothing
                self._swap_out(req, None, step.swap_out)
        self._swap_rest.clear()
        for req in self._restoring:  # first in the budget, a chunk each at least (all of them when nothing runs)
            if req.pause.swap_chunks:
                self._swap_in(req, step, least=1 if self.running else len(req.pause.swap_chunks))
        if not self.paused and not stats.holding:  # (the common step: nothing paused, nothing to count)
            return
        holding = [r for r in self.paused if r.pages]
        if not holding:
            stats.hold(0, self.clock())
            return
        budget = self._swap_budget(step)
        for req in [r for r in holding if r.pause.action == SWAP]:  # swaps under way go on, first
            budget = self._swap_out(req, budget, step.swap_out)
        asked = [r for r in holding if r.pause.action != SWAP]
        if self._starved:  # waiting requests could not run beside them: room first
            actions = {r.request_id: DISCARD for r in asked}
        else:
            view = dataclasses.replace(self._pause_view(), swap_budget=budget)
            actions = self.pause_policy.decide(asked, view) if asked else {}
            check_actions(actions, asked)
        order = {rid: k for k, rid in enumerate(actions)}  # swaps take the budget in the answer's order
        for req in sorted(asked, key=lambda r: order.get(r.request_id, len(order))):
            action = actions.get(req.request_id, PRESERVE)
            if action == DISCARD:
                stats.discarded_tokens += req.num_computed_tokens
                self.release(req)  # into the prefix cache: a resume matches what is still there
                req.num_computed_tokens, req.pause.action = 0, DISCARD
            elif action == SWAP:
                budget = self._swap_out(req, budget, step.swap_out)
        step.swap_budget = budget
        stats.hold(sum(len(r.pages) for r in self.paused), self.clock())

    def _pause_view(self) -> PauseView:
        return PauseView(self.page_size, self.kv.num_free, self.pool.num_pages,
                         sum(r.num_computed_tokens for r in self.running), len(self.running), len(self.waiting),
                         self.last_step_s)

    def _swap_budget(self, step) -> int | None:
        """The tokens this step's swaps may still move (None: no limit): asked of the pause
        policy once per step (step.swap_budget, until then ...), then what the swaps left."""
        if step.swap_budget is ...:
            budget_of = getattr(self.pause_policy, "swap_budget_tokens", None)
            step.swap_budget = None if budget_of is None or self._starved else budget_of(self._pause_view())
        return step.swap_budget

    def _swap_out(self, req: Request, budget: int | None, swaps: list) -> int | None:
        """Swaps out the last pages of req's computed K/V that `budget` tokens allow (all of
        them when None), onto `swaps`; returns the budget left."""
        page, pause = self.page_size, req.pause
        n = -(-req.num_computed_tokens // page)  # pages holding its computed K/V
        take = n if budget is None else min(n, budget // page)
        if not take:
            return budget
        keep = n - take
        moved = req.num_computed_tokens - keep * page
        swaps.append((req.request_id, tuple(req.pages[keep:n])))
        self.pause_stats.swapped_out_tokens += moved
        pause.swapped_tokens += moved
        pause.swap_chunks.append(take)
        pause.action = SWAP  # (under way while it holds pages: the leading num_computed_tokens' K/V)
        if keep:  # its pages hold it alive: the prefix-cache lock goes, so pages it shares can be evicted
            if self.prefix_cache is not None and req.cache_node is not None:
                self.prefix_cache.unlock(req.cache_node)
            req.cache_node = None
            self.pool.decref(req.pages[keep:])
            req.pages = req.pages[:keep]
        else:
            self.kv.drop(req)
        req.num_computed_tokens = keep * page
        return None if budget is None else budget - take * page  # (whole pages are copied)

    def _comes_in_whole(self, req: Request, step) -> bool:
        """Whether a resumed request's swapped chunks all come back in this step: the budget
        left takes them (the first whatever it allows), there is none, or nothing runs beside
        it (no step to hide copies behind, no reason to wait)."""
        budget, chunks, page = self._swap_budget(step), req.pause.swap_chunks, self.page_size
        if budget is None or (not self.running and not step.seqs):
            return True
        return (sum(chunks) - chunks[-1]) * page <= max(0, budget - chunks[-1] * page)

    def _start_restore(self, step, req: Request) -> bool:
        """Starts bringing a resumed request's K/V back in chunks: pages for it and its next
        tokens (free or evicted from the prefix cache, preempting nobody: it runs only once all
        is in), its first chunks, then it waits restoring. Where there are no pages it waits as
        any admission that cannot get them does (False: the ones behind it wait too, unless
        the order interleaves)."""
        req.num_computed_tokens = min(req.pause.swapped_tokens, req.num_tokens - 1)
        n = min(req.num_tokens - req.num_computed_tokens, step.budget)
        got = self._ensure_pages(req, req.num_computed_tokens + n)
        req.num_computed_tokens = 0
        if not got:
            step.blocked = True
            return step.interleave
        self._swap_in(req, step, least=1)
        req.pause.restoring = True
        self._restoring.append(req)
        return True

    def _admit_restored(self, step) -> None:
        """Plans the restoring requests whose K/V is all back in before any other request, in
        policy order where a seat is free (an interleaving order may preempt for one): they
        hold their pages, and running them is what gives those back."""
        if not self._restoring:  # (the common step)
            return
        done = sorted((r for r in self._restoring if not r.pause.swap_chunks), key=self.policy.priority)
        for req in done:
            if step.budget == 0 or len(step.seqs) == self.cfg.max_num_seqs:
                return
            if step.interleave or len(self.running) < self.cfg.max_num_seqs:
                self._schedule_waiting(step, req)

    def _swap_in(self, req: Request, step, least: int = 0) -> None:
        """Swaps req's next chunks back into its pages (it holds pages for them all), in
        position order, onto step.swap_in: those the step's budget allows, `least` of them
        whatever it allows. num_computed_tokens counts what is in."""
        pause, page = req.pause, self.page_size
        budget, moved = self._swap_budget(step), 0
        while pause.swap_chunks:
            n = pause.swap_chunks[-1]
            if moved >= least and budget is not None and n * page > budget:
                break
            pos = req.num_computed_tokens // page  # (only the first chunk swapped out, the last in, ends mid-page)
            step.swap_in.append((req.request_id, tuple(req.pages[pos:pos + n])))
            pause.swap_chunks.pop()
            req.num_computed_tokens = (pos + n) * page
            budget = None if budget is None else max(0, budget - n * page)
            moved += 1
        step.swap_budget = budget
        if not pause.swap_chunks:  # (its last token at least is computed again: its logits give the next)
            req.num_computed_tokens = min(pause.swapped_tokens, req.num_tokens - 1)

    def resume(self, req: Request, token_ids: Sequence[int], intercept_after: int | None = None) -> None:
        """A paused request continues with its tool's output: prompt, output and token_ids
        become its prompt, its output starts empty (what follows equals a fresh request over
        that prompt with the same parameters and seed), and it queues by its first arrival.
        intercept_after: pause again after that many tokens of the new segment (trace replay).
        ValueError (nothing changes) if it is not paused or a sampled token is still unread."""
        if req.status is not Status.PAUSED:
            raise ValueError(f"request {req.request_id} is {req.status.value}, not paused")
        if req.num_pending:
            raise ValueError(f"request {req.request_id} has a step in flight: settle it first")
        self._end_drafting(req, aborted=False)  # (first: a drafter that raises leaves it paused)
        self.paused.remove(req)
        self.pause_stats.resumed += 1
        req.prompt_ids = req.all_ids + [int(t) for t in token_ids]
        # Its last token is computed again (its logits give the next token), tool output or none.
        req.num_computed_tokens = min(req.num_computed_tokens, len(req.prompt_ids) - 1)
        req.output_ids, req.output_logprobs, req.intercept_after = [], [], intercept_after
        req.status, req.policy_state = Status.WAITING, None
        if getattr(self.pause_policy, "requeue", False):  # back of the queue, as a new arrival would be
            req.arrival_index = self._max_arrival + 0.5
        self.waiting.append(req)
        if req.pause.action == SWAP and req.pages:  # a swap under way: the rest goes out before it waits
            self._swap_rest.append(req)
        self._start_drafting(req)  # the drafter hears the new prompt

    def _resumed_admitted(self, req: Request, restored: int) -> None:
        """A resumed request was admitted with `restored` of its pre-pause context's K/V (kept,
        matched in the prefix cache or swapped in): the rest is computed again."""
        self.pause_stats.recomputed_tokens += max(0, req.pause.context - restored)
        if req.pause.action == SWAP:
            self.pause_stats.swapped_in_tokens += req.pause.swapped_tokens
        req.pause = None
