"""BFCL's multi-turn categories: the conversation loop a model runs, and BFCL's own executor and checker.

The loop is bfcl-eval's `BaseHandler.inference_multi_turn_FC`: per user turn, the turn's messages (miss_func: at
the turn BFCL names, the withheld functions join the tools and the user says BFCL's
`DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC`), then steps: the model writes, its text is decoded into calls
(`eval/tool_calls.py`, ours as each BFCL handler's decoder is its own); no calls (or no decoding) ends the turn,
else BFCL's `execute_multi_turn_func_call` runs them on the question's back-end instances and the calls and their
results (tool messages) join the chat. More than BFCL's `MAXIMUM_STEP_LIMIT` steps in a turn force-quit the
conversation; a prompt the model's context cannot take ends it as BFCL records an inference error. All
unfinished conversations take each step together, through one `complete` call.

`check` is bfcl-eval's `_evaluate_single_multi_turn_entry` from the texts alone (how BFCL re-scores result files):
re-decode each step, skip undecodable or empty steps, fail a force-terminated run, then `multi_turn_checker`.

One departure, for safety: BFCL `eval`s each call string. A call whose name is neither a back-end method nor a
(dotted) identifier whose head is undefined there, or whose argument names are not identifiers (any of them could
run other Python: `open`, `ls.__func__...`, a JSON name or key holding code), is given to BFCL as
`refused_call_not_a_tool()`, an undefined name, so it fails as an unknown function does (its error text names
that function instead).
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import uuid
from collections.abc import Callable, Sequence

from typing import TYPE_CHECKING, Any

import numpy as np
from jax.sharding import Mesh

from hephaestus_jax import inference
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.data import forge
from hephaestus_jax.eval.bfcl_files import Conversation, MultiTurnSetup, Question, Step, Verdict
from hephaestus_jax.eval.tool_docs import bfcl_tools
from hephaestus_jax.eval.tool_calls import parse_tool_calls

if TYPE_CHECKING:
    from hephaestus_jax.data.chat_format import ChatRenderer  # Imports TensorFlow; only rendering needs it.

MAXIMUM_STEP_LIMIT = 20
"""BFCL's (bfcl_eval.constants.default_prompts): a turn whose step count exceeds it is force-quit."""
ADDED_FUNCTIONS_MESSAGE = "I have updated some more functions you can choose from. What about now?"
"""BFCL's DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC: the user turn at which miss_func's functions arrive."""
REFUSED_CALL = "refused_call_not_a_tool()"

Complete = Callable[[list[np.ndarray]], list[str]]
"""Greedy completions (text, stop token excluded) of prompts, in their order."""
# ------------------------------------------------------------------------------------------- BFCL back-ends


def _bfcl() -> Any:
    """bfcl-eval's executor module (the optional `bfcl` extra)."""
    return importlib.import_module("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils")


def _setup(question: Question) -> MultiTurnSetup:
    if question.multi_turn is None:
        raise ValueError(f"question {question.id!r} is not a multi-turn question")
    return question.multi_turn


def _methods(setup: MultiTurnSetup) -> frozenset[str]:
    """The public method names of the question's back-end classes: the calls BFCL's executor routes to them."""
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING  # lazy: the `bfcl` extra

    names = set()
    for class_name in setup.involved_classes:
        cls = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)
        names.update(name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_"))
    return frozenset(names)


def execute_form(call: forge.ToolCall, methods: frozenset[str]) -> str:
    """The call as BFCL's executor takes it, written as BFCL's `convert_to_function_call` writes a decoded call:
    `name(a='x',b=[1])`; REFUSED_CALL for one that `eval` could turn into other code (see the module's notes)."""
    parts = call.name.split(".")
    safe_name = call.name in methods or (all(part.isidentifier() for part in parts) and not (  # Else NameError.
        parts[0] in methods or hasattr(builtins, parts[0]) or parts[0] in vars(_bfcl())))
    if not safe_name or not all(isinstance(key, str) and key.isidentifier() for key in call.arguments):
        return REFUSED_CALL
    return f"{call.name}({','.join(f'{key}={value!r}' for key, value in call.arguments.items())})"


def _long_context(question_id: str) -> bool:
    category = question_id.rsplit("_", 1)[0]  # As BFCL tells it.
    return "long_context" in category or "composite" in category


class _Backends:
    """BFCL's back-end instances of one run: BFCL keeps them in its executor module's globals, named after a model
    and a question; a name unique to this run keeps runs apart, and `close` drops them."""

    def __init__(self) -> None:
        self.name = f"hephaestus_{uuid.uuid4().hex}"

    def execute(self, question: Question, calls: list[str]) -> list[str]:
        setup = _setup(question)
        results, _ = _bfcl().execute_multi_turn_func_call(
            calls, setup.initial_config, list(setup.involved_classes), self.name, question.id,
            long_context=_long_context(question.id), is_evaL_run=False)
        return results

    def close(self) -> None:
        names = vars(_bfcl())
        for name in [name for name in names if name.startswith(self.name)]:
            del names[name]


# ------------------------------------------------------------------------------------------------ the loop


class _Dialogue:
    """One question's conversation in progress."""

    def __init__(self, question: Question, backends: _Backends, step_limit: int):
        self.question, self.backends, self.step_limit = question, backends, step_limit
        self.setup = _setup(question)
        self.methods = _methods(self.setup)
        self.functions = list(question.functions)
        self.tools = bfcl_tools(self.functions, f"question {question.id!r}")
        self.messages: list[forge.Message] = []
        self.conversation = Conversation()
        self.steps = 0
        self.done = False
        self._begin_turn()

    def _begin_turn(self) -> None:
        index = len(self.conversation.turns)
        if index == len(self.question.turns):
            self.done = True
            return
        turn = self.question.turns[index]
        if index in self.setup.added_functions:
            self.functions += self.setup.added_functions[index]
            self.tools = bfcl_tools(self.functions, f"question {self.question.id!r}")
            turn = [{"role": "user", "content": ADDED_FUNCTIONS_MESSAGE}]
        self.messages += [forge.Message(message["role"], message["content"]) for message in turn]
        self.conversation.turns.append([])
        self.steps = 0

    def prompt(self, renderer: ChatRenderer) -> np.ndarray:
        # renderer.prompt, not render_chat_prompt: the model's calls are fed back as it wrote them, even those that
        # do not match the tools (BFCL's executor answers them with an error), which render_chat_prompt refuses.
        return renderer.prompt(self.messages, self.tools)

    def fail(self, error: str) -> None:
        self.conversation.error = error
        self.done = True

    def advance(self, text: str) -> None:
        """The model's step: decode, execute, and end the turn (no calls) or the conversation (step limit)."""
        calls = parse_tool_calls(text)
        step: Step = {"text": text, "calls": None if calls is None else
                      [{"name": call.name, "arguments": dict(call.arguments)} for call in calls], "results": []}
        self.conversation.turns[-1].append(step)
        if not calls:
            self.messages.append(forge.Message("assistant", text))
            self._begin_turn()
            return
        step["results"] = self.backends.execute(self.question, [execute_form(call, self.methods) for call in calls])
        self.messages.append(forge.Message("assistant", "", tuple(calls)))
        self.messages += [forge.Message("ipython", result) for result in step["results"]]
        self.steps += 1
        if self.steps > self.step_limit:  # BFCL's force quit: the conversation ends with this turn.
            self.done = True


def run_multi_turn(questions: Sequence[Question], renderer: ChatRenderer, complete: Complete, *,
                   context_length: int, step_limit: int = MAXIMUM_STEP_LIMIT) -> dict[str, Conversation]:
    """Every question's conversation with the model behind `complete`, by id; all unfinished conversations take
    each step through one `complete` call. A prompt of more than `context_length` - 2 tokens (BFCL's local
    handlers' bound) ends its conversation with an inference error."""
    backends = _Backends()
    try:
        dialogues = [_Dialogue(question, backends, step_limit) for question in questions]
        active = [dialogue for dialogue in dialogues if not dialogue.done]
        while active:
            ready, prompts = [], []
            for dialogue in active:
                prompt = dialogue.prompt(renderer)
                if prompt.size + 2 > context_length:
                    dialogue.fail(f"the prompt has {prompt.size} tokens; the model's context is {context_length}")
                else:
                    ready.append(dialogue)
                    prompts.append(prompt)
            texts = complete(prompts) if prompts else []
            if len(texts) != len(prompts):
                raise ValueError(f"complete returned {len(texts)} texts for {len(prompts)} prompts")
            for dialogue, text in zip(ready, texts):
                dialogue.advance(text)
            active = [dialogue for dialogue in active if not dialogue.done]
    finally:
        backends.close()
    return {dialogue.question.id: dialogue.conversation for dialogue in dialogues}


def model_completer(config: ModelConfig, params: Any, vocab: Any, *, max_new_tokens: int, batch_size: int,
                    mesh: Mesh | None = None) -> Complete:
    """`complete` by the model: greedy, up to `max_new_tokens` and (as BFCL's local handlers ask) no further than
    the context's end less 2 tokens."""
    def complete(prompts: list[np.ndarray]) -> list[str]:
        completions = inference.complete(config, params, prompts, max_new_tokens=max_new_tokens,
                                         stop_ids=inference.stop_ids_of(vocab), mesh=mesh,
                                         batch_size=batch_size)
        budget = [config.max_position_embeddings - prompt.size - 2 for prompt in prompts]
        return [vocab.decode(tokens[:limit].tolist()) for tokens, limit in zip(completions, budget)]

    return complete


# ------------------------------------------------------------------------------------------------ checking


def decode_turns(question: Question, texts: Sequence[Sequence[str]]) -> list[list[list[str]]]:
    """Each turn's decoded steps as BFCL's executor takes them, undecodable and empty steps left out (BFCL's
    `_evaluate_single_multi_turn_entry`)."""
    methods = _methods(_setup(question))
    decoded = []
    for turn in texts:
        steps = []
        for text in turn:
            calls = parse_tool_calls(text)
            if calls:
                steps.append([execute_form(call, methods) for call in calls])
        decoded.append(steps)
    return decoded


def check(question: Question, ground_truth: Sequence[Sequence[str]], result: Sequence[Sequence[str]] | str) -> Verdict:
    """BFCL's verdict on a multi-turn question from the model's step texts per turn (`Conversation.bfcl_result`;
    a string is an inference error, as in BFCL's result files)."""
    if isinstance(result, str) or not isinstance(result, Sequence):
        return Verdict(False, "Error during inference phase. Model did not output a list of model responses.",
                       "multi_turn:inference_error")
    if len(result) != len(ground_truth):
        return Verdict(False, f"Model was force-terminated during inference phase. The length of the model result "
                              f"turns ({len(result)}) does not match the length of the ground truth turns "
                              f"({len(ground_truth)}).", "multi_turn:force_terminated")
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker  # lazy: the extra

    setup = _setup(question)
    entry = {"id": question.id, "initial_config": setup.initial_config,
             "involved_classes": list(setup.involved_classes)}
    backends = _Backends()
    try:
        outcome = multi_turn_checker(decode_turns(question, result), [list(turn) for turn in ground_truth], entry,
                                     question.category, backends.name)
    finally:
        backends.close()
    if outcome["valid"]:
        return Verdict(True)
    return Verdict(False, outcome["error_message"], outcome["error_type"])
