"""The engine after the device step: a step's sampled rows read back, settled by the scheduler
(Scheduler.update: tokens, finish and pause rules, each sample's text with its stop and
intercept strings) and built into RequestOutputs."""

from __future__ import annotations

import itertools
import time

from jinfer.request import Request, RequestOutput, Status, Usage
from jinfer.step_plan import StepPlan


class Postprocessing:
    """Reading steps back (jinfer.engine.Engine mixes it in): it uses the engine's runner,
    scheduler, its samples by public id (`_groups`, each with its text: Request.text), and the
    step in flight and outputs held for the next step()."""

    def _settle_inflight(self) -> None:
        """Reads back the step in flight (async scheduling); its outputs come with the next step()."""
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            self._held_outputs += self._postprocess(*done[:3])  # out of band: not a step's time
        self._busy = False  # nor is the work around it: the next step's time starts with it

    def _request(self, sample_id: str) -> Request:
        """The Request object of one sample ("<id>" or "<id>/<i>")."""
        public, _, index = sample_id.partition("/")
        return self._groups[public][int(index or 0)]

    def _postprocess(self, plan: StepPlan, reqs: list[Request], handle, compiled=None,
                     drafting: bool = False, pipelined: bool = False) -> list[RequestOutput]:
        """A step read back: settled, reported to the scheduler (unless compiled is None: read
        out of band; or True: it compiled; drafting: planned in drafting mode; pipelined:
        dispatched before the step ahead of it was read) and built into outputs."""
        tokens, logprobs = self.runner.fetch(handle)
        now = time.monotonic()
        firsts = list(itertools.accumulate((1 + seq.num_draft for seq in plan.seqs), initial=0))  # first rows
        rows = tokens.tolist()  # one conversion; each sequence's rows are a slice of it
        sampled = [rows[a:b] for a, b in zip(firsts[:-1], firsts[1:])]
        settled = self.scheduler.update(plan, reqs, sampled)
        self._observe(plan, compiled, sum(len(s.tokens) for s in settled), drafting, pipelined)
        outputs = []
        for s in settled:
            req = s.req
            req.output_logprobs.extend(float(logprobs[firsts[s.index] + r]) for r in s.rows)
            if req.first_token_time is None:
                req.first_token_time = now
            if s.paused:
                req.text.flush()  # the segment ends here: no stop string can straddle the tool call
            if s.finish_reason:
                req.finish_time = now
                public = req.request_id.partition("/")[0]
                samples = self._groups.get(public, ())  # gone if a sibling settled it this step
                if samples and all(r.status is Status.FINISHED for r in samples):
                    del self._groups[public]
            outputs.append(self._output(req, n_new=len(s.tokens)))
        return outputs

    def _observe(self, plan: StepPlan, compiled: bool | None, emitted: int, drafting: bool,
                 pipelined: bool = False) -> None:
        """Reports a step read back to the scheduler (its policy and draft budget). Its time
        runs from the step before it being read back (or from the start of the step() call
        that found the engine idle, or after out-of-band work: Engine.step): the whole step
        when steps run one at a time, one pipeline period when they pipeline (a step is not
        charged the one before it), and either way the caller's time between step() calls.
        Not reported: a step read out of band (compiled None), one that compiled or whose
        successor compiled before it was read (compiled True: its time is not a step's), one
        whose decoding requests had all ended before it was read (it settled nothing).
        pipelined: it was dispatched before the step ahead of it was read, so its time is one
        pipeline period, not its planning, dispatch and whole device time."""
        now = time.perf_counter()
        seconds, self._last_read = now - self._last_read, now
        decoding = plan.num_decoding
        if compiled is False and (emitted or not decoding):
            self.scheduler.observe_step(plan.num_tokens, seconds, emitted, any(s.num_draft for s in plan.seqs),
                                        num_decoding=decoding, decode_only=decoding == len(plan.seqs),
                                        drafting=drafting, pipelined=pipelined)

    def _output(self, req: Request, n_new: int) -> RequestOutput:
        detok = req.text
        finished = req.status is Status.FINISHED
        paused = req.status is Status.PAUSED
        new_ids = req.output_ids[-n_new:]
        return RequestOutput(
            request_id=req.request_id.partition("/")[0], index=req.sample_group, new_token_ids=new_ids,
            new_text=detok.delta(finished or paused),
            new_logprobs=req.output_logprobs[-n_new:] if req.params.logprobs else None,
            token_ids=list(req.output_ids), text=detok.text[:detok.emitted], finished=finished,
            finish_reason=req.finish_reason,
            usage=Usage(len(req.prompt_ids), len(req.output_ids), req.num_cached_prompt_tokens,
                        req.num_draft_tokens, req.num_accepted_tokens, req.num_spec_steps),
            arrival_time=req.arrival_time, first_token_time=req.first_token_time,
            finish_time=req.finish_time, paused=paused)
