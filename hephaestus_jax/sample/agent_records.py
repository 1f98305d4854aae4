"""Agent records from real API calls: Forge tool documentation, trajectories and SFT conversations, and
BFCL-format function-calling questions with their possible answers.

Every observation is what the real function returned (or the error it raised) for those arguments; chained
trajectories feed one call's real result into the next call. The wording of queries, thoughts and answers comes
from the API's own documentation through a few templates, chosen by a seeded generator.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from hephaestus_jax.sample.python_apis import Api, Call
from hephaestus_jax.json_lines import json_type

SYSTEM_MESSAGES = (
    "You are a helpful assistant with access to Python functions.",
    "You are an agent that solves tasks by calling the available tools.",
    "Answer the user's request. Call a function when one fits.",
)
MAX_VALUE_CHARS = 160

# ----------------------------------------------------------------------------- wording


_VERBS = frozenset(
    "add apply approximate build calculate check collapse combine compare compute convert count create decode "
    "dedent determine encode escape extract fill filter find format get indent join make normalize parse pop "
    "prepare push quote remove replace round shorten sort split test transform translate truncate unquote "
    "unwrap wrap".split())


def task_phrase(api: Api) -> str:
    """The API's first documented sentence as a lower-case task ('find the absolute value of the argument'); a
    sentence that is not an instruction is attached to the name ('use operator.isub (same as a -= b)')."""
    sentence = api.summary.split(". ")[0].rstrip(".").strip()
    for old, new in (("Return True if ", "check whether "), ("Return true if ", "check whether "),
                     ("Returns True if ", "check whether "), ("Return ", "find "), ("Returns ", "find ")):
        if sentence.startswith(old):
            return new + sentence[len(old):]
    lowered = sentence[:1].lower() + sentence[1:] if sentence[1:2].islower() else sentence
    return lowered if lowered.split(" ", 1)[0] in _VERBS else f"use {api.name} ({lowered})"


def call_text(api: Api, arguments: dict[str, Any]) -> str:
    """A call in Python syntax: `math.gcd(integers=[12, 18])`."""
    return f"{api.name}({', '.join(f'{k}={value_text(v)}' for k, v in arguments.items())})"


def joined_queries(parts: Sequence[str]) -> str:
    """Several requests as one message: 'Do A. Also, do B.'"""
    return " ".join([parts[0], *(f"Also, {p[:1].lower()}{p[1:]}" for p in parts[1:])])


def value_text(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 3] + "..."


def arguments_text(arguments: dict[str, Any]) -> str:
    parts = [f"{name} = {value_text(value)}" for name, value in arguments.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_QUERIES = (
    "{Task} for {args}.",
    "Can you {task}? Use {args}.",
    "I need to {task}, with {args}.",
    "Please {task} given {args}.",
    "Using {args}, {task}.",
    "What do I get if I {task} with {args}?",
)
_THOUGHTS = (
    "{name} can {task}, so I will call it with {args}.",
    "The right tool is {name}; I will pass {args}.",
    "To {task}, I will call {name}.",
)
_ANSWERS = ("The result is {value}.", "{name} returned {value}.", "Done: {value}.")


def query_text(api: Api, arguments: dict[str, Any], rng: random.Random) -> str:
    task = task_phrase(api)
    return rng.choice(_QUERIES).format(task=task, Task=task[:1].upper() + task[1:], args=arguments_text(arguments))


def thought_text(api: Api, arguments: dict[str, Any], rng: random.Random) -> str:
    return rng.choice(_THOUGHTS).format(name=api.name, task=task_phrase(api), args=arguments_text(arguments))


def answer_text(api: Api, result: Any, rng: random.Random) -> str:
    return rng.choice(_ANSWERS).format(name=api.name, value=value_text(result))


# ----------------------------------------------------------------------------- Forge records


def tool_doc_record(api: Api) -> dict[str, Any]:
    """The API's documentation page: whole docstring, JSON-schema parameters, result type, real examples."""
    examples = [f"{call_text(api, c.arguments)} -> {value_text(c.result)}" for c in api.examples[:3]]
    return {"name": api.name, "description": api.doc, "parameters": api.parameter_schema(),
            "returns": f"A JSON {api.result_type} (the Python result converted to JSON).", "examples": examples,
            "source": api.source}


def _tools(targets: Sequence[Api], pool: Sequence[Api], rng: random.Random, max_distractors: int) -> list[dict]:
    """The targets' tool descriptions plus up to `max_distractors` others from the pool, shuffled."""
    names = {a.name for a in targets}
    others = [a for a in pool if a.name not in names]
    chosen = list(targets) + rng.sample(others, min(len(others), rng.randint(0, max_distractors)))
    rng.shuffle(chosen)
    return [a.tool() for a in chosen]


def _step(api: Api, call: Call, rng: random.Random) -> dict[str, Any]:
    return {"thought": thought_text(api, call.arguments, rng), "call": {"name": api.name, "arguments": call.arguments},
            "observation": call.observation}


def chained_call(second: Api, result: Any, rng: random.Random) -> tuple[Call, str] | None:
    """A real call of `second` with the previous call's result as one of its arguments (the others from one of its
    examples) and the name of that argument; None when no parameter takes that type or the call fails."""
    kind = json_type(result)
    slots = [p for p in second.parameters if p.type == kind or (p.type == "number" and kind == "integer")]
    if not slots or not second.examples:
        return None
    slot = rng.choice(slots).name
    call = second.call({**rng.choice(second.examples).arguments, slot: result})
    return (call, slot) if call.error is None and call.result is not None else None


def trajectory_record(api: Api, pool: Sequence[Api], rng: random.Random) -> dict[str, Any]:
    """One trajectory for `api`: a single call, a chain into another API, two calls, or a failed call."""
    call = rng.choice(api.examples)
    kind = rng.choices(("single", "chain", "pair", "error"), weights=(5, 3, 2, 2 if api.failures else 0))[0]
    if kind == "chain":
        second = rng.choice([a for a in pool if a.name != api.name])
        chained = chained_call(second, call.result, rng)
        if chained is not None:
            follow, slot = chained
            rest = {k: v for k, v in follow.arguments.items() if k != slot}
            query = (f"First {task_phrase(api)} for {arguments_text(call.arguments)}, then {task_phrase(second)} "
                     f"with that result as {slot}" + (f" and {arguments_text(rest)}." if rest else "."))
            return {"query": query, "tools": _tools([api, second], pool, rng, 2),
                    "steps": [_step(api, call, rng), _step(second, follow, rng)],
                    "final_answer": f"{api.name} gave {value_text(call.result)}; passing it to {second.name} gave "
                                    f"{value_text(follow.result)}."}
    if kind == "pair" and len(api.examples) > 1:
        other = rng.choice([c for c in api.examples if c is not call])
        query = (f"{query_text(api, call.arguments, rng).rstrip('.?')}, and do the same for "
                 f"{arguments_text(other.arguments)}.")
        return {"query": query, "tools": _tools([api], pool, rng, 2),
                "steps": [_step(api, call, rng), _step(api, other, rng)],
                "final_answer": f"For {arguments_text(call.arguments)}: {value_text(call.result)}. "
                                f"For {arguments_text(other.arguments)}: {value_text(other.result)}."}
    if kind == "error":
        failure = rng.choice(api.failures)
        return {"query": query_text(api, failure.arguments, rng), "tools": _tools([api], pool, rng, 2),
                "steps": [_step(api, failure, rng)],
                "final_answer": f"{api.name} cannot do this for {arguments_text(failure.arguments)}: it raised "
                                f"{failure.error}."}
    return {"query": query_text(api, call.arguments, rng), "tools": _tools([api], pool, rng, 3),
            "steps": [_step(api, call, rng)], "final_answer": answer_text(api, call.result, rng)}


def _system(rng: random.Random) -> list[dict[str, Any]]:
    return [{"role": "system", "content": rng.choice(SYSTEM_MESSAGES)}] if rng.random() < 0.5 else []


def _call_message(api_calls: Sequence[tuple[Api, Call]], rng: random.Random) -> dict[str, Any]:
    api, call = api_calls[0]
    content = thought_text(api, call.arguments, rng) if rng.random() < 0.3 else ""
    return {"role": "assistant", "content": content,
            "tool_calls": [{"name": a.name, "arguments": c.arguments} for a, c in api_calls]}


def _result_message(call: Call) -> dict[str, Any]:
    return {"role": "ipython", "content": call.observation}


def sft_record(api: Api, pool: Sequence[Api], rng: random.Random) -> dict[str, Any]:
    """One SFT conversation for `api`: a call among tools (BFCL's simple/multiple), parallel calls of it,
    parallel calls of it and another API, or a request that none of the given tools can serve (irrelevance)."""
    kind = rng.choices(("simple", "parallel", "parallel_multiple", "irrelevance"), weights=(5, 2, 2, 2))[0]
    call = rng.choice(api.examples)
    if kind == "irrelevance":
        asked = rng.choice([a for a in pool if a.module != api.module] or list(pool))
        tools = _tools([api], [a for a in pool if a.module != asked.module], rng, 2)
        offered = ", ".join(t["name"] for t in tools)
        messages = [*_system(rng), {"role": "user", "content": query_text(asked, rng.choice(asked.examples).arguments,
                                                                          rng)},
                    {"role": "assistant", "content": f"None of the available functions ({offered}) can "
                                                     f"{task_phrase(asked)}, so I cannot answer this with a call."}]
        return {"messages": messages, "tools": tools}
    calls = [(api, call)]
    if kind == "parallel" and len(api.examples) > 1:
        calls += [(api, c) for c in rng.sample([c for c in api.examples if c is not call],
                                               min(len(api.examples) - 1, rng.randint(1, 2)))]
    elif kind == "parallel_multiple":
        other = rng.choice([a for a in pool if a.name != api.name])
        calls.append((other, rng.choice(other.examples)))
    query = joined_queries([query_text(a, c.arguments, rng) for a, c in calls])
    answer = " ".join(f"{call_text(a, c.arguments)} = {value_text(c.result)}." for a, c in calls)
    messages = [*_system(rng), {"role": "user", "content": query}, _call_message(calls, rng),
                *(_result_message(c) for _, c in calls), {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": _tools(list(dict.fromkeys(a for a, _ in calls)), pool, rng, 2)}


# ----------------------------------------------------------------------------- BFCL questions

BFCL_TYPES = {"object": "dict", "number": "float"}
"""BFCL's names for JSON-schema types (the others are shared)."""
BFCL_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")


def bfcl_function(api: Api) -> dict[str, Any]:
    """The API as a BFCL function document (BFCL's type names: dict, float)."""
    properties = {}
    for p in api.parameters:
        schema = {"type": BFCL_TYPES.get(p.type, p.type), "description": p.description}
        if p.items is not None:
            schema["items"] = {"type": BFCL_TYPES.get(p.items, p.items)}
        if not p.required:
            schema["default"] = p.default
        properties[p.name] = schema
    return {"name": api.name, "description": api.summary,
            "parameters": {"type": "dict", "properties": properties,
                           "required": [p.name for p in api.parameters if p.required]}}


def bfcl_truth(api: Api, call: Call) -> dict[str, dict[str, list[Any]]]:
    """BFCL's possible answer for one call: the given value for each argument in the question; an optional
    parameter the question does not mention may be omitted ("") or given its default."""
    truth = {}
    for p in api.parameters:
        if p.name in call.arguments:
            truth[p.name] = [call.arguments[p.name]]
        elif not p.required:
            truth[p.name] = [p.default, ""]
    return {api.name: truth}


def bfcl_question(category: str, index: int, api: Api, pool: Sequence[Api],
                  rng: random.Random) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(question record, possible-answer record or None for irrelevance) of one BFCL category."""
    qid = f"{category}_{index}"
    if category == "irrelevance":
        functions = [api] + rng.sample([a for a in pool if a.module != api.module and a is not api], rng.randint(0, 2))
        asked = rng.choice([a for a in pool if a.module not in {f.module for f in functions}])
        question = query_text(asked, rng.choice(asked.examples).arguments, rng)
        return _bfcl_record(qid, question, functions, rng), None
    if category in ("simple", "multiple"):
        calls = [(api, rng.choice(api.examples))]
    elif category == "parallel":
        calls = [(api, c) for c in rng.sample(list(api.examples), min(len(api.examples), rng.randint(2, 3)))]
    else:  # parallel_multiple
        other = rng.choice([a for a in pool if a.name != api.name])
        calls = [(api, rng.choice(api.examples)), (other, rng.choice(other.examples))]
    functions = list(dict.fromkeys(a for a, _ in calls))
    if category in ("multiple", "parallel_multiple"):
        others = [a for a in pool if a not in functions]
        functions += rng.sample(others, rng.randint(1, 3) if category == "multiple" else rng.randint(0, 2))
    question = joined_queries([query_text(a, c.arguments, rng) for a, c in calls])
    answer = {"id": qid, "ground_truth": [bfcl_truth(a, c) for a, c in calls]}
    return _bfcl_record(qid, question, functions, rng), answer


def _bfcl_record(qid: str, question: str, functions: list[Api], rng: random.Random) -> dict[str, Any]:
    functions = list(functions)
    rng.shuffle(functions)
    return {"id": qid, "question": [[{"role": "user", "content": question}]],
            "function": [bfcl_function(a) for a in functions]}
