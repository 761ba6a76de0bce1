"""Where the tail of a growing sequence matches in a suffix tree that others change (suffix_tree.py).

It relies on the tree's promise about node objects: a node keeps the path that ends at its end
for life (a split inserts a new node above it, a fuse hands its start to its only child and
leaves `forward` pointing there, a deletion leaves count 0 and no forward), so positions kept
here are repaired after a change instead of found again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # (annotations only: suffix_tree imports this module)
    from scheduler.speculation.suffix_tree import Position, SuffixTree, _Node


class TailMatcher:
    """Where the tail of a growing token sequence (a request's context) matches in a tree that
    others change: the positions of its last m tokens for m = 1..L, kept up to date in O(L) per
    token and repaired (not recomputed) after the tree changes."""

    def __init__(self, tree: SuffixTree, context: Sequence[int]):
        self.tree = tree
        self.context = context
        """The sequence whose tail is matched (the caller appends to it, then calls advance)."""
        self.length = len(context)  # tokens of context the positions account for
        self.nodes: list[_Node] = []  # nodes[m - 1]: the node holding the end of the last m tokens
        self._version = -1
        self._sync()

    def positions(self) -> list[Position]:
        """Positions for m = 1..L (shortest first)."""
        self._sync()
        return list(zip(self.nodes, range(1, len(self.nodes) + 1)))

    def advance(self, token: int) -> None:
        """The context grew by `token` (already appended to it)."""
        self._sync()
        self.length += 1
        md = self.tree.max_depth
        first = self.tree.root.children.get(token)
        if first is None or md < 2:
            self.nodes = []
            return
        new = [first]
        # Last m tokens + token absent => last m + 1 tokens + token absent: stop at the first miss.
        for i, node in enumerate(self.nodes[:md - 2]):
            m = i + 1
            end = node.depth
            if end < 0:
                end = min(len(node.seq) - node.start, md)
            if m < end:
                if node.seq[node.start + m] != token:
                    break
                new.append(node)
            else:
                child = node.children.get(token)
                if child is None:
                    break
                new.append(child)
        self.nodes = new

    def _sync(self) -> None:
        tree = self.tree
        if self._version == tree.version:
            return
        self._version = tree.version
        nodes = self.nodes
        for i, node in enumerate(nodes):
            while node.count == 0:  # fused into its child, or deleted (the match is gone)
                node = node.forward
                if node is None:
                    del nodes[i:]
                    break
            else:
                while i + 1 <= node.parent.depth:  # split: the position is now in an ancestor
                    node = node.parent
                nodes[i] = node
                continue
            break
        # New sequences may make longer tails match.
        ctx, n = self.context, self.length
        while len(nodes) < min(n, tree.max_depth - 1):
            m = len(nodes) + 1
            pos = tree.find(ctx[n - m:n])
            if pos is None:
                break
            nodes.append(pos[0])
