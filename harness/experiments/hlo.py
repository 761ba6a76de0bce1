"""Bytes that cross devices in a compiled program, read from its HLO text.

`collective_traffic(jax.jit(f).lower(*args).compile().as_text())` finds every collective
(all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, and their async
`-start` forms) and sums the bytes of its operands. The compiled module is the SPMD-partitioned
program of one device, so the shapes, and these bytes, are per device.

A collective runs once per call only where it sits on the program's straight path. One inside
a while loop's body runs once per iteration (a count the text does not give), one inside a
conditional's branch only when that branch is taken; each Collective says which (`context`).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# Bytes per element of the HLO primitive types (token[] and opaque types carry no data).
_DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
    "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 1,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")

STEP, LOOP, BRANCH = "step", "loop", "branch"
_RANK = {STEP: 0, BRANCH: 1, LOOP: 2}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: an array (`f32[16,512]{1,0}`) or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    return total


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the program."""

    kind: str  # one of KINDS
    name: str  # its instruction name, e.g. all-reduce.3
    computation: str  # the computation it sits in
    bytes: int  # its operands' bytes on one device
    context: str  # "step": once per call; "loop": per iteration of a while loop; "branch": in a conditional branch


@dataclasses.dataclass(frozen=True)
class CollectiveTraffic:
    """The collectives of one compiled program."""

    ops: tuple[Collective, ...]

    def bytes(self, context: str | None = STEP) -> int:
        """Operand bytes summed over the collectives in `context` (None: all of them)."""
        return sum(op.bytes for op in self.ops if context is None or op.context == context)

    def by_kind(self, context: str | None = STEP) -> dict[str, tuple[int, int]]:
        """kind -> (how many, operand bytes) over the collectives in `context`, every kind listed."""
        out = {k: (0, 0) for k in KINDS}
        for op in self.ops:
            if context is None or op.context == context:
                n, b = out[op.kind]
                out[op.kind] = (n + 1, b + op.bytes)
        return out


def _split_shape(rest: str) -> tuple[str, str]:
    """'(f32[2], s32[2]) all-reduce(...)' -> ('(f32[2], s32[2])', 'all-reduce(...)')."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail.lstrip()


def _operands(call: str) -> tuple[str, str]:
    """'all-reduce(%a, %b), to_apply=%f' -> ('%a, %b', 'to_apply=%f')."""
    start = call.index("(")
    depth = 0
    for i in range(start, len(call)):
        depth += call[i] == "("
        depth -= call[i] == ")"
        if depth == 0:
            return call[start + 1:i], call[i + 1:]
    return call[start + 1:], ""


def _split_top(text: str) -> list[str]:
    """Splits on commas outside brackets and braces."""
    parts, depth, at = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[at:i])
            at = i + 1
    parts.append(text[at:])
    return [p.strip() for p in parts if p.strip()]


def collective_traffic(hlo_text: str) -> CollectiveTraffic:
    """Every collective in a compiled module's text (`Compiled.as_text()`), with its operand
    bytes per device and whether it runs once per call, per loop iteration or in a branch."""
    shapes: dict[str, str] = {}  # instruction name -> its shape
    found = []  # (kind, name, computation, operand texts)
    edges: dict[str, list[tuple[str, str]]] = {}  # computation -> [(callee, STEP | LOOP | BRANCH)]
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("(")[0]:
            current = head.group(2)
            entry = current if head.group(1) else entry
            edges.setdefault(current, [])
            continue
        inst = _INSTRUCTION.match(line)
        if inst is None or current is None:
            continue
        name, rest = inst.groups()
        shape, call = _split_shape(rest)
        shapes[name] = shape
        opcode = call.split("(", 1)[0].strip()
        if "(" not in call:
            continue
        operands, attrs = _operands(call)
        if opcode == "while":
            edges[current] += [(c, LOOP) for c in re.findall(r"(?:condition|body)=%?([\w.\-]+)", attrs)]
        elif opcode == "conditional":
            called = re.findall(r"(?:true_computation|false_computation)=%?([\w.\-]+)", attrs)
            branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
            called += _NAME.findall(branches.group(1)) if branches else []
            edges[current] += [(c, BRANCH) for c in called]
        else:
            edges[current] += [(c, STEP) for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", attrs)]
        kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if kind in KINDS:
            found.append((kind, name, current, _split_top(operands)))
    context = _contexts(entry, edges)
    ops = []
    for kind, name, computation, operands in found:
        total = 0
        for operand in operands:
            ref = _NAME.search(operand)
            inline = operand[:ref.start()] if ref else operand
            if _ARRAY.search(inline):  # the operand's shape is printed beside its name
                total += shape_bytes(inline)
            elif ref:
                total += shape_bytes(shapes.get(ref.group(1), ""))
        ops.append(Collective(kind, name, computation, total, context.get(computation, STEP)))
    return CollectiveTraffic(tuple(ops))


def _contexts(entry: str | None, edges: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """Each computation reachable from the entry -> the strongest way it is reached (a loop
    beats a branch beats the straight path)."""
    if entry is None:
        return {}
    best = {entry: STEP}
    stack = [entry]
    while stack:
        comp = stack.pop()
        for callee, how in edges.get(comp, []):
            ctx = max(best[comp], how, key=_RANK.__getitem__)
            if callee not in best or _RANK[ctx] > _RANK[best[callee]]:
                best[callee] = ctx
                stack.append(callee)
    return best
