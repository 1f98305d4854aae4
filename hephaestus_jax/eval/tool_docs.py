"""Tool documents in any common form (Forge's, BFCL's python-ish types, OpenAI's `{"type": "function", ...}`)
turned into Forge tools, with JSON-schema types as BFCL converts them for function-calling models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hephaestus_jax.data import forge
from hephaestus_jax.json_lines import read_json

BFCL_FUNCTION_FIELDS = ("name", "description", "parameters")
"""What the model is shown of a BFCL function document."""


_SCHEMA_TYPES = {
    # BFCL's (Gorilla's) type names -> JSON schema, as the leaderboard converts them for function-calling models.
    "dict": "object", "float": "number", "tuple": "array", "any": "string", "bool": "boolean", "list": "array",
    "integer": "integer", "number": "number", "string": "string", "boolean": "boolean", "array": "array",
    "object": "object", "null": "null",
}


def json_schema(schema: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A copy of a parameter schema with BFCL's python-ish type names turned into JSON-schema names, at every
    depth. A missing type becomes "string", a float gets `"format": "float"` and, as a property, a note in its
    description, as BFCL's `convert_to_tool` does."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where}: a schema must be a JSON object, got {type(schema).__name__}")
    out = dict(schema)
    type_name = out.get("type", "string")
    names = type_name if isinstance(type_name, list) else [type_name]  # JSON schema allows a list of types.
    unknown = [name for name in names if not isinstance(name, str) or name not in _SCHEMA_TYPES]
    if unknown:
        raise ValueError(f"{where}: unsupported type {unknown[0]!r}; supported: {', '.join(_SCHEMA_TYPES)}")
    out["type"] = [_SCHEMA_TYPES[name] for name in names] if isinstance(type_name, list) else _SCHEMA_TYPES[type_name]
    if type_name == "float":
        out.setdefault("format", "float")
    if "properties" in out:
        if not isinstance(out["properties"], Mapping):
            raise ValueError(f"{where}.properties: expected a JSON object")
        out["properties"] = {name: _property_schema(child, f"{where}.{name}")
                             for name, child in out["properties"].items()}
    if "items" in out:
        out["items"] = json_schema(out["items"], f"{where}.items")
    return out


def _property_schema(schema: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = json_schema(schema, where)
    if schema.get("type") == "float":
        out["description"] = out.get("description", "") + " This is a float type value."
    return out


def tool_doc(function: Mapping[str, Any], origin: str) -> forge.ToolDoc:
    """A tool from a function document: Forge's form, BFCL's (python-ish types) or OpenAI's
    `{"type": "function", "function": {...}}`; ForgeFormatError/ValueError naming `origin` when malformed."""
    if function.get("type") == "function" and isinstance(function.get("function"), Mapping):
        function = function["function"]
    document = dict(function)
    name = document.get("name", "?")
    if "parameters" in document:
        document["parameters"] = json_schema(document["parameters"], f"{origin}: function {name!r} parameters")
    document.setdefault("description", "")
    return forge.parse_tool_doc(document, origin)


def read_tools(path: str) -> tuple[forge.ToolDoc, ...]:
    """The tools of a JSON file holding a list of function documents (see `tool_doc`)."""
    functions = read_json(path, list, "a JSON list of function documents")
    return tuple(tool_doc(function, f"{path}[{index}]") for index, function in enumerate(functions))


def bfcl_tools(functions: Sequence[Mapping[str, Any]], where: str) -> tuple[forge.ToolDoc, ...]:
    """The tools a model is shown for BFCL function documents (their name, description and parameters)."""
    return tuple(tool_doc({key: function[key] for key in BFCL_FUNCTION_FIELDS if key in function},
                          f"{where} function {index}") for index, function in enumerate(functions))
