"""Requests with tool calls replayed on a live engine in wall-clock time (tools/bench_infercept.py's
live part): the augmented workload's calls (scheduler/infercept/workloads.py) at the positions
it gives (Engine.add_request / resume with intercept_after), each tool a timer that returns its
tokens after its pause. The last segment ends in a pause too, which the replay ends (abort):
the request is complete there. Greedy, EOS ignored."""

from __future__ import annotations

import heapq
import math
import time

import numpy as np

from jinfer.records import RequestRecord
from jinfer.sampling_params import SamplingParams
from scheduler.simulation.workloads import WorkItem


def replay(engine, items: list[WorkItem], vocab: int, seed: int = 0,
           tool_end: dict[str, float] | None = None) -> tuple[list[RequestRecord], float]:
    """Serves `items` on `engine` (its pause policy as set); returns the records (arrival to
    last token, tool time, output tokens) and the wall time. tool_end, if given, is kept at
    request id -> time.perf_counter() its running tool returns (an oracle for pause policies)."""
    rng = np.random.default_rng(seed)
    records = [RequestRecord(i, 0, it.arrival_s, len(it.prompt)) for i, it in enumerate(items)]
    segment = [0] * len(items)
    tools: list[tuple[float, int]] = []  # (when the tool returns, item)
    at, live, start = 0, 0, time.perf_counter()
    while at < len(items) or live or tools:
        now = time.perf_counter() - start
        while at < len(items) and items[at].arrival_s <= now:
            it = items[at]
            longest = max([it.max_tokens] + [c.after_tokens for c in it.tool_calls]) + 1
            params = SamplingParams(temperature=0, max_tokens=longest, ignore_eos=True)
            first = it.tool_calls[0].after_tokens if it.tool_calls else it.max_tokens
            engine.add_request([int(t) % vocab for t in it.prompt], params, request_id=str(at), intercept_after=first)
            at, live = at + 1, live + 1
        while tools and tools[0][0] <= now:
            _, i = heapq.heappop(tools)
            it, k = items[i], segment[i]
            call = it.tool_calls[k]
            segment[i] = k + 1
            after = it.tool_calls[k + 1].after_tokens if k + 1 < len(it.tool_calls) else it.max_tokens
            engine.resume(str(i), rng.integers(10, vocab, call.return_tokens).tolist(), intercept_after=after)
            records[i].tool_s += call.pause_s
            live += 1
        if not engine.has_unfinished():
            waits = [t for t, _ in tools[:1]] + ([items[at].arrival_s] if at < len(items) else [])
            time.sleep(max(0.0, min(waits) - (time.perf_counter() - start)) if waits else 0.0)
            continue
        for out in engine.step():
            i, t = int(out.request_id), time.perf_counter() - start
            rec = records[i]
            if out.new_token_ids and math.isnan(rec.first_token_s):
                rec.first_token_s = t
            if out.finished:  # (a segment never reaches max_tokens: it pauses first)
                rec.output_tokens, rec.finish_s, live = rec.output_tokens + len(out.token_ids), t, live - 1
                continue
            if not out.paused:
                continue
            rec.output_tokens += len(out.token_ids)
            live -= 1
            if segment[i] < len(items[i].tool_calls):  # a tool call: its tool runs now
                rec.tool_calls += 1
                heapq.heappush(tools, (t + items[i].tool_calls[segment[i]].pause_s, i))
                if tool_end is not None:
                    tool_end[str(i)] = start + t + items[i].tool_calls[segment[i]].pause_s
            else:  # the end of its last segment
                rec.finish_s = t
                engine.abort(str(i))
    return records, time.perf_counter() - start
