"""What a compiled program moves between chips: every collective in its HLO text, per chip, with
loop bodies counted as often as they run.

    found = collectives(compiled.as_text(), unknown_trips=steps)
    totals(found)              # {"all-gather": bytes per chip and call, ...}

A collective's `bytes` is its whole buffer on one chip: an all-gather's output, a reduce-scatter's
input, an all-reduce's or all-to-all's operand, a collective-permute's payload. `link_bytes` is
what one chip sends for it in a ring over its group of g chips: (g - 1) / g of the buffer, twice
that for an all-reduce (a reduce-scatter then an all-gather), the whole payload for a permute.
A while loop with a known trip count multiplies its body: the layer scan, the vocab chunks, the
micro-batches, XLA:TPU's windowed matmuls. XLA:CPU records the count in the loop's backend config;
otherwise a condition that is just `counter < constant` gives it (counters start at 0 in every
loop XLA or lax.scan writes). A loop whose count depends on the data (the sampler's decode loops)
is counted `unknown_trips` times. Of a conditional's branches the
costliest is counted. Plain text parsing: no JAX.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
               "f8e4m3fn": 1, "f8e5m2": 1}


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    shapes: tuple  # ((dtype, dims), ...) of its per-chip result (several when XLA combined them)
    bytes: float  # per chip, one execution (see the module docstring)
    group: int  # chips in each of its groups
    trips: float  # executions per call of the program
    loops: tuple  # the while loops around it, outermost first: (body name, trips, known count?)

    @property
    def link_bytes(self) -> float:
        """Bytes one chip sends over its links for one execution (ring algorithms)."""
        if self.kind == "collective-permute":
            return self.bytes
        share = (self.group - 1) / self.group if self.group > 1 else 0.0
        return self.bytes * share * (2 if self.kind == "all-reduce" else 1)

    @property
    def in_data_dependent_loop(self) -> bool:
        """Inside a while loop whose trip count XLA does not know (the sampler's decode loop)."""
        return any(not known for _, _, known in self.loops)

    @property
    def elements(self) -> int:
        return sum(math.prod(dims) for _, dims in self.shapes)


def collectives(hlo_text: str, unknown_trips: float = 1) -> list[Collective]:
    """Every collective reachable from the entry computation, each with its executions per call."""
    comps, entry = _computations(hlo_text)
    out: list[Collective] = []
    if entry is None:
        return out
    _walk(comps, entry, 1.0, (), unknown_trips, out, set())
    return out


def totals(found: list[Collective], link: bool = False) -> dict[str, float]:
    """Bytes per chip and call of each kind (every kind present, 0 when absent); `link`: bytes
    sent over the links instead of buffer bytes."""
    out = dict.fromkeys(KINDS, 0.0)
    for c in found:
        out[c.kind] += c.trips * (c.link_bytes if link else c.bytes)
    return out


def largest(found: list[Collective]) -> Collective | None:
    """The collective with the largest buffer."""
    return max(found, key=lambda c: c.bytes, default=None)


def describe(c: Collective) -> str:
    """e.g. 'all-reduce bf16[98176,14336]'."""
    return c.kind + " " + ", ".join(f"{dt}[{','.join(map(str, dims))}]" for dt, dims in c.shapes)


def loop_bodies(hlo_text: str, trips: int) -> list[list[Collective]]:
    """For each while loop that runs `trips` times (by its known trip count), the collectives of
    its body (and what it calls), each counted once: the per-layer collectives of a layer scan."""
    comps, _ = _computations(hlo_text)
    out = []
    for comp in comps.values():
        for inst in comp:
            if inst["op"] == "while" and _known_trips(inst["attrs"], comps, inst["condition"]) == trips:
                found: list[Collective] = []
                _walk(comps, inst["body"], 1.0, (), 1, found, set(), count_loops=False)
                out.append(found)
    return out


# ----------------------------------------------------------------------------------------------
# Parsing

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w+)\[([\d,]*)\]")


def _computations(text: str):
    comps: dict[str, list[dict]] = {}
    entry = None
    current = None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        inst = _instruction(line)
        if inst is not None:
            comps[current].append(inst)
    return comps, entry


def _instruction(line: str):
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    rest = m.group(2)
    if rest.startswith("("):  # a tuple type: up to its matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        type_text, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    op = rest.split("(", 1)[0]
    attrs = rest
    inst = {"name": m.group(1), "type": type_text, "op": op, "attrs": attrs, "root": line.lstrip().startswith("ROOT ")}
    for key in ("body", "condition", "calls", "true_computation", "false_computation"):
        found = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
        inst[key] = found.group(1) if found else None
    branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    inst["branches"] = [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else []
    return inst


def _arrays(type_text: str):
    return tuple((dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_text))


def _nbytes(arrays) -> float:
    return sum(DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in arrays)


def _tuple_elements(type_text: str) -> list[str]:
    """The top-level elements of a tuple type '(a, (b, c), d)'."""
    inner, parts, depth, start = type_text[1:-1], [], 0, 0
    for i, ch in enumerate(inner):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return parts


def _group_size(attrs: str) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)  # iota form [groups, size]<=[...]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)  # mesh['a'=8,'b'=1] {'a'}
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(k, 1) for k in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m:
        return 2
    return 1


def _known_trips(attrs: str, comps, condition):
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
    if m:
        return int(m.group(1))
    if condition not in comps:
        return None
    insts = {i["name"]: i for i in comps[condition]}
    root = next((i for i in comps[condition] if i["root"]), None)
    if root is None or root["op"] != "compare" or "direction=LT" not in root["attrs"]:
        return None
    operands = re.findall(r"%([\w.\-]+)", root["attrs"].split(")", 1)[0])
    ops = [insts.get(o, {}).get("op") for o in operands]
    if len(operands) != 2 or ops[0] != "get-tuple-element" or ops[1] != "constant":
        return None
    found = re.match(r"constant\((\d+)\)", insts[operands[1]]["attrs"])
    return int(found.group(1)) if found else None


def _collective(inst) -> tuple[str, tuple, float] | None:
    op = inst["op"]
    base = op[:-len("-start")] if op.endswith("-start") else op
    if base not in KINDS:
        return None
    type_text = inst["type"]
    if op.endswith("-start") and base in ("all-gather", "collective-permute", "reduce-scatter") \
            and type_text.startswith("("):
        elements = _tuple_elements(type_text)
        type_text = elements[1] if len(elements) > 1 else type_text  # (operands, results, ...)
    arrays = _arrays(type_text)
    nbytes = _nbytes(arrays)
    if base == "reduce-scatter":
        nbytes *= _group_size(inst["attrs"])  # its input: the whole buffer
    return base, arrays, nbytes


def _walk(comps, name, trips, loops, unknown_trips, out, stack, count_loops: bool = True):
    if name not in comps or name in stack:
        return
    stack = stack | {name}
    for inst in comps[name]:
        if inst["op"].endswith("-done"):
            continue
        found = _collective(inst)
        if found is not None:
            kind, arrays, nbytes = found
            out.append(Collective(kind, arrays, nbytes, _group_size(inst["attrs"]), trips, loops))
            continue
        if inst["op"] == "while":
            known = _known_trips(inst["attrs"], comps, inst["condition"])
            n = (known if known is not None else unknown_trips) if count_loops else 1
            inner = loops + ((inst["body"], n, known is not None),)
            for key in ("body", "condition"):
                _walk(comps, inst[key], trips * n, inner, unknown_trips, out, stack, count_loops)
        elif inst["op"] == "conditional":
            branches = inst["branches"] or [b for b in (inst["true_computation"], inst["false_computation"]) if b]
            best: list[Collective] = []
            for b in branches:
                found_b: list[Collective] = []
                _walk(comps, b, trips, loops, unknown_trips, found_b, stack, count_loops)
                if sum(c.bytes for c in found_b) >= sum(c.bytes for c in best):
                    best = found_b
            out.extend(best)
        elif inst["calls"] and inst["op"] in ("fusion", "call", "async-start"):
            _walk(comps, inst["calls"], trips, loops, unknown_trips, out, stack, count_loops)
