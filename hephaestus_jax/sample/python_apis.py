"""Real Python APIs as tools: documentation from their signatures and docstrings, parameter types found by calling.

Every pure, deterministic function of a fixed set of standard-library modules is a candidate. Its parameters come
from `inspect.signature`; a parameter's JSON-schema type comes from its default value, or else is found by
probing: argument values of each plausible type (ordered by what the parameter's name suggests) are drawn from a
seeded generator and the function is really called. The first type assignment under which most calls succeed,
return the same JSON-serialisable value twice, and are not all `None` is kept, with the successful calls
(arguments and results) as examples and the failed ones (arguments and error) for error-recovery trajectories.
Everything is a function of the seed and the Python version, so the sample it feeds is reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import io
import ipaddress
import itertools
import json
import math
import random
import re
import signal
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hephaestus_jax.json_lines import json_type

MODULES = (
    "builtins", "math", "statistics", "string", "textwrap", "unicodedata", "colorsys", "calendar", "html",
    "urllib.parse", "shlex", "posixpath", "fnmatch", "keyword", "operator", "bisect", "heapq", "json", "re",
    "difflib", "ipaddress", "email.utils",
)
"""Modules whose public functions are candidates (all pure computation on their arguments)."""

DISPLAY_MODULE = {"builtins": "", "posixpath": "os.path"}
"""Module names as users write them: `abs`, not `builtins.abs`; `os.path.join`, not `posixpath.join`."""

EXCLUDED = frozenset({
    # Interpreter state, I/O, identity or hash randomisation: not pure or not deterministic across runs.
    "builtins.breakpoint", "builtins.compile", "builtins.delattr", "builtins.dir", "builtins.eval", "builtins.exec",
    "builtins.getattr", "builtins.globals", "builtins.hasattr", "builtins.hash", "builtins.help", "builtins.id",
    "builtins.input", "builtins.isinstance", "builtins.issubclass", "builtins.iter", "builtins.locals",
    "builtins.next", "builtins.open", "builtins.print", "builtins.setattr", "builtins.vars", "builtins.aiter",
    "builtins.anext", "builtins.callable", "builtins.__import__", "builtins.__build_class__",
    # Read the file system, the environment or the working directory.
    "posixpath.abspath", "posixpath.exists", "posixpath.expanduser", "posixpath.expandvars", "posixpath.getatime",
    "posixpath.getctime", "posixpath.getmtime", "posixpath.getsize", "posixpath.isdir", "posixpath.isfile",
    "posixpath.islink", "posixpath.ismount", "posixpath.lexists", "posixpath.realpath", "posixpath.relpath",
    "posixpath.samefile", "posixpath.sameopenfile", "posixpath.samestat", "posixpath.isjunction",
    "posixpath.isdevdrive", "posixpath.splitroot",
    # Clock, locale, caches, global state.
    "calendar.setfirstweekday", "calendar.firstweekday", "calendar.timegm", "re.purge", "re.compile",
    "re.template", "email.utils.localtime", "email.utils.make_msgid", "email.utils.formatdate",
    "email.utils.format_datetime", "json.load", "json.dump",
    "calendar.prcal", "calendar.prmonth", "operator.call",
})

MAX_PARAMETERS = 4
PROBE_DRAWS = 8
MIN_SUCCESSES = 5
EXAMPLE_DRAWS = 24
MAX_RESULT_CHARS = 400
CALL_SECONDS = 1.0


class NotJsonable(ValueError):
    """A value that has no faithful JSON form (bytes, objects, huge numbers, long texts)."""


@dataclass(frozen=True)
class Parameter:
    """One parameter as a tool exposes it: a JSON-schema type (and item type for arrays)."""

    name: str
    type: str
    items: str | None = None
    required: bool = True
    default: Any = None
    description: str = ""
    variadic: bool = False  # *args: the array's items become positional arguments
    positional_only: bool = False
    documented: bool = False  # the description is a sentence of the docstring

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": self.type, "description": self.description}
        if self.items is not None:
            schema["items"] = {"type": self.items}
        if not self.required:
            schema["default"] = self.default
        return schema


@dataclass(frozen=True)
class Call:
    """A real call: the arguments given and the JSON form of the result, or the error it raised."""

    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None

    @property
    def observation(self) -> Any:
        """What the caller sees: the result, or `{"error": "Type: message"}`."""
        return self.result if self.error is None else {"error": self.error}


@dataclass(frozen=True, eq=False)
class Api:
    """A Python function presented as a tool."""

    name: str  # as called: "math.gcd", "os.path.join", "abs"
    module: str  # as imported: "math", "posixpath", "builtins"
    summary: str  # the docstring's first paragraph
    doc: str  # the whole docstring, cleaned
    parameters: tuple[Parameter, ...]
    examples: tuple[Call, ...]
    failures: tuple[Call, ...]
    function: Callable[..., Any] = field(repr=False, compare=False)

    @property
    def source(self) -> str:
        """The page of the Python documentation that documents it."""
        page = "functions" if self.module == "builtins" else DISPLAY_MODULE.get(self.module, self.module)
        return f"https://docs.python.org/3/library/{page}.html#{self.name}"

    @property
    def result_type(self) -> str:
        """The JSON type of its results (the most common one among the examples)."""
        kinds = [json_type(call.result) for call in self.examples]
        return max(sorted(set(kinds)), key=kinds.count)

    def parameter_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {p.name: p.schema() for p in self.parameters},
            "required": [p.name for p in self.parameters if p.required],
        }

    def tool(self) -> dict[str, Any]:
        """The Forge tool description (name, short description, JSON-schema parameters)."""
        return {"name": self.name, "description": self.summary, "parameters": self.parameter_schema()}

    def call(self, arguments: Mapping[str, Any]) -> Call:
        """Call the function for real; the result in JSON form, or the error as `Type: message`."""
        try:
            return Call(dict(arguments), result=_call_json(self.function, self.parameters, arguments))
        except NotJsonable:
            raise
        except Exception as e:  # noqa: BLE001 - the error is the observation
            return Call(dict(arguments), error=f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- discovery


def discover(seed: int = 0) -> list[Api]:
    """Every candidate function of MODULES that probing turns into a tool, sorted by name."""
    apis = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for attr in sorted(dir(module)):
            qualified = f"{module_name}.{attr}"
            function = getattr(module, attr)
            if attr.startswith("_") or qualified in EXCLUDED or not _is_function_of(function, module_name):
                continue
            api = probe(qualified, function, seed)
            if api is not None:
                apis.append(api)
    names = [api.name for api in apis]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RuntimeError(f"two APIs share a display name: {sorted(duplicates)}")
    return sorted(apis, key=lambda a: a.name)


_ALSO_DEFINED_IN = {"posixpath": ("genericpath",), "email.utils": ("email._parseaddr",)}
"""Modules whose functions a module re-exports as its own documented API."""


def _is_function_of(value: Any, module_name: str) -> bool:
    """A plain function that the module defines (or its C accelerator `_module`, or a documented re-export)."""
    if not (inspect.isfunction(value) or inspect.isbuiltin(value)):
        return False
    owners = (module_name, f"_{module_name}", *_ALSO_DEFINED_IN.get(module_name, ()))
    return getattr(value, "__module__", None) in owners


def display_name(qualified: str) -> str:
    module_name, attr = qualified.rsplit(".", 1)
    prefix = DISPLAY_MODULE.get(module_name, module_name)
    return f"{prefix}.{attr}" if prefix else attr


def clean_doc(function: Callable[..., Any]) -> tuple[str, str]:
    """(first paragraph, whole docstring) with whitespace tidied; empty when there is no docstring."""
    doc = inspect.getdoc(function) or ""
    doc = "\n".join(line.rstrip() for line in doc.strip().splitlines())
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    summary = " ".join(paragraphs[0].split()) if paragraphs else ""
    return summary, doc


def probe(qualified: str, function: Callable[..., Any], seed: int) -> Api | None:
    """The function as a tool, or None when it has no docstring, no usable signature, or no type assignment under
    which it really works."""
    summary, doc = clean_doc(function)
    if not summary or len(summary) < 12:
        return None
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    shapes = _parameter_shapes(signature)
    if shapes is None:
        return None
    name = display_name(qualified)
    rng = random.Random(zlib.crc32(f"{seed}:{name}".encode()))
    for types in itertools.product(*(shape.candidates for shape in shapes)):
        parameters = tuple(shape.parameter(kind, doc) for shape, kind in zip(shapes, types))
        calls = [_try(function, parameters, draw_arguments(parameters, rng)) for _ in range(PROBE_DRAWS)]
        good = [c for c in calls if c is not None and c.error is None]
        if len(good) < MIN_SUCCESSES or all(c.result is None for c in good):
            continue
        calls += [_try(function, parameters, draw_arguments(parameters, rng)) for _ in range(EXAMPLE_DRAWS)]
        examples = _unique(c for c in calls if c is not None and c.error is None and c.result is not None)
        failures = _unique(c for c in calls if c is not None and c.error is not None)
        return Api(name, qualified.rsplit(".", 1)[0], summary, doc, parameters, tuple(examples),
                   tuple(failures[:4]), function)
    return None


def _unique(calls: Iterator[Call]) -> list[Call]:
    seen, unique = set(), []
    for call in calls:
        key = json.dumps(call.arguments, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(call)
    return unique


@dataclass(frozen=True)
class _Shape:
    """A signature parameter before its type is known."""

    name: str
    candidates: tuple[str, ...]  # "integer", "number", "string", "boolean", "array:<items>"
    required: bool
    default: Any
    variadic: bool
    positional_only: bool

    def parameter(self, kind: str, doc: str) -> Parameter:
        base, _, items = kind.partition(":")
        sentence = docstring_mention(self.name, doc)
        description = sentence or {"integer": "An integer.", "number": "A number.", "string": "A string.",
                                   "boolean": "A flag.", "array": f"A list of {items or 'value'}s."}[base]
        if not self.required:
            description += f" Default: {json.dumps(self.default)}."
        return Parameter(self.name, base, items or None, self.required, self.default, description,
                         self.variadic, self.positional_only, documented=sentence is not None)


_SCALAR_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))


def _parameter_shapes(signature: inspect.Signature) -> list[_Shape] | None:
    """The exposed parameters: required ones, *args as an array, and optional ones with a scalar default
    (**kwargs and other optional ones are left out). None when none is required or there are too many."""
    shapes = []
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            continue  # **kwargs: not exposed; the function works without them
        if p.kind is p.VAR_POSITIONAL:
            shapes.append(_Shape(p.name, ("array:integer", "array:number", "array:string"), True, None, True, True))
        elif p.default is p.empty:
            shapes.append(_Shape(p.name, name_candidates(p.name), True, None, False, p.kind is p.POSITIONAL_ONLY))
        else:
            kind = next((k for t, k in _SCALAR_TYPES if type(p.default) is t), None)
            if kind is not None and p.kind is not p.POSITIONAL_ONLY:
                shapes.append(_Shape(p.name, (kind,), False, p.default, False, False))
    if len(shapes) > MAX_PARAMETERS or not any(s.required for s in shapes):
        return None
    return shapes


_NAME_HINTS = (
    (r"^(s|string|text|pattern|pat|repl|sep|chars|prefix|suffix|path|p|url|urlstring|name|word|fmt|format_spec|"
     r"address|addr|qs|query|encoding|errors|form|unistr|chr|char|c|filename|template|safe|a?str|line|lines|"
     r"scheme|netloc|fragment|dest|delimiter|placeholder|punctuation|x?data_str)$",
     ("string", "integer", "array:string")),
    (r"^(n|k|i|j|index|year|month|day|width|count|base|ndigits|start|stop|end|lo|hi|pos|bits|maxsplit|flags|"
     r"num|size|tabsize|level|precision|code|codepoint|length|y1|y2|number)$",
     ("integer", "number", "string")),
    (r"^(x|y|z|a|b|value|v|r|g|h|l|q|rel_tol|abs_tol|weight|dx|t|exp|obj|o)$",
     ("number", "integer", "array:number", "string")),
    (r"^(iterable|data|seq|sequence|items|list|values|vals|seq1|seq2|elements|possibilities|words|names|"
     r"strings|xs|population|numbers|iterables|args|a_list|m|split_command|fieldvalues|paths)$",
     ("array:number", "array:integer", "array:string")),
)


def name_candidates(name: str) -> tuple[str, ...]:
    """Plausible types for a parameter, most likely first, judged from its name."""
    for pattern, candidates in _NAME_HINTS:
        if re.match(pattern, name):
            return candidates
    return ("string", "number", "array:number")


def docstring_mention(name: str, doc: str) -> str | None:
    """The first (short) docstring sentence that mentions the parameter by name."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(doc.split()))
    mention = re.compile(rf"(?<![\w.]){re.escape(name)}(?![\w(])")
    return next((s for s in sentences if mention.search(s) and len(s) <= 300), None)


# ----------------------------------------------------------------------------- arguments and calls

_STRINGS = {
    "path": ["/usr/local/lib/python3.11/json/__init__.py", "docs/index.rst", "../data/train.jsonl",
             "/home/ada/notes/2024-05-01.txt", "src/app/main.py", "archive.tar.gz"],
    "url": ["https://docs.python.org/3/library/json.html?highlight=dumps#json.dumps",
            "http://example.com:8080/a/b?x=1&y=2", "https://user@api.example.org/v2/items;type=a?page=3",
            "ftp://files.example.org/pub/readme.txt", "search?q=hello%20world&lang=en"],
    "address": ["192.168.1.10", "10.0.0.0/8", "2001:db8::1", "172.16.5.4", "192.168.0.0/24", "::1"],
    "pattern": [r"\d+", r"[A-Z][a-z]+", r"\s+", "o", r"(\w+)@(\w+)\.com", "*.py", "data_??.csv", r"\bthe\b"],
    "char": ["é", "A", "ß", "€", "7", "Ω", "ñ", "½", "z"],
    "email": ["Ada Lovelace <ada@example.com>", "bob@example.org", '"Smith, John" <john.smith@example.net>'],
    "text": ["hello world", "The quick brown fox jumps over the lazy dog", "data-science", "apple,banana,cherry",
             "Hello, World!", "a <b> & 'c'", "München", "42", "  indented text\n  second line", "tab\tseparated",
             "snake_case_name", "CamelCaseName", "x = [1, 2, 3]", "café au lait", "one two three four five six",
             '{"a": 1, "b": [true, null]}', "2024-05-01", "mississippi", "hello", "racecar", "3.14159"],
}
_STRING_KINDS = (
    (r"path|filename|dest|^p$", "path"), (r"url|^qs$|query|netloc|scheme|fragment", "url"),
    (r"address|addr", "address"), (r"pattern|^pat$", "pattern"), (r"^(chr|char|c|unistr)$", "char"),
    (r"email|^name$", "email"),
)


def draw_value(kind: str, name: str, rng: random.Random) -> Any:
    """A plausible value of a JSON-schema type for a parameter named `name`."""
    base, _, items = kind.partition(":")
    if base == "boolean":
        return rng.random() < 0.5
    if base == "integer":
        if re.match(r"^(year|y1|y2)$", name):
            return rng.randint(1990, 2030)
        if name == "width":
            return rng.randint(10, 60)
        if name == "month":
            return rng.randint(1, 12)
        if name == "day":
            return rng.randint(1, 28)
        return rng.randint(0, 12) if rng.random() < 0.5 else rng.randint(1, 120)
    if base == "number":
        if re.match(r"^[rgbhslvyiq]$", name):
            return round(rng.random(), 2)
        return round(rng.uniform(0.1, 100.0), rng.choice((1, 2)))
    if base == "string":
        bank = next((b for pattern, b in _STRING_KINDS if re.search(pattern, name)), "text")
        return rng.choice(_STRINGS[bank])
    length = rng.randint(2, 6)
    if items == "string" and rng.random() < 0.5:
        return rng.sample(["apple", "banana", "cherry", "date", "apricot", "grape", "ape", "peach", "pear"], length)
    return [draw_value(items, "", rng) for _ in range(length)]


def draw_arguments(parameters: Sequence[Parameter], rng: random.Random) -> dict[str, Any]:
    """Values for every required parameter and, now and then, an optional flag or number (optional strings such
    as `encoding` or `errors` keep their defaults: a random text would be no realistic value)."""
    arguments = {}
    for p in parameters:
        if p.required or (p.type != "string" and rng.random() < 0.3):
            arguments[p.name] = draw_value(p.type + (f":{p.items}" if p.items else ""), p.name, rng)
    return arguments


def _try(function: Callable[..., Any], parameters: Sequence[Parameter], arguments: dict[str, Any]) -> Call | None:
    """One probing call: its result or error; None when the result has no JSON form or is not deterministic."""
    try:
        first = _call_json(function, parameters, copy.deepcopy(arguments))
        second = _call_json(function, parameters, copy.deepcopy(arguments))
    except NotJsonable:
        return None
    except Exception as e:  # noqa: BLE001 - an error is a probing outcome
        return Call(arguments, error=f"{type(e).__name__}: {e}")
    return Call(arguments, result=first) if first == second else None


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Timeout()


def _call_json(function: Callable[..., Any], parameters: Sequence[Parameter], arguments: Mapping[str, Any]) -> Any:
    """Call with the arguments mapped onto the signature (positional-only and *args by position), under a time
    limit, and return the result's JSON form."""
    args, kwargs = [], {}
    for p in parameters:
        if p.name not in arguments:
            continue
        value = copy.deepcopy(arguments[p.name])
        if p.variadic:
            args.extend(value)
        elif p.positional_only:
            args.append(value)
        else:
            kwargs[p.name] = value
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CALL_SECONDS)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            result = to_json(function(*args, **kwargs))
    except _Timeout:
        raise NotJsonable("took too long") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if printed.getvalue():
        raise NotJsonable("prints instead of returning (not a pure function)")
    if len(json.dumps(result, ensure_ascii=False)) > MAX_RESULT_CHARS:
        raise NotJsonable("result too long")
    return result


_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network,
                  ipaddress.IPv4Interface, ipaddress.IPv6Interface)


def to_json(value: Any, depth: int = 0) -> Any:
    """The faithful JSON form of a result: tuples and iterators as lists, named tuples as objects, addresses as
    text. Raises NotJsonable for anything else."""
    if depth > 4:
        raise NotJsonable("too deep")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise NotJsonable("integer beyond exact JSON range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJsonable("not finite")
        return value
    if isinstance(value, _ADDRESS_TYPES):
        return str(value)
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: to_json(v, depth + 1) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise NotJsonable("non-string keys")
        return {k: to_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (hasattr(value, "__next__") and hasattr(value, "__iter__")):
        items = list(itertools.islice(value, 31))
        if len(items) > 30:
            raise NotJsonable("too many items")
        return [to_json(v, depth + 1) for v in items]
    raise NotJsonable(f"{type(value).__name__} has no JSON form")
