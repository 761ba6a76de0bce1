"""Requests moving between schedulers unfinished (Engine.export_requests / import_requests, and
the simulators' migrations): one side detaches them and says which K/V can travel with them,
the other takes them in, places that K/V and queues them."""

from __future__ import annotations

from typing import Collection, Sequence

from jinfer.request import Request, Status


class Migration:
    """The scheduler's side of moving requests (jinfer.scheduling.Scheduler mixes it in): it
    uses the scheduler's kv, queues and drafter."""

    def detach(self, reqs: Sequence[Request]) -> None:
        """Takes requests out of this scheduler unfinished (they move to another engine:
        Engine.export_requests): off the queues, pages released, the drafter told they ended.
        A paused request whose K/V sits in this engine's host tier computes it again instead
        (the host tier does not travel)."""
        self._drop_from_queues({id(r) for r in reqs})
        for req in reqs:
            self.release(req)
            self._end_drafting(req, aborted=True)
            if req.pause is not None and req.pause.swapped_tokens:
                req.pause.swapped_tokens, req.pause.action = 0, "discard"
                req.pause.swap_chunks, req.pause.restoring = [], False

    def kv_to_carry(self, reqs: Sequence[Request]) -> list[tuple[str, int]]:
        """(request id, n) for each request whose first n pages hold computed K/V that can move
        with it to another scheduler (Engine.export_requests gathers them; take_in places
        them); requests with none are left out."""
        page = self.kv.page_size
        out = []
        for r in reqs:
            n = min(len(r.pages), -(-r.num_computed_tokens // page))
            if n:
                out.append((r.request_id, n))
        return out

    def take_in(self, reqs: Sequence[Request], carried: Sequence[tuple[str, int]],
                held: Collection[str] = ()) -> list[int]:
        """Takes in requests another scheduler detached, with carried = its kv_to_carry: pages
        for each carried request's K/V while the pool has room, oldest request first (the
        others compute again, as preempted ones do), then every request queued in arrival
        order (adopt; held: followers their leader forks later). Returns the positions in carried that got pages,
        ascending: the K/V to write into their req.pages."""
        by_id = {r.request_id: r for r in reqs}
        order = sorted(range(len(carried)), key=lambda k: by_id[carried[k][0]].arrival_index)
        page = self.kv.page_size
        got = [k for k in order if self.take_pages(by_id[carried[k][0]], carried[k][1] * page)]
        self.adopt(sorted(reqs, key=lambda r: r.arrival_index), {sid for sid, _ in carried}, held)
        return sorted(got)

    def take_pages(self, req: Request, num_tokens: int) -> bool:
        """Pages for the first num_tokens of a request imported with its K/V (Engine.
        import_requests writes the K/V into req.pages): True when the pool has them; False: the
        request computes them again when admitted, as a preempted one does."""
        req.pages, req.cache_node = [], None
        if self.kv.grow(req, num_tokens):
            return True
        req.num_computed_tokens = 0
        if req.status is Status.PAUSED:
            req.pause.action = "discard"  # computed again on resume
        else:
            req.status = Status.WAITING
            req.num_preemptions += 1
        return False

    def adopt(self, reqs: Sequence[Request], carried: Collection[str], held: Collection[str]) -> None:
        """Queues requests imported from another engine (the other side of detach): running
        when their K/V came with them (request ids in carried, pages from take_pages), else
        waiting to compute from the start; held: followers their leader forks later, not
        queued; finished ones are not queued either. The drafter hears each again: its prompt,
        then the tokens it has."""
        for req in reqs:
            req.policy_state = None
            if req.status is Status.FINISHED or req.request_id in held:
                continue
            if req.request_id not in carried:
                req.pages, req.cache_node = [], None
                if req.status is Status.RUNNING:  # nothing computed here yet: starts over as waiting
                    req.status, req.num_computed_tokens = Status.WAITING, 0
            if req.status is Status.PAUSED:
                self.paused.append(req)
                continue
            (self.running if req.status is Status.RUNNING else self.waiting).append(req)
            if req.status is Status.RUNNING or req.num_preemptions:
                self._start_drafting(req)
