"""JSON Schema for constrained decoding (mateconv.json_schema): random schemas and random values they hold, written
as json.dumps writes them, pass the automaton with every prefix alive; what it passes after random one-byte changes
parses and validates (checked with the `jsonschema` package, formats included); random walks never get stuck; and what
it does not support is a one-line error."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from mateconv.json_grammar import Grammar
from mateconv.json_schema import SchemaBuilder, SchemaError

SCALARS = ["string", "integer", "number", "boolean", "null", "enum", "const", "bounded", "counted", "format",
           "pattern"]
TEXT = 'ab "\\/\n\t\x01é中😀'
# a pattern, and strings it holds (and what a model could write next in them)
PATTERNS = {"^[A-Z]{2}-\\d+$": ["AB-1", "XY-2024"], "ab?c": ["ac", "xxabcyy", "a\"c\\ac"],
            "^(red|green)( [a-z]+)*$": ["red", "green tea time"]}
FORMAT_VALUES = {"date": ["2024-02-28", "1999-12-31"], "time": ["23:59:59Z", "08:00:00.25+05:30"],
                 "date-time": ["2024-06-01T12:30:00-07:00"], "duration": ["P3D", "PT1H30M", "P1Y2M3DT4H5M6S", "P2W"],
                 "email": ["a.b+c@mail.example.org"], "hostname": ["example.com", "a-1.b2"],
                 "ipv4": ["0.0.0.0", "192.168.1.255"], "uuid": ["123e4567-e89b-12d3-a456-426614174000"]}
VALIDATOR = jsonschema.Draft202012Validator


def grammar_of(schema: dict) -> Grammar:
    builder = SchemaBuilder()
    return Grammar.schema_object(builder.build(builder.compile_object(schema)))


def whole(grammar: Grammar, text: str) -> bool:
    state = grammar.feed(grammar.start(), text.encode())
    return state is not None and grammar.at_end(state)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kind = rng.choice(SCALARS + (["array", "object", "anyOf", "map", "any"] if depth < 3 else []))
    if kind == "enum":
        return {"enum": rng.sample(["a", "ab", 1, 12, -3, True, None, "x\"y"], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["c", 7, False, None])}
    if kind == "bounded":
        kind = rng.choice(["integer", "number"])
        bounds = rng.sample([("minimum", -12), ("maximum", 250), ("exclusiveMinimum", -0.5), ("maximum", 0.75),
                             ("exclusiveMaximum", 1000), ("minimum", 7)], rng.randint(1, 2))
        if dict(bounds).get("minimum", -1) >= 7 and dict(bounds).get("maximum", 1000) < 7:
            bounds = bounds[:1]
        return {"type": kind, **dict(bounds)}
    if kind == "counted":
        least = rng.randint(0, 2)
        return {"type": "string", "minLength": least, **({"maxLength": least + rng.randint(0, 3)} if rng.random() < 0.7
                                                         else {})}
    if kind == "format":
        return {"type": "string", "format": rng.choice(list(FORMAT_VALUES))}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(list(PATTERNS))}
    if kind == "array":
        least = rng.randint(0, 2)
        bounds = {"minItems": least, **({"maxItems": least + rng.randint(0, 2)} if rng.random() < 0.5 else {})}
        return {"type": "array", "items": random_schema(rng, depth + 1), **bounds}
    if kind == "object":
        return random_object(rng, depth)
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    if kind == "map":
        return {"type": "object", "additionalProperties": random_schema(rng, depth + 1)}
    if kind == "any":
        return {}
    if kind == "null" or rng.random() < 0.8:
        return {"type": kind}
    return {"type": [kind, "null"], "description": "maybe none"}


def random_object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(["a", "ab", "b", "key with space", "ключ"], rng.randint(0, 4))
    return {"type": "object", "properties": {name: random_schema(rng, depth + 1) for name in names},
            "required": [name for name in names if rng.random() < 0.6], "additionalProperties": False}


def random_value(rng: random.Random, schema: dict):
    """A value `schema` holds, with object properties in the schema's order."""
    if "enum" in schema or "const" in schema:
        return rng.choice(schema.get("enum", [schema.get("const")]))
    if "anyOf" in schema:
        return random_value(rng, rng.choice(schema["anyOf"]))
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind is None:
        return rng.choice([{"x": [1, None, "y"]}, [], "free", -0.5, True, None, 42])
    if kind == "string" and "format" in schema:
        return rng.choice(FORMAT_VALUES[schema["format"]])
    if kind == "string" and "pattern" in schema:
        return rng.choice(PATTERNS[schema["pattern"]])
    if kind == "string":
        least, most = schema.get("minLength", 0), schema.get("maxLength", 6)
        return "".join(rng.choice(TEXT) for _ in range(rng.randint(least, max(least, most))))
    if kind == "integer":
        return rng.choice([n for n in [0, 7, -12, 10 ** 12, 1000, 250] if VALIDATOR(schema).is_valid(n)])
    if kind == "number":
        return rng.choice([n for n in [0, -3, 2.5, -0.001, 0.75, 7, 6.02e23, -0.25] if VALIDATOR(schema).is_valid(n)
                           and ("minimum" not in schema and "maximum" not in schema and "exclusiveMaximum" not in
                                schema and "exclusiveMinimum" not in schema or "e" not in json.dumps(n))])
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "array":
        most = schema.get("maxItems", schema["minItems"] + 3)
        return [random_value(rng, schema["items"]) for _ in range(rng.randint(schema["minItems"], most))]
    if "properties" not in schema:  # a map
        return {rng.choice(["k", "", "é"]) + str(i): random_value(rng, schema["additionalProperties"])
                for i in range(rng.randint(0, 3))}
    return {name: random_value(rng, child) for name, child in schema["properties"].items()
            if name in schema["required"] or rng.random() < 0.5}


def test_random_schemas_hold_their_values_and_nothing_else():
    rng = random.Random(0)
    alphabet = '{}[]":, 0123456789-.eE+tfnrul\\abk'
    accepted_mutations = 0
    for _ in range(150):
        schema = random_object(rng, 0)
        grammar = grammar_of(schema)
        for _ in range(4):
            text = json.dumps(random_value(rng, schema), ensure_ascii=False)
            assert whole(grammar, text), (schema, text)
            data = text.encode()
            assert all(grammar.feed(grammar.start(), data[:cut]) is not None for cut in range(len(data)))
            for _ in range(20):
                at = rng.randrange(len(text))
                mutated = text[:at] + rng.choice(alphabet) + text[at + 1:]
                if whole(grammar, mutated):
                    accepted_mutations += 1
                    VALIDATOR(schema, format_checker=VALIDATOR.FORMAT_CHECKER).validate(json.loads(mutated))
    assert accepted_mutations > 100  # the check above was made often enough to mean something


def test_random_walks_never_get_stuck_and_end_valid():
    """From every state a random walk reaches, some byte goes on (or the object is done), bounds and patterns
    included; walks that end hold their schema, formats included."""
    rng = random.Random(1)
    ended = 0
    for _ in range(30):
        schema = random_object(rng, 1)
        grammar = grammar_of(schema)
        for _ in range(2):
            state, text = grammar.start(), b""
            for _ in range(250):
                if grammar.at_end(state):
                    ended += 1
                    VALIDATOR(schema, format_checker=VALIDATOR.FORMAT_CHECKER).validate(json.loads(text))
                    break
                following = [(byte, after) for byte in range(256) if (after := grammar.step(state, byte)) is not None]
                assert following, (schema, text)
                # ASCII where it may come: random bytes would break UTF-8
                following = [pair for pair in following if pair[0] < 0x80] or following
                # closing bytes first half of the time, so that walks end
                closing = [pair for pair in following if pair[0] in b'"}],']
                byte, state = rng.choice(closing if closing and rng.random() < 0.5 else following)
                text += bytes([byte])
    assert ended > 40, ended


@pytest.mark.parametrize("schema, held, refused", [
    ({"type": "integer", "minimum": 5, "maximum": 7}, ["5", "6", "7"], ["4", "8", "-5", "50", "5.0", "05"]),
    ({"type": "integer", "exclusiveMinimum": -2.5, "exclusiveMaximum": 10}, ["-2", "0", "9"], ["-3", "10", "-0.5"]),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, ["1", "0.5", "1.0", "0.001"],
     ["0", "0.0", "-0", "1.01", "1e-3", "2"]),
    ({"type": "number", "minimum": -1.25}, ["-1.25", "-1.2", "3000"], ["-1.26", "-2", "-1.250001"]),
    ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"中文字"', '"a\\n"', '"😀😀"'],
     ['"a"', '"abcd"', '"中文字!"', '""']),
    ({"type": "string", "format": "date"}, ['"2024-02-28"', '"2023-12-31"'],
     ['"2024-02-30"', '"2024-13-01"', '"24-01-01"', '"2024-01-01 "', '"0000-10-10"']),
    # year 0 and fractions of a second without end: a tiny model wrote both; Python's datetime (pydantic's
    # `datetime` field in `client.chat.completions.parse`) has no year 0
    ({"type": "string", "format": "date-time"}, ['"0001-01-01T00:00:00Z"', '"2024-06-01T12:30:00.123456789Z"'],
     ['"0000-10-10T13:10:10Z"', '"2024-06-01T12:30:00.1234567890Z"']),
    # `$` is the end, not also before a final newline as in Python
    ({"type": "string", "pattern": "^\\d{3}$"}, ['"123"'], ['"12"', '"1234"', '"12a"', '"123\\n"']),
])
def test_bounds_formats_and_patterns(schema, held, refused):
    grammar = grammar_of({"type": "object", "properties": {"v": schema}, "required": ["v"]})
    assert [value for value in held if not whole(grammar, f'{{"v": {value}}}')] == []
    assert [value for value in refused if whole(grammar, f'{{"v": {value}}}')] == []


def test_a_counted_string_is_whole_utf8_characters():
    """A byte that continues no character counted as none: a random model wrote 12 characters, then continuation
    bytes without end under maxLength 12."""
    grammar = grammar_of({"type": "object", "properties": {"v": {"type": "string", "maxLength": 2}}, "required": ["v"]})
    start = grammar.start()
    assert grammar.feed(start, '{"v": "中'.encode() + b"\x83") is None
    assert grammar.feed(start, b'{"v": "\xe4\xb8') is not None and grammar.feed(start, b'{"v": "\xe4"') is None
    assert whole(grammar, '{"v": "中文"}') and not whole(grammar, '{"v": "中文字"}')


@pytest.mark.parametrize("text, held", [
    ('{"n": 12, "x": 1.5}', True), ('{"n": 1, "x": -0}', True), ('{"n": 1.0, "x": 1}', False),
    ('{"n": 1e3, "x": 1}', False), ('{"n": 01, "x": 1}', False), ('{"n": 1, "x": 1.}', False),
    ('{"n": 1, "x": 1}', True), ('{"n":1, "x": 1}', False), ('{"x": 1, "n": 1}', False), ('{"n": 1}', False),
])
def test_integers_numbers_and_the_written_form(text, held):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}},
              "required": ["n", "x"]}
    assert whole(grammar_of(schema), text) == held


def test_enum_values_that_start_one_another():
    grammar = grammar_of({"type": "object", "properties": {"v": {"enum": [1, 12, "a", "ab"]}}, "required": ["v"]})
    assert [whole(grammar, f'{{"v": {value}}}') for value in ("1", "12", "123", '"a"', '"ab"', '"b"')] == \
        [True, True, False, True, True, False]


def test_optional_properties_keep_their_order():
    schema = {"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "null"}, "c": {"type": "null"}},
              "required": ["b"]}
    grammar = grammar_of(schema)
    held = ['{"b": null}', '{"a": null, "b": null}', '{"b": null, "c": null}', '{"a": null, "b": null, "c": null}']
    assert all(whole(grammar, text) for text in held)
    assert not any(whole(grammar, text) for text in ['{}', '{"a": null}', '{"b": null, "a": null}',
                                                     '{"a": null, "c": null}', '{"b": null, "b": null}'])


def test_recursive_refs_and_pydantic_schemas():
    """$defs/$ref as pydantic writes them (nested models, Optional as anyOf with null, a model that holds itself),
    through the `openai` package's own strict-schema conversion."""
    from typing import Optional

    from openai.lib._pydantic import to_strict_json_schema
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: Optional[int]

    class Trip(BaseModel):
        cities: list[City]
        next_trip: Optional["Trip"]

    schema = to_strict_json_schema(Trip)
    assert "$defs" in schema and "$ref" in json.dumps(schema)
    grammar = grammar_of(schema)
    trip = Trip(cities=[City(name="Paris", population=2_100_000), City(name="Rome", population=None)],
                next_trip=Trip(cities=[], next_trip=None))
    assert whole(grammar, json.dumps(trip.model_dump()))
    assert not whole(grammar, json.dumps({"cities": [{"name": "Paris"}], "next_trip": None}))
    deep = {"cities": [], "next_trip": None}
    for _ in range(20):
        deep = {"cities": [], "next_trip": deep}
    assert whole(grammar, json.dumps(deep))
    # a reference that comes back to itself before writing anything is a loop, dropped (not 2^depth ways on)
    looping = {"$defs": {"x": {"anyOf": [{"$ref": "#/$defs/x"}, {"$ref": "#/$defs/x"}, {"type": "null"}]}},
               "type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "required": ["a"]}
    assert whole(grammar_of(looping), '{"a": null}') and not whole(grammar_of(looping), '{"a": 1}')
    # anyOfs that meet again: 2^40 ways to the same place, each followed once
    meeting = {f"a{i}": {"anyOf": [{"$ref": f"#/$defs/a{i + 1}"}, {"$ref": f"#/$defs/a{i + 1}"}]} for i in range(40)}
    meeting = {"$defs": {**meeting, "a40": {"type": "null"}}, "type": "object", "properties": {
        "x": {"$ref": "#/$defs/a0"}}, "required": ["x"]}
    assert whole(grammar_of(meeting), '{"x": null}')


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"ip": {"type": "string", "format": "ipv6"}}},
     "#/properties/ip/format: \"ipv6\" is not supported"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "\\p{Han}+"}}}, "printable ASCII"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(a"}}}, "#/properties/a/pattern: missing )"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "a", "maxLength": 3}}},
     "'pattern' beside 'minLength/maxLength'"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1.5, "maximum": 1.9}}},
     "#/properties/a: no integer is within its minimum and maximum"),
    ({"type": "object", "properties": {"a": {"type": "number", "minimum": True}}}, "#/properties/a/minimum: must be"),
    ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}}, "'multipleOf' is not supported"),
    ({"type": "string"}, "#: the schema's values must be objects"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "#/properties/a/$ref: #/$defs/missing "
                                                                           "is not in the schema"),
    ({"type": "object", "properties": {"a": {"type": "decimal"}}}, "#/properties/a/type: \"decimal\" is not one of"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 1}}}, "minItems"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "null"}]}}}, "'oneOf' is not supported"),
    ({"type": "object", "required": ["b"], "properties": {"a": {}}}, "required a list of its names"),
    ({"type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, "'type' beside 'anyOf'"),
    ({"type": "object", "properties": {"a": {"enum": [1, 2], "minimum": 2}}}, "'minimum' beside 'enum'"),
    ({"type": "object", "properties": {"a": {"const": 1, "enum": [1, 2]}}}, "'enum' beside 'const'"),
])
def test_what_is_not_supported_is_one_line(schema, message):
    with pytest.raises(SchemaError) as error:
        SchemaBuilder().compile_object(schema)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_schema_nested_too_deep_is_one_line_and_a_deep_one_works():
    """330 arrays one inside another was a RecursionError (a 500 in the server); 60 work."""
    def nested(levels: int) -> dict:
        schema = {"type": "null"}
        for _ in range(levels):
            schema = {"type": "array", "items": schema, "maxItems": 1}
        return {"type": "object", "properties": {"a": schema}, "required": ["a"]}

    with pytest.raises(SchemaError, match="nests more than 100 schemas deep"):
        SchemaBuilder().compile_object(nested(330))
    chain = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(300)}
    with pytest.raises(SchemaError, match="nests more than 100"):
        SchemaBuilder().compile_object({"$defs": {**chain, "d300": {"type": "null"}}, "type": "object",
                                        "properties": {"a": {"$ref": "#/$defs/d0"}}})
    assert whole(grammar_of(nested(60)), '{"a": ' + "[" * 60 + "null" + "]" * 60 + "}")


def test_long_enums_and_many_optional_properties():
    """An enum of 300 values is one task whatever its length; 200 optional properties are 200 ways on at once."""
    names = [f"name{i}" for i in range(300)]
    grammar = grammar_of({"type": "object", "properties": {"v": {"enum": names}, **{
        f"p{i}": {"type": "integer"} for i in range(200)}}, "required": ["v"]})
    assert whole(grammar, '{"v": "name299", "p5": 1, "p199": 2}')
    assert not whole(grammar, '{"v": "name300"}') and not whole(grammar, '{"v": "name29", "p5": 1, "p4": 2}')
