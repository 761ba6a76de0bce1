"""How a regroup maps old instances onto new device groups (pure: sets in, indices out), so
the live regroup (jinfer/instances.py) and the adaptive-TP simulator decide it one way."""

from __future__ import annotations

import dataclasses
from typing import AbstractSet, Sequence


@dataclasses.dataclass(frozen=True)
class GroupMatch:
    kept: dict[int, int]
    """old instance -> the new group it moves to (keeping its requests and pool)"""
    heirs: dict[int, int]
    """old instance left without a group, with unfinished requests -> the new group taking them"""
    sources: dict[int, int]
    """new group no old instance moves to -> the old instance its weights are copied from"""

    def dropped(self, num_old: int) -> list[int]:
        return [i for i in range(num_old) if i not in self.kept]


def consecutive_groups(sizes: Sequence[int]) -> list[frozenset[int]]:
    """Device indices of consecutive groups of `sizes` (0..sizes[0]-1, then on)."""
    out, at = [], 0
    for s in sizes:
        out.append(frozenset(range(at, at + s)))
        at += s
    return out


def match_groups(old: Sequence[AbstractSet], new: Sequence[AbstractSet], busy: Sequence[bool]) -> GroupMatch:
    """Old instances (their device sets; busy: has unfinished requests) onto new groups, so that
    as many devices as possible keep what they hold: busy instances first, each to the free
    group it overlaps most, then idle ones (ties: lower indices); a dropped busy instance's
    requests go to the new group it overlaps most; a new group nobody moves to copies weights
    from the old instance overlapping it most."""
    pairs = sorted((not busy[i], -len(old[i] & new[j]), i, j) for i in range(len(old)) for j in range(len(new)))
    kept: dict[int, int] = {}
    for _, _, i, j in pairs:
        if i not in kept and j not in kept.values():
            kept[i] = j
    most = lambda s, groups: max(range(len(groups)), key=lambda k: (len(s & groups[k]), -k))  # noqa: E731
    heirs = {i: most(old[i], new) for i in range(len(old)) if i not in kept and busy[i]}
    taken = set(kept.values())
    sources = {j: most(new[j], old) for j in range(len(new)) if j not in taken}
    return GroupMatch(kept, heirs, sources)
