"""Global routing across replicas: Preble's E2 and the baselines, behind one interface.

A router sees each request once (`route`) and hears back from replicas: the first token
(`on_first_token`, for TTFT-driven replication), the finish (`on_finish`), evictions
(`on_evict`) and load reports (`on_load`). The live router (jinfer/router/server.py) also says when a
replica stops answering (`on_replica_down`: never routed to again, its tree entries and
outstanding requests forgotten) and when it answers again (`on_replica_up`: taken back cold).
The simulator and the live router (jinfer/router/) drive the same objects through the interface
jinfer.routing defines.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

from jinfer.routing import NoReplicaUp, ReplicaLoad, RouteRequest, Router  # noqa: F401 - the interface (jinfer's)
from scheduler.cost_model import CostModel
from scheduler.routing.radix import GlobalRadixTree, TreeNode


class _Counting:
    """Outstanding requests per replica (the load the simple baselines see)."""

    name = "base"

    def __init__(self, num_replicas: int):
        if num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas} must be >= 1")
        self.num_replicas = num_replicas
        self.outstanding = [0] * num_replicas
        self.reported: list[ReplicaLoad | None] = [None] * num_replicas  # last load report
        self.up = [True] * num_replicas

    def live(self) -> list[int]:
        """The replicas a request may go to (those not down); NoReplicaUp when none is."""
        live = [r for r in range(self.num_replicas) if self.up[r]]
        if not live:
            raise NoReplicaUp(f"all {self.num_replicas} replicas are down")
        return live

    def _assign(self, r: int) -> int:
        assert self.up[r], f"routed to replica {r}, which is down"
        self.outstanding[r] += 1
        return r

    def on_first_token(self, replica, req, now, ttft_s) -> None:
        pass

    def on_finish(self, replica, req, now) -> None:
        self.outstanding[replica] -= 1

    def on_evict(self, replica, tokens, keep) -> None:
        pass

    def on_load(self, replica, load, now) -> None:
        self.reported[replica] = load

    def on_replica_down(self, replica, now) -> None:
        self.up[replica] = False
        self.outstanding[replica] = 0
        self.reported[replica] = None

    def on_replica_up(self, replica, now) -> None:
        self.up[replica] = True

    def add_replica(self) -> int:
        """A replica joins while routing, down until on_replica_up: its index, the next one."""
        self.num_replicas += 1
        self.outstanding.append(0)
        self.reported.append(None)
        self.up.append(False)
        return self.num_replicas - 1


class RoundRobin(_Counting):
    name = "round-robin"

    def __init__(self, num_replicas: int):
        super().__init__(num_replicas)
        self._next = itertools.cycle(range(num_replicas))

    def add_replica(self) -> int:
        r = super().add_replica()
        self._next = itertools.cycle(range(self.num_replicas))  # the newcomer takes its turn from the next round
        return r

    def route(self, req, now) -> int:
        self.live()  # NoReplicaUp when every replica is down
        r = next(self._next)
        while not self.up[r]:  # skip the down ones, keeping the turn order of the rest
            r = next(self._next)
        return self._assign(r)


class LeastLoad(_Counting):
    """Fewest outstanding requests (lowest index on ties)."""

    name = "least-load"

    def route(self, req, now) -> int:
        return self._assign(min(self.live(), key=lambda r: (self.outstanding[r], r)))


class SGLangCacheAware(_Counting):
    """SGLang's cache-aware router: an approximate prefix tree of what each worker was sent.
    When loads are imbalanced (max − min > balance_abs and max > balance_rel·min) the shortest
    queue wins; otherwise the best-matching worker if its match rate exceeds cache_threshold,
    else the least loaded. The tree is never told of evictions (it is approximate)."""

    name = "sglang"

    def __init__(self, num_replicas: int, balance_abs: int = 64, balance_rel: float = 1.5,
                 cache_threshold: float = 0.3):
        super().__init__(num_replicas)
        self.balance_abs, self.balance_rel, self.cache_threshold = balance_abs, balance_rel, cache_threshold
        self.tree = GlobalRadixTree()

    def route(self, req, now) -> int:
        live, load = self.live(), self.outstanding
        least = min(live, key=lambda r: (load[r], r))
        most = max(load[r] for r in live)
        if most - load[least] > self.balance_abs and most > self.balance_rel * load[least]:
            r = least
        else:
            lengths = self.tree.cached_lengths(req.prompt, live)
            best = max(live, key=lambda r: (lengths[r], -load[r], -r))
            r = best if lengths[best] / len(req.prompt) > self.cache_threshold else least
        self.tree.insert(req.prompt, r, now, record_hit=False)
        return self._assign(r)

    def on_replica_down(self, replica, now) -> None:
        super().on_replica_down(replica, now)
        self.tree.drop_replica(replica)


@dataclasses.dataclass(frozen=True)
class E2Options:
    """Preble's knobs; the ablation turns the post-assignment steps off one by one."""

    window_s: float = 180.0
    """History window H for loads and prefix hit counts."""
    rebalance: bool = True
    """Exploit only while the chosen replica's load is within rebalance_ratio of the lightest."""
    rebalance_ratio: float = 1.5
    replicate: bool = True
    """Copy a hot prefix to another replica when its TTFT doubles across the window."""
    replicate_ratio: float = 2.0
    pd_balance: bool = True
    """Miss-heavy (explore) requests go to the most decode-dominated replica among those whose
    cost is within pd_slack of the cheapest."""
    pd_slack: float = 0.2


class PrebleE2(_Counting):
    """E2 (exploit / explore) over the global radix tree, with Preble's post-assignment steps.

    exploit iff the prompt's cached tokens (on the best replica) exceed its missed tokens: among
    the replicas caching the deepest match, the lowest load L. Otherwise explore: the lowest
    L + M + P, where L = windowed prefill (uncached part) + decode time of requests sent there,
    M = prefill time of the cached nodes admitting this request would evict there, weighted by
    their windowed uses, P = this request's own prefill time there.
    """

    name = "preble-e2"

    def __init__(self, num_replicas: int, cost: CostModel, capacity_tokens: int,
                 options: E2Options = E2Options()):
        super().__init__(num_replicas)
        if capacity_tokens <= 0:
            raise ValueError(f"capacity_tokens={capacity_tokens} must be > 0")
        self.cost, self.capacity, self.opt = cost, capacity_tokens, options
        self.tree = GlobalRadixTree(options.window_s)
        self._history = [collections.deque() for _ in range(num_replicas)]  # (time, prefill_s, decode_s)
        self._sums = [[0.0, 0.0] for _ in range(num_replicas)]
        self._ttft: dict[int, collections.deque] = {}  # id(prefix node) -> (time, ttft)
        self._prefix_of: dict[str, TreeNode] = {}
        self._routes = 0
        self._since_report = [0] * num_replicas  # tokens routed to each replica since its last report
        self.decisions = collections.Counter()  # exploit / explore / rebalance / replicate / pd

    # -- load ------------------------------------------------------------------------------

    def describe(self) -> dict:
        """Its options as data (the live router reports them)."""
        return dataclasses.asdict(self.opt)

    def load(self, r: int, now: float) -> float:
        q, s = self._history[r], self._sums[r]
        while q and q[0][0] < now - self.opt.window_s:
            _, p, d = q.popleft()
            s[0] -= p
            s[1] -= d
        return max(0.0, s[0] + s[1])

    def _decode_share(self, r: int) -> float:
        p, d = self._sums[r]
        return d / (p + d) if p + d > 0 else 1.0

    def free_tokens(self, r: int) -> int:
        """KV room replica r has without evicting: its last report's free pages less what was
        routed there since; before any report, capacity less what the tree says it caches."""
        if self.reported[r] is None:
            return self.capacity - self.tree.tokens_on[r]
        return self.reported[r].free_tokens - self._since_report[r]

    def on_load(self, replica, load, now) -> None:
        super().on_load(replica, load, now)
        self._since_report[replica] = 0

    def add_replica(self) -> int:
        self._history.append(collections.deque())
        self._sums.append([0.0, 0.0])
        self._since_report.append(0)
        return super().add_replica()

    def on_replica_down(self, replica, now) -> None:
        super().on_replica_down(replica, now)
        self.tree.drop_replica(replica)
        self._history[replica].clear()  # the requests sent there are gone: so is their load
        self._sums[replica] = [0.0, 0.0]
        self._since_report[replica] = 0

    def _eviction_cost(self, r: int, new_tokens: int, now: float) -> float:
        need = new_tokens - self.free_tokens(r)
        if need <= 0:
            return 0.0
        leaves = [n for n in self.tree.nodes() if r in n.cached_on
                  and not any(r in c.cached_on for c in n.children.values())]
        leaves.sort(key=lambda n: n.last_used)
        cost = 0.0
        for n in leaves:
            hits = n.window_hits(r, now, self.opt.window_s)
            cost += self.cost.prefill_time(n.num_tokens, n.depth - n.num_tokens) * hits
            need -= n.num_tokens
            if need <= 0:
                break
        return cost

    def _request_cost(self, r: int, req: RouteRequest, cached: int) -> tuple[float, float]:
        n = len(req.prompt)
        prefill = self.cost.prefill_time(n - cached, cached)
        decode = self.cost.decode_time(req.max_tokens, n, batch=max(1, self.outstanding[r]))
        return prefill, decode

    def _explore(self, req, lengths, loads, now, cands) -> tuple[int, str]:
        n = len(req.prompt)
        total = {}
        for r in cands:
            p, _ = self._request_cost(r, req, lengths[r])
            m = self._eviction_cost(r, n - lengths[r] + req.max_tokens, now)
            total[r] = loads[r] + m + p
        best = min(cands, key=lambda r: (total[r], r))
        if self.opt.pd_balance:
            near = [r for r in cands if total[r] <= (1 + self.opt.pd_slack) * total[best]]
            pd = max(near, key=lambda r: (self._decode_share(r), -total[r], -r))
            if pd != best:
                return pd, "pd"
        return best, "explore"

    # -- routing ---------------------------------------------------------------------------

    def route(self, req: RouteRequest, now: float) -> int:
        n = len(req.prompt)
        if n == 0:
            raise ValueError(f"request {req.request_id!r} has an empty prompt")
        live = self.live()
        path, matched = self.tree.match(req.prompt)
        lengths = self.tree.lengths_on_path(path, matched, live)
        loads = {r: self.load(r, now) for r in live}
        best = max(lengths.values())
        deepest = path[-1] if path and best > 0 else None
        if best > n - best:  # exploit
            holders = [r for r in live if lengths[r] == best]
            r = min(holders, key=lambda r: (loads[r], r))
            kind = "exploit"
            if self.opt.rebalance and loads[r] > self.opt.rebalance_ratio * min(loads.values()):
                r, _ = self._explore(req, lengths, loads, now, live)
                kind = "rebalance"
            elif self.opt.replicate and deepest is not None and self._ttft_doubled(deepest, now):
                others = [x for x in live if x not in holders]
                if others:
                    r, _ = self._explore(req, lengths, loads, now, others)
                    kind = "replicate"
                    self._ttft.pop(id(deepest), None)
        else:
            r, kind = self._explore(req, lengths, loads, now, live)
        self.decisions[kind] += 1
        prefill, decode = self._request_cost(r, req, lengths[r])
        self._history[r].append((now, prefill, decode))
        self._sums[r][0] += prefill
        self._sums[r][1] += decode
        self._since_report[r] += n - lengths[r] + req.max_tokens
        new_path = self.tree.insert(req.prompt, r, now)
        if deepest is not None and best > 0:
            self._prefix_of[req.request_id] = new_path[_index_at_depth(new_path, min(best, n))]
        self._routes += 1
        if self._routes % 1024 == 0:
            self.tree.prune(now)
        return self._assign(r)

    def _ttft_doubled(self, node: TreeNode, now: float) -> bool:
        q = self._ttft.get(id(node))
        if not q:
            return False
        while q and q[0][0] < now - self.opt.window_s:
            q.popleft()
        if len(q) < 4:
            return False
        half = len(q) // 2
        early = sum(t for _, t in itertools.islice(q, 0, half)) / half
        late = sum(t for _, t in itertools.islice(q, half, None)) / (len(q) - half)
        return early > 0 and late > self.opt.replicate_ratio * early

    def on_first_token(self, replica, req, now, ttft_s) -> None:
        node = self._prefix_of.pop(req.request_id, None)
        if node is not None:
            self._ttft.setdefault(id(node), collections.deque()).append((now, ttft_s))

    def on_evict(self, replica, tokens, keep) -> None:
        self.tree.evict(tokens, keep, replica)


def _index_at_depth(path: list[TreeNode], depth: int) -> int:
    for i, node in enumerate(path):
        if node.depth >= depth:
            return i
    return len(path) - 1


def make_router(name: str, num_replicas: int, cost: CostModel | None = None, capacity_tokens: int = 0,
                options: E2Options = E2Options()) -> Router:
    """A router by name: round-robin, least-load, sglang, preble-e2."""
    if name == "round-robin":
        return RoundRobin(num_replicas)
    if name == "least-load":
        return LeastLoad(num_replicas)
    if name == "sglang":
        return SGLangCacheAware(num_replicas)
    if name == "preble-e2":
        if cost is None:
            raise ValueError("preble-e2 needs a cost model")
        return PrebleE2(num_replicas, cost, capacity_tokens, options)
    raise ValueError(f"unknown router {name!r}; known: {ROUTERS}")


ROUTERS = ("round-robin", "least-load", "sglang", "preble-e2")
