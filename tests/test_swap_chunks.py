"""Swaps in chunks (jinfer.pausing): with a per-step swap budget, swap-outs and swap-ins move
the pages the budget allows each step, swaps under way first; a request whose chunks are
coming back in waits holding their pages (nobody else's page hunt takes them) without holding
up the requests behind it. Scheduler-level: the plans' copies checked page by page (the
end-to-end equality of a chunked swap is tests/test_infercept.py's swap-chunks case)."""

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.pausing import PRESERVE, SWAP
from jinfer.request import Request, Status
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler

PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, intercept_token_ids=(9,))


class Budgeted:
    """Swaps every paused request (the first asked first) within `tokens` a step."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    def decide(self, paused, view):
        return {r.request_id: SWAP for r in paused}

    def swap_budget_tokens(self, view):
        return self.tokens


def _swapped_out(num_pages: int) -> tuple[Scheduler, Request]:
    """A scheduler (4-token pages, a budget of two pages a step) whose request "a" paused after
    12 prompt tokens and swapped them out in two chunks (its last 2 pages, then its first)."""
    s = Scheduler(CacheConfig(page_size=4, num_pages=num_pages), SchedulerConfig(64, 4, 64), num_pages,
                  pause_policy=Budgeted(8))
    a = Request("a", list(range(10, 22)), PARAMS, 0, 0.0, 0)
    s.add(a)
    s.update(s.schedule(), [a], [9])
    pages = list(a.pages)
    assert s.schedule().swap_out == (("a", tuple(pages[1:3])),)
    assert s.schedule().swap_out == (("a", (pages[0],)),)
    assert not a.pages and a.pause.swap_chunks == [2, 1] and s.kv.num_free + s.kv.num_cached == num_pages
    return s, a


def _resumed_beside(s: Scheduler, a: Request, max_tokens: int) -> tuple[Request, Request]:
    """c (4 tokens, running after one step), then a resumed with 2 tool tokens (12 swapped + the
    intercept token + 2: 15 tokens) and d (12 tokens) queued behind it."""
    c = Request("c", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), 0, 0.0, 2)
    s.add(c)
    s.update(s.schedule(), [c], [1])
    s.resume(a, [50, 51])
    d = Request("d", list(range(60, 72)), PARAMS, 0, 0.0, 3)
    s.add(d)
    return c, d


def test_swap_ins_come_in_chunks_first_in_the_budget_and_do_not_hold_up_later_requests():
    s, a = _swapped_out(32)
    c, d = _resumed_beside(s, a, max_tokens=8)
    plan = s.schedule()
    # c runs, so a's chunks are worth spreading: pages for its 15 tokens, its leading page (the
    # last chunk out) comes back, the next chunk (2 pages) is over the 4 tokens left; a waits
    # restoring and d behind it runs
    pages = list(a.pages)
    assert len(pages) == 4 and plan.swap_in == (("a", (pages[0],)),)
    assert a.status is Status.WAITING and a.pause.restoring and a.num_computed_tokens == 4
    assert [seq.request_id for seq in plan.seqs] == ["c", "d"]
    s.update(plan, [c, d], [1, 1])
    plan = s.schedule()  # the restore first in the budget: its last chunk; then a runs, first
    assert plan.swap_in == (("a", tuple(pages[1:3])),) and a.pages == pages
    assert [seq.request_id for seq in plan.seqs] == ["a", "c", "d"]
    seq = plan.seqs[0]
    assert (seq.start_pos, seq.token_ids, seq.pages) == (12, (9, 50, 51), tuple(pages))
    assert a.status is Status.RUNNING and a.pause is None and not s._restoring
    assert s.pause_stats.swapped_in_tokens == 12 and s.pause_stats.recomputed_tokens == 0


def test_a_restoring_request_keeps_its_pages_and_gets_every_chunk_once_nothing_runs():
    s, a = _swapped_out(8)
    c, d = _resumed_beside(s, a, max_tokens=2)
    plan = s.schedule()  # c (2 pages) and a's restore (4 pages) leave 2: d (3) cannot take a's
    pages = list(a.pages)
    assert plan.swap_in == (("a", (pages[0],)),) and a.pause.restoring and len(pages) == 4
    assert [seq.request_id for seq in plan.seqs] == ["c"] and not d.pages
    assert s.update(plan, [c], [1])[0].finish_reason == "length"
    plan = s.schedule()  # nothing runs: the restore takes its last chunk whatever the budget
    assert plan.swap_in == (("a", tuple(pages[1:3])),) and a.pages == pages
    assert [seq.request_id for seq in plan.seqs] == ["a", "d"]


def test_with_nothing_running_a_swapped_request_comes_back_whole_and_runs_at_once():
    s, a = _swapped_out(32)
    s.resume(a, [50, 51])
    plan = s.schedule()
    assert plan.swap_in == (("a", (a.pages[0],)), ("a", tuple(a.pages[1:3])))
    assert [seq.request_id for seq in plan.seqs] == ["a"] and not s._restoring


def test_aborting_a_restoring_request_returns_its_pages():
    s, a = _swapped_out(32)
    c, d = _resumed_beside(s, a, max_tokens=8)
    s.schedule()
    assert a.pause.restoring and len(a.pages) == 4
    s.abort([a])
    assert not s._restoring and not a.pages and not s.schedule().swap_in
    s.abort([c, d])
    assert s.kv.num_free + s.kv.num_cached == 32
    assert all(n.lock_ref == 0 for n in s.prefix_cache.nodes())


def test_swaps_take_the_step_budget_in_the_order_the_policy_answers_and_go_on_first():
    """A budget of two 4-token pages a step: the request the answer lists first takes it (the
    last pages of its K/V first), the other waits; next step the swap under way goes on first,
    then the other starts with what is left."""
    class LaterFirst:
        def decide(self, paused, view):
            return {r.request_id: SWAP for r in reversed(paused)}

        def swap_budget_tokens(self, view):
            return 8

    s = Scheduler(CacheConfig(page_size=4, num_pages=32), SchedulerConfig(64, 4, 64), 32, pause_policy=LaterFirst())
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, intercept_token_ids=(9,))
    a = Request("a", list(range(10, 22)), params, 0, 0.0, 0)
    b = Request("b", list(range(30, 42)), params, 0, 0.0, 1)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    s.update(plan, [a, b], [9, 9])  # 12 prompt tokens each (3 pages), then the intercept token
    assert [r.request_id for r in s.paused] == ["a", "b"]
    b_pages = list(b.pages)
    plan = s.schedule()
    assert plan.swap_out == (("b", tuple(b_pages[1:3])),)
    assert (b.num_computed_tokens, b.pause.swapped_tokens, b.pages) == (4, 8, b_pages[:1])
    assert a.pause.action == PRESERVE and len(a.pages) == 3
    a_pages = list(a.pages)
    plan = s.schedule()
    assert plan.swap_out == (("b", (b_pages[0],)), ("a", (a_pages[2],)))
    assert not b.pages and b.pause.swap_chunks == [2, 1] and a.num_computed_tokens == 8 and len(a.pages) == 2
