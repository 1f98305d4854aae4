"""FLOPs and HBM bytes of a compiled XLA program, loop bodies times their trip counts.

XLA's cost analysis counts the body of every while loop once, and the train step is mostly loops: the scanned
layers (forward and backward), the gradient-accumulation scan, the loss chunks. So the compiled program is
analysed again here, each loop body multiplied by its trip count. The analysis runs on the optimised TPU
program through the host's (CPU) XLA client, which gives exactly the TPU's FLOPs; its byte sizes ignore the
TPU's tile padding (which matters only for dimensions that are not multiples of 128).
"""

from __future__ import annotations

import dataclasses
import re

import jax

_COMPUTATION_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_WHILE = re.compile(r" while\(%([\w.\-]+)\).*\bcondition=%([\w.\-]+), body=%([\w.\-]+)")
_CALLED = re.compile(r"\b(?:to_apply|calls|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SCALAR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (?:pred|[su](?:8|16|32|64))\[\]\S* ([\w\-]+)\(([^)]*)\)(.*)$")
_TUPLE_OPERANDS = re.compile(r"\btuple\(([^)]*)\)")


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """FLOPs and HBM bytes of one run of a compiled program (per device), loop bodies times their trip counts."""

    flops: float
    bytes_accessed: float
    loops: int  # While loops found.
    unknown_trip_counts: int  # Of those, loops whose trip count was not found (counted once).


@dataclasses.dataclass(frozen=True)
class LoopCost:
    """One computation of a program, its entry or a while loop's body, with its own cost: the bodies of the loops
    it runs are excluded (they have their own LoopCost)."""

    name: str
    depth: int  # 0: the entry; 1: a loop the entry runs; ...
    runs: int  # Times one run of the program runs it: trip counts multiplied (an unknown one counts as 1).
    trip_known: bool  # Its own trip count was found (the entry's is).
    flops: float  # Per run.
    bytes_accessed: float  # Per run.


def program_cost_by_loop(hlo_text: str) -> list[LoopCost]:
    """The entry and every while-loop body of an optimised HLO module (`compiled.as_text()`), depth first: where a
    program's FLOPs and HBM bytes go (`bench/peers_aot.py --by_loop`)."""
    computations = _computations(hlo_text)
    analyse = _cost_analyser(hlo_text)
    found: list[LoopCost] = []

    def visit(name: str, depth: int, runs: int, trip_known: bool) -> None:
        flops, traffic = analyse(name)  # Its loops' bodies counted once each: subtracted below.
        loops = _loops_under(computations, name)
        for _, _, body in loops:
            body_flops, body_traffic = analyse(body)
            flops, traffic = flops - body_flops, traffic - body_traffic
        found.append(LoopCost(name, depth, runs, trip_known, flops, traffic))
        for parent, while_line, body in loops:
            trip = _trip_count(computations, parent, while_line)
            visit(body, depth + 1, runs * (1 if trip is None else trip), trip is not None)

    visit(re.search(r"^ENTRY %([\w.\-]+) ", hlo_text, re.M).group(1), 0, 1, True)
    return found


def program_cost(hlo_text: str) -> ProgramCost:
    """ProgramCost of an optimised HLO module (`compiled.as_text()`)."""
    parts = program_cost_by_loop(hlo_text)
    return ProgramCost(sum(part.runs * part.flops for part in parts),
                       sum(part.runs * part.bytes_accessed for part in parts), len(parts) - 1,
                       sum(not part.trip_known for part in parts))


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION_HEADER.match(line)
        if header and line.endswith("{"):
            current = computations.setdefault(header.group(1), [])
        elif line == "}":
            current = None
        elif current is not None:
            current.append(line)
    return computations


def _loops_under(computations: dict[str, list[str]], name: str) -> list[tuple[str, str, str]]:
    """(computation holding it, while instruction, body) of the loops that `name` runs directly or through
    calls/branches (not those nested in other loops' bodies)."""
    loops, seen, pending = [], {name}, [name]
    while pending:
        parent = pending.pop()
        for line in computations[parent]:
            loop = _WHILE.search(line)
            if loop:
                loops.append((parent, line, loop.group(3)))
                continue
            called = _CALLED.findall(line) + [n.strip().lstrip("%") for b in _BRANCHES.findall(line)
                                              for n in b.split(",")]
            for callee in called:
                if callee in computations and callee not in seen:
                    seen.add(callee)
                    pending.append(callee)
    return loops


def _trip_count(computations: dict[str, list[str]], parent: str, while_line: str) -> int | None:
    """XLA's trip-count annotation, else from the loop's counter: `(bound - start) / step` rounded up, where the
    condition is `counter < bound`, the body adds `step` to it and the loop starts it at `start` (constants)."""
    known = _KNOWN_TRIP_COUNT.search(while_line)
    if known:
        return int(known.group(1))
    init, condition, body = _WHILE.search(while_line).groups()
    cond = _scalars(computations[condition])
    compare = next((i for i in cond.values() if i[0] == "compare" and "direction=LT" in i[2]), None)
    if compare is None or len(compare[1]) != 2:
        return None
    index, bound = _tuple_index(cond, compare[1][0]), _constant(cond, compare[1][1])
    step = _counter_step(computations[body], index)
    start = _constant(_scalars(computations[parent]), _tuple_operand(computations[parent], init, index))
    if None in (index, bound, step, start) or step <= 0:
        return None
    return max(0, -(-(bound - start) // step))


def _scalars(lines: list[str]) -> dict[str, tuple[str, list[str], str]]:
    """Scalar instructions of a computation: name -> (opcode, operand names or constant literal, attributes)."""
    found = {}
    for line in lines:
        match = _SCALAR.match(line)
        if match:
            name, opcode, operands, attributes = match.groups()
            found[name] = (opcode, [o.strip().lstrip("%") for o in operands.split(",")], attributes)
    return found


def _resolve(scalars: dict, name: str | None) -> tuple[str, list[str], str] | None:
    """The instruction `name` is a copy of (following copies)."""
    while name in scalars and scalars[name][0] == "copy":
        name = scalars[name][1][0]
    return scalars.get(name)


def _constant(scalars: dict, name: str | None) -> int | None:
    instruction = _resolve(scalars, name)
    return int(instruction[1][0]) if instruction and instruction[0] == "constant" else None


def _tuple_index(scalars: dict, name: str | None) -> int | None:
    """The tuple element `name` reads (following copies): a get-tuple-element, or newer XLA's `%tuple#index`."""
    while name in scalars and scalars[name][0] == "copy":
        name = scalars[name][1][0]
    element = re.fullmatch(r"[\w.\-]+#(\d+)", name or "")
    if element:
        return int(element.group(1))
    instruction = scalars.get(name)
    index = re.search(r"\bindex=(\d+)", instruction[2]) if instruction and instruction[0] == "get-tuple-element" \
        else None
    return int(index.group(1)) if index else None


def _tuple_operand(lines: list[str], name: str, index: int | None) -> str | None:
    """Operand `index` of the tuple instruction `name` (a loop's initial or next state)."""
    line = next((line for line in lines if re.match(rf"\s*(?:ROOT )?%{re.escape(name)} = ", line)), "")
    operands = _TUPLE_OPERANDS.search(line)
    if operands is None or index is None:
        return None
    names = re.findall(r"%([\w.\-]+(?:#\d+)?)", operands.group(1))
    return names[index] if index < len(names) else None


def _counter_step(body: list[str], index: int | None) -> int | None:
    """The constant the loop body adds to tuple element `index` (the counter)."""
    root = next((line for line in body if line.lstrip().startswith("ROOT ")), "")
    root_name = re.match(r"\s*ROOT %([\w.\-]+) = ", root)
    scalars = _scalars(body)
    update = _resolve(scalars, _tuple_operand(body, root_name.group(1), index) if root_name else None)
    if update is None or update[0] != "add" or len(update[1]) != 2:
        return None
    for counter, step in (update[1], update[1][::-1]):
        if _tuple_index(scalars, counter) == index and _constant(scalars, step) is not None:
            return _constant(scalars, step)
    return None


def _cost_analyser(hlo_text: str):
    """A function: computation name -> (flops, bytes accessed) of it as the entry, loop bodies counted once."""
    from jax._src.lib import _jax  # XLA's HloCostAnalysis on a parsed module (no public JAX API for this).
    from jaxlib import _hlo

    client = jax.local_devices(backend="cpu")[0].client
    lines = hlo_text.split("\n")
    cache: dict[str, tuple[float, float]] = {}

    def analyse(name: str) -> tuple[float, float]:
        if name not in cache:
            body = [line[len("ENTRY "):] if line.startswith("ENTRY ") else line for line in lines[1:]]
            body = [f"ENTRY {line}" if line.startswith(f"%{name} (") else line for line in body]
            module = _hlo.hlo_module_from_text("\n".join(["HloModule cost", *body]))
            cost = _jax.hlo_module_cost_analysis(client, module)
            cache[name] = (cost.get("flops", 0.0), cost.get("bytes accessed", 0.0))
        return cache[name]

    return analyse
