"""bfcl-eval's multi-turn checking called directly, as its eval runner does after a Hermes-form handler's decode:
the reference that eval/multi_turn.py's `check` is compared with."""

from __future__ import annotations

import uuid

from hephaestus_jax.eval.tool_calls import parse_tool_calls


def bfcl_decode(text: str) -> list[str]:
    """BFCL's decode_execute for a Hermes-form model: the calls written by its `convert_to_function_call`."""
    calls = parse_tool_calls(text) or []
    return [f"{c.name}({','.join(f'{k}={repr(v)}' for k, v in c.arguments.items())})" for c in calls]


def bfcl_verdict(question, ground_truth, texts) -> tuple[bool, str]:
    """bfcl-eval's multi_turn_checker on the decoded steps (empty ones left out, as its eval runner does)."""
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    decoded = [[calls for calls in map(bfcl_decode, turn) if calls] for turn in texts]
    entry = {"id": question.id, "initial_config": question.multi_turn.initial_config,
             "involved_classes": list(question.multi_turn.involved_classes)}
    outcome = multi_turn_checker(decoded, ground_truth, entry, question.category, f"direct_{uuid.uuid4().hex}")
    return outcome["valid"], outcome.get("error_type", "")
