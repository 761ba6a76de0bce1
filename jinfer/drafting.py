"""The scheduler's side of speculative decoding: which decoding requests get a draft and how
long, and the drafter told of every request's tokens from its admission to its end
(jinfer.speculation holds the Drafter and DraftBudget protocols and the acceptance maths).

Drafts in flight (Scheduler.drafts_in_flight): step N+1 is planned while step N runs, also
when N carries drafts. A request whose N is in flight decodes N's sample in N+1 (a PENDING
token, fed on the device) at the position it has if N's draft is all accepted; the draft's
tokens count as the request's until N is read (Request.tentative). Where fewer are accepted,
the runner moves the request's positions, KV slots and sampling index back by the shortfall on
the device (jinfer/runner.py), so N+1 computes the right token in the right place; the host
learns the shortfall when it reads N and takes it off num_computed_tokens. N+1 may carry a
draft of its own for such a request: the drafter is asked from the tokens read (it never sees
a tentative one) for the continuation past N's draft and N's own sample, and only when its
proposal begins with N's draft (else it expects N's to be cut short, and N+1's would not fit).
Trees too: N verifies a tree on the device and moves its accepted path's K/V to where plain
decoding puts those tokens, so its shortfall is its tokens off that path; N+1's draft then
assumes N's leading chain (its first child at each node) accepted, and may itself be a tree.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from jinfer.request import Request
from jinfer.speculation import NO_DRAFT, Draft
from jinfer.step_plan import ScheduledSeq


class Drafting:
    """Drafts for the scheduler's plans (jinfer.scheduling.Scheduler mixes it in): it uses the
    drafter, draft budget, spec stats and drafting limits the scheduler holds, the requests its
    drafter has heard of (`_drafting`), and its kv, config and running queue."""

    def wants_drafts(self) -> bool:
        """Whether the next step should carry drafts (the budget's call; always, without one)."""
        if self.drafter is None:
            return False
        decoding = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens <= 1)
        if self.budget is None:
            return True
        prefilling = bool(self.waiting) or decoding < len(self.running)  # the step will carry prompt chunks
        return self.budget.wants_drafts(decoding, prefilling=prefilling)

    def _start_drafting(self, req: Request) -> None:
        """The drafter hears of a request once: its prompt, then the tokens it already has (one
        imported from another engine)."""
        if self.drafter is None or req.request_id in self._drafting:
            return
        self._drafting.add(req.request_id)
        self._call_drafter("start", req.request_id, req.prompt_ids)
        if req.output_ids:
            self._call_drafter("observe", req.request_id, list(req.output_ids))

    def _call_drafter(self, method: str, *args):
        """The drafter's `method`(*args), its host time counted in spec.drafter_seconds (every
        drafter call goes through here)."""
        t0 = time.perf_counter()
        try:
            return getattr(self.drafter, method)(*args)
        finally:
            self.spec.drafter_seconds += time.perf_counter() - t0

    def _end_drafting(self, req: Request, aborted: bool) -> None:
        if self.budget is not None and req.request_id in self._drafting:
            self.budget.finish(req.request_id)
        if req.request_id in self._drafting:
            self._drafting.discard(req.request_id)
            self._call_drafter("finish", req.request_id, req.output_ids, aborted)

    def _may_draft(self, req: Request, n: int) -> bool:
        """Before planning: a decoding request (its one uncomputed token is its last known one,
        or with drafts in flight the sample of its step in flight)."""
        return (self.drafter is not None and req.params.speculate and n == 1
                and req.num_pending <= self.drafts_in_flight
                and req.num_tokens - req.num_computed_tokens == 1 and req.request_id in self._drafting)

    def _lead_rooms(self, decoders: list) -> Callable[[Request], int]:
        """req -> the most draft tokens the budget's lead limit (DraftBudget.lead_limit) leaves
        it this step: in a closed batch (`closed_batch`: no request will arrive, as in
        Engine.generate) and while no request waits, a request may draft until it is that many
        tokens ahead of the furthest-behind other running request (tokens left to max_tokens,
        drafts in flight counted, all taken before this step's drafts), so the batch finishes
        together instead of leaving its slowest requests a tail of small, dear steps.
        Unlimited outside a closed batch, while a request waits, without a limit, or for a
        request running alone."""
        lead_limit = getattr(self.budget, "lead_limit", None)  # (a budget of one's own may lack it)
        limit = lead_limit() if self.closed_batch and lead_limit and not self.waiting and decoders else None
        if limit is None or len(self.running) < 2:
            return lambda req: self.max_spec_tokens
        left = {id(r): r.params.max_tokens - r.num_output_tokens for r in self.running}
        behind = sorted(self.running, key=lambda r: left[id(r)], reverse=True)[:2]

        def room(req: Request) -> int:
            other = behind[1] if behind[0] is req else behind[0]
            return max(0, left[id(req)] - left[id(other)] + limit)
        return room

    def _draft(self, req: Request, budget: int) -> Draft:
        """A draft for a request planned to decode this step, within the step's remaining budget
        and its length limits; NO_DRAFT for none. (Pages are taken once the step's drafts are
        fitted to the buckets: Scheduler._plan_drafts.)"""
        # Planned: its sample is pending (and with a step in flight, that step's sample and
        # draft); the draft may reach its length limits less one (the model's own token after
        # an accepted draft), counted as if every draft in flight is accepted.
        out = req.num_output_tokens
        room = min(self.max_spec_tokens, budget, req.params.max_tokens - out,
                   self.cfg.max_model_len - len(req.prompt_ids) - out)
        if req.num_pending > 1:  # its step in flight: past that step's draft and sample
            return self._draft_past_inflight(req, room)
        if room > 0:
            room = self._budget_room(req, room)
        if room <= 0:
            return NO_DRAFT
        draft = self._call_drafter("propose", req.request_id, req.output_ids, room).truncate(room)
        if not self.trees and not draft.is_chain:
            draft = draft.first_chain()
        return draft if draft.tokens else NO_DRAFT

    def _budget_room(self, req: Request, room: int) -> int:
        """What the draft budget (if any) allows of `room`: never more, whatever a pluggable budget
        answers (the step program verifies drafts only max_spec_tokens deep)."""
        if self.budget is None:
            return room
        return min(room, self.budget.limit(req.request_id, self._num_decoding, room))

    def _draft_past_inflight(self, req: Request, room: int) -> Draft:
        """A draft for a request whose step in flight has not been read: of the drafter's
        proposal from the tokens read, what follows the tokens that step verifies (its draft's
        leading chain, if it has a draft) and the one it samples (the proposal's guess);
        NO_DRAFT where the proposal does not begin with that chain (the draft budget is asked
        only for a proposal that goes on past them)."""
        inflight = req.tentative[-1].first_chain().tokens if req.tentative else ()
        skip = len(inflight) + 1
        if room <= 0:
            return NO_DRAFT
        proposal = self._call_drafter("propose", req.request_id, req.output_ids, room + skip)
        lead = proposal.first_chain().tokens
        if lead[:len(inflight)] != inflight or len(lead) <= skip:
            return NO_DRAFT
        room = self._budget_room(req, room)
        draft = proposal.below(lead[:skip]).truncate(room)
        if not self.trees and not draft.is_chain:
            draft = draft.first_chain()
        return draft if draft.tokens else NO_DRAFT

    def _fit_to_buckets(self, base: int, drafted: list) -> list[int]:
        """The length of each (index, request, draft) after the budget fits the step to the
        runner's token buckets (DraftBudget.fit_to_buckets: a step of `base` tokens and these
        drafts is padded to the next bucket, so the draft token that takes it past one costs that
        bucket's padding); as drafted where the budget does not say or the buckets are unknown
        (token_buckets None: a simulator)."""
        fit = getattr(self.budget, "fit_to_buckets", None)
        lengths = [len(draft) for _, _, draft in drafted]
        if fit is None or self.token_buckets is None or not drafted:
            return lengths
        fitted = list(fit([(req.request_id, n) for (_, req, _), n in zip(drafted, lengths)], base,
                          self.token_buckets, self._num_decoding))
        if len(fitted) != len(lengths):
            raise ValueError(f"the draft budget fitted {len(fitted)} draft lengths for {len(lengths)} drafts")
        return [max(0, min(int(k), n)) for k, n in zip(fitted, lengths)]

    def _add_draft(self, seq: ScheduledSeq, req: Request, draft: Draft) -> ScheduledSeq:
        """The planned decode `seq` with the draft after its token (its pages now cover it); the
        draft's tokens are the request's, tentatively, until the step is settled."""
        req.num_computed_tokens += len(draft)
        req.tentative.append(draft)
        req.num_tentative += len(draft)
        return dataclasses.replace(seq, token_ids=seq.token_ids + draft.tokens, pages=tuple(req.pages),
                                   num_draft=len(draft), draft_parents=() if draft.is_chain else draft.parents)
