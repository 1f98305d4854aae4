"""bfcl-eval's own single-turn checking of one question's decoded calls, and its language-specific function
documents; the one module that imports bfcl-eval (files: bfcl_files.py; scoring a run: bfcl.py).

`check` does what bfcl-eval's `eval_runner` does with a model's output once the model's handler has decoded it
(decoding is ours: `tool_calls.parse_tool_calls`, as each BFCL handler decodes its own model's text):
`_evaluate_single_relevance_entry` for the (ir)relevance categories (a call was made when the output decoded to
a non-empty list), otherwise `_evaluate_single_ast_entry`: `is_function_calling_format_output`, then
`ast_checker` with the category's Language (Python, Java or JavaScript, by BFCL's `is_java`/`is_js`) and
BFCL's category name.

`ast_checker.py` imports `bfcl_eval.constants.model_config`, which imports every API client (anthropic,
openai, ...); the checker uses it only in `convert_func_name`, to ask whether a model's function names had
their dots replaced by underscores. Where that module cannot be imported, a stand-in answering "no" (as for
the local function-calling model named by MODEL_NAME) is put in `sys.modules` for the import of the checker
alone.
"""

from __future__ import annotations

import collections
import copy
import functools
import importlib
import sys
import types
from collections.abc import Sequence
from typing import Any, NamedTuple

from hephaestus_jax import command
from hephaestus_jax.data.forge import ToolCall
from hephaestus_jax.eval.bfcl_files import GroundTruth, Question, Verdict, bfcl_category

MODEL_NAME = "meta-llama_Llama-3.1-8B-Instruct-FC"
"""The model name the checker is given: a local function-calling model whose function names keep their dots
(`underscore_to_dot=False` in bfcl-eval's model_config; BFCL writes registry names with '_' for '/')."""

_MODEL_CONFIG = "bfcl_eval.constants.model_config"
_AST_CHECKER = "bfcl_eval.eval_checker.ast_eval.ast_checker"


def check(question: Question, calls: Sequence[ToolCall] | None, ground_truth: GroundTruth | None) -> Verdict:
    """bfcl-eval's verdict on `calls`, the decoded output of a model for `question` (None: it did not decode).

    `ground_truth` may be None for the (ir)relevance categories, which have none. Raises ValueError where
    bfcl-eval's checker fails on the question's data (its message names the failure)."""
    bfcl = _bfcl()
    category = bfcl_category(question.category)
    if bfcl.utils.is_relevance_or_irrelevance(category):
        made_a_call = calls is not None and not bfcl.utils.is_empty_output(bfcl_calls(calls))
        if "irrelevance" in category:
            if not made_a_call:
                return Verdict(True)
            return Verdict(False, "Valid syntax. Successfully decode AST when it should not.",
                           "irrelevance_error:decoder_success")
        if made_a_call:
            return Verdict(True)
        why = "the output did not decode as tool calls" if calls is None else "it decoded to no call"
        return Verdict(False, f"Invalid syntax. Failed to decode AST when it should have: {why}.",
                       "relevance_error:decoder_failed")
    if ground_truth is None:
        raise ValueError(f"category {question.category!r} needs a ground truth")
    if calls is None:
        return Verdict(False, "Invalid syntax. Failed to decode AST: the output did not decode as tool calls.",
                       "ast_decoder:decoder_failed")
    decoded = bfcl_calls(calls)
    if not bfcl.utils.is_function_calling_format_output(decoded):
        return Verdict(False, "Did not output in the specified format.", "ast_decoder:decoder_wrong_output_format")
    language = bfcl.Language.JAVA if bfcl.utils.is_java(category) else (
        bfcl.Language.JAVASCRIPT if bfcl.utils.is_js(category) else bfcl.Language.PYTHON)
    try:
        result = bfcl.ast_checker(copy.deepcopy(question.functions), decoded, copy.deepcopy(ground_truth),
                                  language, category, MODEL_NAME)
    except Exception as error:  # BFCL's checker failing on this question's data: name it, as BFCL would crash.
        raise ValueError(f"bfcl-eval's checker failed: {type(error).__name__}: {error}") from error
    if result["valid"]:
        return Verdict(True)
    return Verdict(False, _reason(result["error"]), result["error_type"])


def bfcl_calls(calls: Sequence[ToolCall]) -> list[dict[str, dict[str, Any]]]:
    """Calls in the form BFCL's handlers decode to: `[{name: {argument: value}}, ...]`."""
    return [{call.name: copy.deepcopy(dict(call.arguments))} for call in calls]


def shown_functions(question: Question) -> list[dict[str, Any]]:
    """The question's function documents as bfcl-eval shows them to a model (its language-specific
    pre-processing: a language note in each description; Java and JavaScript parameters as strings, their
    described type and element types in the description), a copy. BFCL's step is private; its public wrapper
    takes whole entries and reads the category from their ids."""
    pre_process = _bfcl().utils._func_doc_language_specific_pre_processing  # noqa: SLF001
    return pre_process(copy.deepcopy(question.functions), bfcl_category(question.category))


def _reason(errors: Sequence[Any]) -> str:
    """BFCL's error list on one line (a parallel mismatch lists each model call's own errors)."""
    parts = []
    for error in errors:
        if isinstance(error, dict):
            for where, detail in error.items():
                parts.append(f"{where}: {' '.join(map(str, detail.get('sub_error', [])))}")
        else:
            parts.append(str(error))
    return " ".join(parts)


class _Bfcl(NamedTuple):
    utils: types.ModuleType  # bfcl_eval.utils
    Language: Any  # bfcl_eval.constants.enums.Language
    ast_checker: Any


@functools.cache
def _bfcl() -> _Bfcl:
    """bfcl-eval's checker and utilities, imported once (MissingExtra when bfcl-eval is not installed)."""
    command.require("bfcl")
    enums = importlib.import_module("bfcl_eval.constants.enums")
    utils = importlib.import_module("bfcl_eval.utils")
    return _Bfcl(utils=utils, Language=enums.Language, ast_checker=_import_ast_checker().ast_checker)


def _import_ast_checker() -> types.ModuleType:
    if _AST_CHECKER in sys.modules:
        return sys.modules[_AST_CHECKER]
    try:
        importlib.import_module(_MODEL_CONFIG)
    except ImportError:  # Its API clients are not installed: the checker gets the stand-in.
        sys.modules[_MODEL_CONFIG] = _model_config_stand_in()
        try:
            return importlib.import_module(_AST_CHECKER)
        finally:
            del sys.modules[_MODEL_CONFIG]
    return importlib.import_module(_AST_CHECKER)


def _model_config_stand_in() -> types.ModuleType:
    module = types.ModuleType(_MODEL_CONFIG, "Stand-in for bfcl-eval's model_config: every model is local, "
                                             "its function names keep their dots.")
    local = types.SimpleNamespace(underscore_to_dot=False)
    module.MODEL_CONFIG_MAPPING = collections.defaultdict(lambda: local)
    return module

