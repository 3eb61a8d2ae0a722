"""JSON Schema for constrained decoding: `response_format` json_schema and the arguments of forced tool calls.

`SchemaBuilder` compiles a schema (the subset OpenAI's strict mode takes: object, array, string, number, integer,
boolean, null, enum, const, anyOf, $ref to $defs) into numbered nodes; `Schema` runs them byte by byte as a
nondeterministic automaton. Its state is a set of agendas, each a stack of what is left to write (top last), so
anyOf and optional properties need no lookahead. Replies come out as `json.dumps` writes them (", " and ": "), the
form a model saw its tool calls in during SFT; properties in the schema's order, every required one present.

Bounds are held as they are written: a string's length (in characters), a number's minimum/maximum (a bounded number
is written without an exponent: each prefix is kept only while some number it begins is within them); a string with
a `pattern` or `format` is written in printable ASCII, each prefix kept while the `regex` module's partial match says
some ending of it matches.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import regex

from mateconv.json_grammar import JSON_DONE, MAX_BLANKS, MAX_DEPTH, NUMBER_ENDS, json_step, number_part, \
    number_start, string_step

# words that describe a schema without constraining its values: read past
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions", "strict"})
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_AGENDA = 4 * MAX_DEPTH  # tasks on one agenda (a recursive $ref could grow it without end)
MAX_SCHEMA_DEPTH = 100  # schemas inside one another (properties, items, anyOf, $ref to a $def not yet compiled)
MAX_AGENDAS = 1024  # agendas alive at once (anyOf branches, optional properties: each a way the reply may go on)
# JSON's automaton at a value and at an object, with no blank allowed before it
ANY_VALUE, ANY_OBJECT = ("value", "", None, MAX_BLANKS), ("start", "", None, MAX_BLANKS)
SHORT_ESCAPES = '"\\/bfnrt'  # after a backslash in a patterned string (no \u escapes there)
_DAY = r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)|02-(?:0[1-9]|1\d|2[0-8]))"
_YEAR = r"(?:[1-9]\d{3}|0[1-9]\d\d|00[1-9]\d|000[1-9])"  # no year 0, which Python's datetime (pydantic's) refuses
# fractions of a second to nanoseconds: unbounded, a small model wrote zeros until max_tokens
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,9})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_CLOCK = r"(?:\d+H(?:\d+M)?(?:\d+S)?|\d+M(?:\d+S)?|\d+S)"
# the formats of OpenAI's strict mode that have a plain ASCII form (RFC 3339 dates and times with an offset; the 29th
# of February is left out rather than checking leap years)
FORMATS = {
    "date": rf"{_YEAR}-{_DAY}",
    "time": _TIME,
    "date-time": rf"{_YEAR}-{_DAY}T{_TIME}",
    "duration": rf"P(?:\d+W|(?:\d+Y(?:\d+M)?(?:\d+D)?|\d+M(?:\d+D)?|\d+D)(?:T{_CLOCK})?|T{_CLOCK})",
    "email": rf"[A-Za-z0-9._%+-]+@{_LABEL}(?:\.{_LABEL})*\.[A-Za-z]{{2,}}",
    "hostname": rf"{_LABEL}(?:\.{_LABEL})*",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}


class SchemaError(ValueError):
    """A schema this server cannot hold a reply to; the message names the place (a JSON pointer) and the word."""


@dataclass(frozen=True)
class Schema:
    """Compiled nodes (see SchemaBuilder) and the root's number. A state is a frozenset of agendas."""
    nodes: tuple
    root: int
    expansions: dict = field(default_factory=dict, compare=False, repr=False)  # _expand's, kept

    def start(self) -> frozenset:
        return frozenset(self._expand((("node", self.root),)))

    def done(self, state: frozenset) -> bool:
        return () in state

    def in_string(self, state: frozenset) -> bool:
        """Every agenda is inside a free string, where a plain character leaves the state as it is."""
        return all(agenda and agenda[-1] == ("str", "plain") for agenda in state)

    def step(self, state: frozenset, byte: int) -> frozenset | None:
        agendas = frozenset(after for agenda in state if agenda for after in self._step(agenda, byte))
        return agendas if agendas and len(agendas) <= MAX_AGENDAS else None

    # ------------------------------------------------------------------------------------------------ one byte

    def _step(self, agenda: tuple, byte: int) -> list[tuple]:
        task, rest = agenda[-1], agenda[:-1]
        kind = task[0]
        if kind == "lit":  # one of several texts (an enum's values): the ones this byte continues go on
            following = [text[1:] for text in task[1] if text[0] == byte]
            unfinished = tuple(text for text in following if text)
            return ([rest + (("lit", unfinished),)] if unfinished else []) + \
                (self._expand(rest) if b"" in following else [])
        if kind == "str":
            after = string_step(task[1], byte)
            if after is None:
                return []
            return self._expand(rest) if after == "end" else [rest + (("str", after),)]
        if kind == "strn":  # a string of least..most characters: ("strn", string_step's part, characters so far,
            # least, most)
            _, part, count, least, most = task
            after = string_step(part, byte)
            if after is None:
                return []
            if after == "end":
                return self._expand(rest) if count >= least else []
            if part == "plain":  # a character (or an escape) begins
                count += 1
                if 0 <= most < count:
                    return []
            return [rest + (("strn", after, count, least, most),)]
        if kind == "strp":  # a string the node's regex holds: ("strp", node, the JSON text so far, string_step's part)
            _, index, text, part = task
            after = string_step(part, byte) if byte < 0x80 else None
            if after is None or isinstance(after, int):  # no \u escapes
                return []
            if after == "end":
                return self._expand(rest) if self._matches(index, text, partial=False) else []
            text += chr(byte)
            if after == "plain" and not self._matches(index, text) or \
                    after == "escape" and not any(self._matches(index, text + e) for e in SHORT_ESCAPES):
                return []
            return [rest + (("strp", index, text, after),)]
        if kind == "num":
            return self._number_step(task[1], task[2], rest, byte)
        if kind == "numb":  # a number within the node's bounds: ("numb", number part, the text so far, node)
            _, part, text, index = task
            _, integer, bounds = self.nodes[index]
            after = number_start(byte) if part == "start" else number_part(part, byte)
            results = []
            if after not in (None, "exp") and not (integer and after == "dot") and \
                    reachable(text + chr(byte), bounds):
                results.append(rest + (("numb", after, text + chr(byte), index),))
            if part in NUMBER_ENDS and within(Fraction(text), bounds):
                results.extend(self._next_task_step(rest, byte))
            return results
        inner = task[1]  # "json": any value, by JSON's own automaton
        if inner[0] == "number" and inner[1] == "":  # a bare number ends at the first byte that does not continue it
            return self._number_step(inner[2], False, rest, byte, json_task=True)
        inner = json_step(inner, byte)
        if inner is None:
            return []
        if inner == JSON_DONE or (inner[0] == "after" and inner[1] == ""):
            return self._expand(rest)
        return [rest + (("json", inner),)]

    def _number_step(self, part: str, integer: bool, rest: tuple, byte: int, json_task: bool = False) -> list[tuple]:
        after = number_start(byte) if part == "start" else number_part(part, byte)
        if integer and after in ("dot", "exp"):
            after = None
        results = []
        if after is not None:
            results.append(rest + ((("json", ("number", "", after, 0)) if json_task else ("num", after, integer)),))
        if part in NUMBER_ENDS:  # the number may end here
            results.extend(self._next_task_step(rest, byte))
        return results

    def _next_task_step(self, rest: tuple, byte: int) -> list[tuple]:
        """A value that ended without a closing byte (a number): `byte` is the next task's."""
        return [after for agenda in self._expand(rest) if agenda for after in self._step(agenda, byte)]

    def _matches(self, index: int, text: str, partial: bool = True) -> bool:
        """Whether the string whose JSON text (no quotes, ending at a character) is `text` matches the node's regex,
        or, `partial`, begins a string that does."""
        return self.nodes[index][1].fullmatch(json.loads(f'"{text}"'), partial=partial) is not None

    # ------------------------------------------------------------------------------------------------ expansion

    def _expand(self, agenda: tuple, seen: frozenset = frozenset()) -> list[tuple]:
        """The agendas `agenda` stands for whose top task takes a byte (or that are done), each once. `seen`: the
        nodes opened on the way here since the last byte; one met again is a loop that writes nothing (`"anyOf":
        [{"$ref": "#"}, ...]`), dropped. Cached: a schema whose anyOfs meet again (`a: anyOf [b, b]`, `b: anyOf [c,
        c]`, ...) would take 2^depth ways to the same agendas otherwise."""
        key = (agenda, seen)
        if key not in self.expansions:
            if len(self.expansions) > 1 << 16:
                self.expansions.clear()
            self.expansions[key] = self._expand_once(agenda, seen)
        return self.expansions[key]

    def _expand_once(self, agenda: tuple, seen: frozenset) -> list[tuple]:
        if not agenda:
            return [agenda]
        if len(agenda) > MAX_AGENDA:
            return []
        task, rest = agenda[-1], agenda[:-1]
        kind = task[0]
        if kind in ("lit", "str", "strn", "strp", "num", "numb", "json"):
            return [agenda]
        if kind == "node":
            if task[1] in seen:
                return []
            seen = seen | {task[1]}
            return unique(done for choice in self._choices(task[1], rest) for done in self._expand(choice, seen))
        if kind == "items":
            _, index, count = task
            _, item, least, most = self.nodes[index]
            choices = [rest + (("lit", (b"]",)),)] if count >= least else []
            if most < 0 or count < most:
                following = count + 1 if most >= 0 or count < max(least, 1) else count  # an open end: stop counting
                choices.append(rest + (("items", index, following), ("node", item))
                               + ((("lit", (b", ",)),) if count else ()))
            return unique(done for choice in choices for done in self._expand(choice, seen))
        if kind == "fields":
            _, index, at = task
            fields = self.nodes[index][1]
            choices = []
            for position in range(at + 1, len(fields)):
                key, child, required = fields[position]
                separator = b", " if at >= 0 else b""
                choices.append(rest + (("fields", index, position), ("node", child),
                                       ("lit", (separator + key + b": ",))))
                if required:
                    break
            else:
                choices.append(rest + (("lit", (b"}",)),))
            return unique(done for choice in choices for done in self._expand(choice, seen))
        # "entries" of a map: {"any key": value, ...}
        _, index, first = task
        entry = rest + (("entries", index, False), ("node", self.nodes[index][1]), ("lit", (b": ",)),
                        ("str", "plain"), ("lit", ((b"" if first else b", ") + b'"',)))
        return unique(done for choice in (rest + (("lit", (b"}",)),), entry) for done in self._expand(choice, seen))

    def _choices(self, index: int, rest: tuple) -> list[tuple]:
        node = self.nodes[index]
        kind = node[0]
        if kind == "texts":
            return [rest + (("lit", node[1]),)]
        if kind == "string":
            return [rest + (("str", "plain"), ("lit", (b'"',)))]
        if kind == "counted":
            return [rest + (("strn", "plain", 0, node[1], node[2]), ("lit", (b'"',)))]
        if kind == "patterned":
            return [rest + (("strp", index, "", "plain"), ("lit", (b'"',)))]
        if kind == "number":
            return [rest + (("num", "start", node[1]),)]
        if kind == "bounded":
            return [rest + (("numb", "start", "", index),)]
        if kind == "array":
            return [rest + (("items", index, 0), ("lit", (b"[",)))]
        if kind == "object":
            return [rest + (("fields", index, -1), ("lit", (b"{",)))]
        if kind == "map":
            return [rest + (("entries", index, True), ("lit", (b"{",)))]
        if kind == "any":
            return [rest + (("json", ANY_OBJECT if node[1] else ANY_VALUE),)]
        return [rest + (("node", option),) for option in node[1]]  # anyof


def unique(agendas) -> list[tuple]:
    return list(dict.fromkeys(agendas))


def within(value: Fraction, bounds: tuple) -> bool:
    low, low_open, high, high_open = bounds
    return (low is None or value > low or value == low and not low_open) and \
        (high is None or value < high or value == high and not high_open)


def reachable(text: str, bounds: tuple) -> bool:
    """Whether some number whose JSON text (no exponent) begins with `text` is within `bounds` (an integer's are
    closed and integral, so the test holds for integers too). The numbers a prefix begins form spans [a, b): "12."
    and "12.3" one (12.3 up to 12.4), "12" one for each number of digits still to come (12-13, 120-130, ...)."""
    low, low_open, high, high_open = bounds
    if text.startswith("-"):  # -x within [low, high] when x within [-high, -low]
        text = text[1:]
        low, low_open, high, high_open = (None if high is None else -high), high_open, \
            (None if low is None else -low), low_open
    if "." in text:
        whole, fraction = text.split(".")
        start = Fraction(f"{whole}.{fraction or 0}")
        spans = [(start, start + Fraction(1, 10 ** len(fraction)))]
    elif text in ("", "0"):
        spans = [(Fraction(0), None if text == "" else Fraction(1))]
    elif high is None:
        spans = [(Fraction(int(text)), None)]  # spans that reach past any low
    else:
        first = int(text)
        spans = [(Fraction(first * 10 ** k), Fraction((first + 1) * 10 ** k))
                 for k in range(len(str(math.floor(high))) + 1) if first * 10 ** k <= high]
    for start, end in spans:  # [start, end) meets the bounds
        lower, lower_open = (low, low_open) if low is not None and (low > start or low == start and low_open) \
            else (start, False)
        upper, upper_open = (high, high_open) if high is not None and (end is None or high < end) else (end, True)
        if upper is None or lower < upper or lower == upper and not lower_open and not upper_open:
            return True
    return False


# ---------------------------------------------------------------- compiling a schema

class SchemaBuilder:
    """Numbered nodes: ("texts", (json bytes, ...)) one of fixed values; ("string",); ("counted", minLength, maxLength
    or -1); ("patterned", compiled regex); ("number", integer?); ("bounded", integer?, (low, open?, high, open?));
    ("array", item, minItems, maxItems or -1); ("object", ((key json bytes, node, required), ...)); ("map", value
    node); ("any", object only?); ("anyof", (node, ...))."""

    def __init__(self):
        self.nodes: list[tuple] = []
        self.refs: dict[tuple[int, str], int] = {}
        self.depth = 0  # schemas being compiled, one inside another

    def build(self, root: int) -> Schema:
        return Schema(tuple(self.nodes), root)

    def compile_object(self, schema: Any) -> int:
        """`compile` for a schema whose values are all JSON objects (a reply's, a call's arguments)."""
        node = self.compile(schema)
        starts = [agenda[-1] for agenda in self.build(node).start()]
        if not starts or any(task not in (("lit", (b"{",)), ("json", ANY_OBJECT)) for task in starts):
            raise SchemaError("#: the schema's values must be objects (\"type\": \"object\")")
        return node

    def add(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def const(self, value: Any) -> int:
        return self.add(("texts", (json_bytes(value),)))

    def any_object(self) -> int:
        return self.add(("any", True))

    def any_of(self, options: list[int]) -> int:
        return options[0] if len(options) == 1 else self.add(("anyof", tuple(options)))

    def object(self, fields: list[tuple[str, int]]) -> int:
        """An object with these properties, all required, in this order."""
        return self.add(("object", tuple((json_bytes(name), node, True) for name, node in fields)))

    def compile(self, schema: Any) -> int:
        """The node of a whole schema document ($ref "#..." points into it)."""
        return self._node(schema, schema, "#")

    def _node(self, schema: Any, document: Any, where: str) -> int:
        if self.depth >= MAX_SCHEMA_DEPTH:  # Python's recursion limit, here or when the automaton expands it
            raise SchemaError(f"{where}: the schema nests more than {MAX_SCHEMA_DEPTH} schemas deep")
        self.depth += 1
        try:
            return self._compiled(schema, document, where)
        finally:
            self.depth -= 1

    def _compiled(self, schema: Any, document: Any, where: str) -> int:
        if schema is True or schema == {}:
            return self.add(("any", False))
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be a JSON object, not {json.dumps(schema)}")
        unknown = sorted(set(schema) - ANNOTATIONS - {"type", "properties", "required", "additionalProperties",
                                                     "items", "minItems", "maxItems", "enum", "const", "anyOf",
                                                     "allOf", "$ref", *STRING_KEYS, *NUMBER_KEYS})
        if unknown:
            raise SchemaError(f"{where}: '{unknown[0]}' is not supported (supported: type, properties, required, "
                              "additionalProperties, items, minItems, maxItems, enum, const, anyOf, $ref, "
                              f"{', '.join(STRING_KEYS + NUMBER_KEYS)})")
        for key, beside in (("$ref", ()), ("allOf", ()), ("anyOf", ()), ("const", ("type",)), ("enum", ("type",))):
            others = sorted(set(schema) - ANNOTATIONS - {key, *beside}) if key in schema else []
            if others:  # what they would add to the key's schema is not held
                raise SchemaError(f"{where}: '{others[0]}' beside '{key}' is not supported")
        if "$ref" in schema:
            return self._ref(schema["$ref"], document, where)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise SchemaError(f"{where}: allOf is supported only as the one schema it holds")
            return self._node(parts[0], document, f"{where}/allOf/0")
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"{where}/anyOf: must be a non-empty list of schemas")
            return self.any_of([self._node(option, document, f"{where}/anyOf/{i}") for i, option in enumerate(options)])
        if "const" in schema:
            return self.const(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}/enum: must be a non-empty list")
            return self.add(("texts", tuple(dict.fromkeys(json_bytes(value) for value in values))))
        kinds = schema.get("type", "object" if "properties" in schema else None)
        if kinds is None:
            return self.add(("any", False))
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not kinds or any(kind not in TYPES for kind in kinds):
            raise SchemaError(f"{where}/type: {json.dumps(schema['type'])} is not one of {', '.join(TYPES)} "
                              "(or a list of them)")
        return self.any_of([self._typed(kind, schema, document, where) for kind in kinds])

    def _typed(self, kind: str, schema: dict, document: Any, where: str) -> int:
        if kind == "string":
            return self._string(schema, where)
        if kind in ("number", "integer"):
            bounds = number_bounds(schema, kind == "integer", where)
            return self.add(("number", kind == "integer") if bounds is None else ("bounded", kind == "integer", bounds))
        if kind == "boolean":
            return self.add(("texts", (b"true", b"false")))
        if kind == "null":
            return self.add(("texts", (b"null",)))
        if kind == "array":
            least, most = counts(schema, "minItems", "maxItems", where)
            item = self._node(schema.get("items", {}), document, f"{where}/items")
            return self.add(("array", item, least, most))
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        required = schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list) or \
                any(name not in properties for name in required):
            raise SchemaError(f"{where}: properties must be an object and required a list of its names")
        if not properties:
            if isinstance(extra, dict) and extra:
                return self.add(("map", self._node(extra, document, f"{where}/additionalProperties")))
            return self.add(("object", ())) if extra is False else self.any_object()
        if isinstance(extra, dict) and extra:
            raise SchemaError(f"{where}: additionalProperties with a schema is supported only without properties")
        fields = tuple((json_bytes(name), self._node(child, document, f"{where}/properties/{name}"), name in required)
                       for name, child in properties.items())
        return self.add(("object", fields))

    def _string(self, schema: dict, where: str) -> int:
        least, most = counts(schema, "minLength", "maxLength", where)
        held = [key for key in ("pattern", "format") if key in schema]
        if not held:
            return self.add(("string",) if least == 0 and most < 0 else ("counted", least, most))
        if len(held) > 1 or least or most >= 0:
            raise SchemaError(f"{where}: '{held[0]}' beside '{'format' if len(held) > 1 else 'minLength/maxLength'}' "
                              "is not supported")
        if held == ["format"]:
            expression = FORMATS.get(schema["format"])
            if expression is None:
                raise SchemaError(f"{where}/format: {json.dumps(schema['format'])} is not supported (supported: "
                                  f"{', '.join(FORMATS)})")
        else:
            expression = schema["pattern"]
            if not isinstance(expression, str) or not expression.isascii() or \
                    regex.search(r"\\[pPuxNXv0-9]", expression):
                raise SchemaError(f"{where}/pattern: only patterns of printable ASCII characters are supported (no "
                                  "\\p, \\u, \\x or other character codes)")
            try:
                regex.compile(expression)
            except regex.error as e:
                raise SchemaError(f"{where}/pattern: {e}") from None
            # JSON Schema's patterns match anywhere in the string, and `$` only at its end (Python's `$` also
            # matches before a final newline)
            expression = rf"(?s:.*?)(?:{end_anchors(expression)})(?s:.*)"
        return self.add(("patterned", regex.compile(expression)))

    def _ref(self, ref: Any, document: Any, where: str) -> int:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{where}/$ref: only references into the schema itself (\"#/$defs/...\") are supported")
        key = (id(document), ref)
        if key not in self.refs:
            target = document
            for name in filter(None, ref[1:].split("/")):
                name = name.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or name not in target:
                    raise SchemaError(f"{where}/$ref: {ref} is not in the schema")
                target = target[name]
            self.refs[key] = placeholder = self.add(("anyof", ()))  # a recursive schema refers to itself
            self.nodes[placeholder] = ("anyof", (self._node(target, document, ref),))
        return self.refs[key]


STRING_KEYS = ["minLength", "maxLength", "pattern", "format"]
NUMBER_KEYS = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]


def end_anchors(pattern: str) -> str:
    """`pattern` with each `$` outside a character class as `\\Z`."""
    out, in_class, escaped = [], False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "$" and not in_class:
            char = "\\Z"
        out.append(char)
    return "".join(out)


def counts(schema: dict, least_key: str, most_key: str, where: str) -> tuple[int, int]:
    """(least, most or -1) of a count's bounds (minItems/maxItems, minLength/maxLength)."""
    least, most = schema.get(least_key, 0), schema.get(most_key, -1)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (least, most)) or least < 0 or \
            most_key in schema and most < least:
        raise SchemaError(f"{where}: {least_key}/{most_key} must be counts, {least_key} at most {most_key}")
    return least, most


def number_bounds(schema: dict, integer: bool, where: str) -> tuple | None:
    """(low, low open?, high, high open?) of minimum/maximum/exclusiveMinimum/exclusiveMaximum (None where there are
    none); an integer's as the closed integral bounds they leave."""
    given = {key: schema[key] for key in NUMBER_KEYS if key in schema}
    if not given:
        return None
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SchemaError(f"{where}/{key}: must be a number")
    exact = {key: Fraction(repr(value)) for key, value in given.items()}
    lows = [(exact[key], key == "exclusiveMinimum") for key in ("minimum", "exclusiveMinimum") if key in exact]
    highs = [(exact[key], key == "exclusiveMaximum") for key in ("maximum", "exclusiveMaximum") if key in exact]
    low, low_open = max(lows, key=lambda bound: (bound[0], bound[1])) if lows else (None, False)
    high, high_open = min(highs, key=lambda bound: (bound[0], not bound[1])) if highs else (None, False)
    if integer:
        low = None if low is None else Fraction(math.floor(low) + 1 if low_open else math.ceil(low))
        high = None if high is None else Fraction(math.ceil(high) - 1 if high_open else math.floor(high))
        low_open = high_open = False
    if low is not None and high is not None and (low > high or low == high and (low_open or high_open)):
        raise SchemaError(f"{where}: no {'integer' if integer else 'number'} is within its minimum and maximum")
    return low, low_open, high, high_open


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()
