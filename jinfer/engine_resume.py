"""The engine's side of requests paused at a tool call (jinfer.pausing holds the mechanism and
the pause policies): resuming them with the tool's output, and the host-tier copies of the K/V
a SWAP moves out of the pool and back."""

from __future__ import annotations

from typing import Sequence

from jinfer.detokenizer import IncrementalDetokenizer
from jinfer.errors import shorten
from jinfer.request import Status
from jinfer.step_plan import StepPlan


class Resuming:
    """Paused requests in the engine (jinfer.engine.Engine mixes it in): it uses the engine's
    tokenizer, runner, scheduler, host tier (`host_kv`) and samples by public id (`_groups`),
    gives a resumed sample a fresh text (Request.text), and settles the step in flight before a
    resume."""

    def resume(self, request_id: str, tool_output: str | Sequence[int], index: int = 0,
               intercept_after: int | None = None) -> None:
        """Continues a paused request (its output ended with one of its intercept_token_ids)
        with its tool's output appended (text is tokenized without special tokens): what it
        generates next equals a fresh request over prompt + output + tool output, with the
        same parameters and seed; its outputs start a new segment. index: which sample of an
        n > 1 request; intercept_after: pause it again after that many tokens (add_request's).
        ValueError naming the problem (nothing changes) if the request is not paused here or
        the new prompt does not fit."""
        samples = self._groups.get(request_id)
        if samples is None or not 0 <= index < len(samples):
            raise ValueError(f"request_id={shorten(request_id)} index={index} is not unfinished in this engine")
        req = samples[index]
        if intercept_after is not None and not 1 <= intercept_after:
            raise ValueError(f"intercept_after={intercept_after} must be >= 1")
        if req.status is not Status.PAUSED:
            raise ValueError(f"request_id={shorten(request_id)} is {req.status.value}, not paused")
        if isinstance(tool_output, str):
            ids = self.tokenizer.encode(tool_output, add_special_tokens=False) if tool_output else []
        else:
            ids = list(tool_output)
        self.check_prompt(req.all_ids + ids, req.params)
        self._settle_inflight()  # its sample past the tool call, if a step was in flight
        self.scheduler.resume(req, ids, intercept_after)
        req.text = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, req.params.stop, req.params.intercept)

    def num_paused(self) -> int:
        """Requests waiting for resume()."""
        return len(self.scheduler.paused)

    def warm_swaps(self) -> int:
        """Compiles the host tier's copies (read_pages, the move to host memory, write_pages) for
        every power-of-two page count a request can swap, so the first swaps of a run do not
        wait on compiles; returns how many sizes. Before serving: it rewrites pages with their
        own contents, which a step in flight must not be writing."""
        sizes, n = [], 1
        while n < 2 * min(self.runner.pages_per_seq, self.runner.num_pages):
            sizes.append(min(n, self.runner.num_pages))
            n *= 2
        for n in sizes:
            pages = list(range(n))
            self.host_kv.put("_warm", self.runner.read_pages(pages), n)
            self.runner.write_pages(pages, self.host_kv.take("_warm", n))
        self.host_kv.swapped_out = self.host_kv.swapped_in = 0
        return len(sizes)

    def _swap(self, plan: StepPlan) -> None:
        """The plan's host-tier copies, before its step: paused requests' K/V out of the pages
        the step may reuse, then resumed ones' back into their new pages. Dispatched in order
        behind the step in flight, so they read what it writes."""
        for rid, pages in plan.swap_out:
            self.host_kv.put(rid, self.runner.read_pages(pages), len(pages))
        for rid, pages in plan.swap_in:
            self.runner.write_pages(pages, self.host_kv.take(rid, len(pages)))
