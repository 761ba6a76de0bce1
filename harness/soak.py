"""A soak: many concurrent clients against one server, well-behaved and hostile mixed, for a while.

Each of `concurrency` workers loops until `duration_s` is up, picking one action at random:
a normal request (greedy or sampled, n of 1-3, logprobs or not), a stream cancelled after a
few messages, a tight deadline (1-50 ms), a duplicate request id, or a bad input (negative
temperature, unknown tier, n above max_n, an empty prompt, out-of-vocabulary ids, undecodable
bytes, a 1 MB stop list with an empty entry). Every call must end the way its action allows
(normal: completes or RESOURCE_EXHAUSTED; bad: INVALID_ARGUMENT; cancelled: CANCELLED; tight:
OK or DEADLINE_EXCEEDED); anything else is counted `unexpected`, with a sample kept. A worker
told RESOURCE_EXHAUSTED waits 50-250 ms before its next call.

Afterwards the server must settle: nothing outstanding, every page free or cached (its
WatchReplica load). With the server's pid, its resident memory is sampled through the run.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time

import grpc

from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc

SETTLE_S = 60.0
"""After the run, how long the server may take to free its last pages (a bound on a hang)."""
ACTIONS = ("normal", "normal", "normal", "sampled_n", "cancel", "tight_deadline", "duplicate_id", "bad")
BAD = ("temperature", "tier", "n", "empty", "vocab", "undecodable", "stop")


@dataclasses.dataclass
class SoakReport:
    duration_s: float
    calls: int
    outcomes: dict  # "action: status" -> count
    unexpected: list  # up to 20 "action: status details"
    tokens: int  # output tokens received by normal requests
    settled: bool  # nothing outstanding and no page held after the run
    final_load: dict
    rss_mib: list  # (seconds since start, MiB) samples of the server process, if a pid was given

    @property
    def rss_growth_mib(self) -> float:
        """Resident memory at the end minus after the first quarter of the run (warm-up)."""
        if len(self.rss_mib) < 2:
            return 0.0
        warm = [m for t, m in self.rss_mib if t >= self.duration_s / 4] or [self.rss_mib[-1][1]]
        return self.rss_mib[-1][1] - warm[0]

    def table(self) -> str:
        lines = [f"{self.calls} calls in {self.duration_s:.0f} s, {self.tokens} tokens streamed; "
                 f"settled afterwards: {self.settled} (load {self.final_load})"]
        for key, count in sorted(self.outcomes.items()):
            lines.append(f"  {key:40s} {count:7d}")
        if self.rss_mib:
            lines.append(f"server RSS: {self.rss_mib[0][1]:.0f} MiB at start, {self.rss_mib[-1][1]:.0f} MiB at "
                         f"the end, {self.rss_growth_mib:+.0f} MiB since the first quarter")
        lines += [f"UNEXPECTED {u}" for u in self.unexpected]
        return "\n".join(lines)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _allowed(action: str) -> set[str]:
    return {"normal": {"OK", "RESOURCE_EXHAUSTED"}, "sampled_n": {"OK", "RESOURCE_EXHAUSTED"},
            "cancel": {"CANCELLED", "OK", "RESOURCE_EXHAUSTED"},
            "tight_deadline": {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"},
            "duplicate_id": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
            "bad": {"INVALID_ARGUMENT"}}[action]


async def soak(target: str, *, concurrency: int = 200, duration_s: float = 60.0, seed: int = 0,
               server_pid: int | None = None, metadata=(), call_timeout_s: float = 120.0) -> SoakReport:
    """Runs the soak against a jinfer server at `target` (host:port); returns what happened."""
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.InferenceStub(channel)
    info = await stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata, timeout=60)
    raw = channel.unary_stream("/jinfer.v1.Inference/Generate", request_serializer=None, response_deserializer=None)
    vocab, max_len = info.vocab_size, info.max_model_len
    outcomes: collections.Counter = collections.Counter()
    unexpected: list[str] = []
    tokens = [0]
    running_ids: set[str] = set()
    start = time.monotonic()
    deadline = start + duration_s
    rss: list[tuple[float, float]] = []

    def prompt(rng):
        return pb.TokenIds(ids=[rng.randrange(3, vocab) for _ in range(rng.randint(4, max_len // 4))])

    def request(rng, action) -> tuple[pb.GenerateRequest | bytes, float]:
        req = pb.GenerateRequest(token_ids=prompt(rng), max_tokens=rng.randint(1, max_len // 4),
                                 request_id=f"soak-{rng.getrandbits(48):x}")
        timeout = call_timeout_s
        if action in ("sampled_n", "cancel"):
            req.temperature, req.top_p, req.seed = rng.choice([0.7, 1.0, 1.3]), rng.choice([0.9, 1.0]), rng.randrange(9)
            req.n, req.logprobs = rng.randint(1, 3), rng.random() < 0.5
        elif action == "normal":
            req.temperature = rng.choice([0.0, 0.8])
            req.ignore_eos = rng.random() < 0.5
        elif action == "tight_deadline":
            timeout = rng.uniform(0.001, 0.05)
        elif action == "duplicate_id" and running_ids:
            req.request_id = rng.choice(sorted(running_ids))
        elif action == "bad":
            kind = rng.choice(BAD)
            if kind == "temperature":
                req.temperature = -1.0
            elif kind == "tier":
                req.tier = "no-such-tier-" + "x" * rng.choice([10, 100_000])
            elif kind == "n":
                req.n = rng.choice([1 << 20, 2**31 - 1])
            elif kind == "empty":
                req.ClearField("token_ids")
            elif kind == "vocab":
                req.token_ids.ids.append(vocab + 5)
            elif kind == "stop":
                req.stop.extend(["s" * (1 << 20), ""])
            elif kind == "undecodable":
                return rng.choice([b"\x0a\x02\xff\xfe", b"\x0a\x10ab", b"\xff\xff\xff\xff"]), timeout
        return req, timeout

    async def one(rng, action):
        req, timeout = request(rng, action)
        call = (raw(req, timeout=timeout, metadata=metadata) if isinstance(req, bytes)
                else stub.Generate(req, timeout=timeout, metadata=metadata))
        rid = None if isinstance(req, bytes) else req.request_id
        status, details, finished = "OK", "", set()
        try:
            messages = 0
            async for msg in call:
                messages += 1
                if rid is not None and action != "duplicate_id":
                    running_ids.add(rid)
                if action == "cancel" and messages >= 2:
                    call.cancel()
                    break
                if not isinstance(msg, bytes):
                    tokens[0] += len(msg.token_ids)
                    if msg.finish_reason:
                        finished.add(msg.index)
            if action == "cancel" and messages >= 2:
                status = "CANCELLED"
            elif not isinstance(req, bytes) and len(finished) < max(req.n, 1):
                status, details = "INCOMPLETE", f"{len(finished)} of {max(req.n, 1)} samples finished"
        except grpc.aio.AioRpcError as e:
            status, details = e.code().name, e.details() or ""
        except asyncio.CancelledError:
            status = "CANCELLED"
        finally:
            if rid is not None:
                running_ids.discard(rid)
        outcomes[f"{action}: {status}"] += 1
        if status not in _allowed(action) and len(unexpected) < 20:
            unexpected.append(f"{action}: {status} {details[:200]}")
        return status

    async def worker(i):
        rng = random.Random(seed * 100_003 + i)
        while time.monotonic() < deadline:
            if await one(rng, rng.choice(ACTIONS)) == "RESOURCE_EXHAUSTED":
                await asyncio.sleep(rng.uniform(0.05, 0.25))  # as a client told to retry later would

    async def sample_rss():
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - start, _rss_mib(server_pid)))
            await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    if server_pid is not None:
        tasks.append(asyncio.create_task(sample_rss()))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    load, settled = {}, False
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:  # aborts of the last cancelled streams may still be queued
        events = stub.WatchReplica(pb.WatchReplicaRequest(min_interval_s=0.05), metadata=metadata)
        ev = await events.read()
        events.cancel()
        load = {f.name: getattr(ev.load, f.name) for f in ev.load.DESCRIPTOR.fields}
        if (ev.load.outstanding == ev.load.running == ev.load.waiting == 0
                and ev.load.free_pages + ev.load.cached_pages == ev.load.num_pages):
            settled = True
            break
        await asyncio.sleep(0.1)
    if server_pid is not None:
        rss.append((elapsed, _rss_mib(server_pid)))
    await channel.close()
    await asyncio.sleep(0.1)  # the channel's poller delivers its last callbacks before the loop closes
    return SoakReport(elapsed, sum(outcomes.values()), dict(outcomes), unexpected, tokens[0], settled, load, rss)
