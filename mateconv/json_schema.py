"""JSON Schema for constrained decoding: `response_format` json_schema and the arguments of forced tool calls.

`SchemaBuilder` compiles a schema (the subset OpenAI's strict mode takes: object, array, string, number, integer,
boolean, null, enum, const, anyOf, $ref to $defs) into numbered nodes; `Schema` runs them byte by byte as a
nondeterministic automaton. Its state is a set of agendas, each a stack of what is left to write (top last), so
anyOf and optional properties need no lookahead. Replies come out as `json.dumps` writes them (", " and ": "), the
form a model saw its tool calls in during SFT; properties in the schema's order, every required one present.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mateconv.json_grammar import JSON_DONE, MAX_BLANKS, MAX_DEPTH, NUMBER_ENDS, json_step, number_part, \
    number_start, string_step

# words that describe a schema without constraining its values: read past
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions", "strict"})
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_AGENDA = 4 * MAX_DEPTH  # tasks on one agenda (a recursive $ref could grow it without end)
MAX_AGENDAS = 1024  # agendas alive at once (anyOf branches, optional properties: each a way the reply may go on)
# JSON's automaton at a value and at an object, with no blank allowed before it
ANY_VALUE, ANY_OBJECT = ("value", "", None, MAX_BLANKS), ("start", "", None, MAX_BLANKS)


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
        if kind == "num":
            return self._number_step(task[1], task[2], rest, byte)
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
        if part in NUMBER_ENDS:  # the number may end here: the byte is the next task's
            for agenda in self._expand(rest):
                if agenda:
                    results.extend(self._step(agenda, byte))
        return results

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
        if kind in ("lit", "str", "num", "json"):
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
        if kind == "number":
            return [rest + (("num", "start", node[1]),)]
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


# ---------------------------------------------------------------- compiling a schema

class SchemaBuilder:
    """Numbered nodes: ("texts", (json bytes, ...)) one of fixed values; ("string",); ("number", integer?);
    ("array", item, minItems, maxItems or -1); ("object", ((key json bytes, node, required), ...)); ("map", value
    node); ("any", object only?); ("anyof", (node, ...))."""

    def __init__(self):
        self.nodes: list[tuple] = []
        self.refs: dict[tuple[int, str], int] = {}

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
        if schema is True or schema == {}:
            return self.add(("any", False))
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be a JSON object, not {json.dumps(schema)}")
        unknown = sorted(set(schema) - ANNOTATIONS - {"type", "properties", "required", "additionalProperties",
                                                     "items", "minItems", "maxItems", "enum", "const", "anyOf",
                                                     "allOf", "$ref"})
        if unknown:
            raise SchemaError(f"{where}: '{unknown[0]}' is not supported (supported: type, properties, required, "
                              "additionalProperties, items, minItems, maxItems, enum, const, anyOf, $ref)")
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
            return self.add(("string",))
        if kind in ("number", "integer"):
            return self.add(("number", kind == "integer"))
        if kind == "boolean":
            return self.add(("texts", (b"true", b"false")))
        if kind == "null":
            return self.add(("texts", (b"null",)))
        if kind == "array":
            least, most = schema.get("minItems", 0), schema.get("maxItems", -1)
            if not (isinstance(least, int) and isinstance(most, int) and least >= 0 and (most < 0 or most >= least)):
                raise SchemaError(f"{where}: minItems/maxItems must be counts, minItems at most maxItems")
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


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()
