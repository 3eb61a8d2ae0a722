"""Constrained decoding (mateconv.json_grammar): the byte automaton against Python's json, the token table against
the tokenizer, and generation from a random model, which never writes JSON on its own, held to the grammar (a JSON
object, a forced call, a schema)."""
from __future__ import annotations

import itertools
import json
import random
import re

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from mateconv.json_grammar import Grammar, GrammarConstraint, TokenGrammar, TokenTable, token_bytes
from mateconv.json_schema import SchemaBuilder
from model import MateConvConfig, MateConvForCausalLM
from model.generation import generate_tokens

VALID = ['{}', ' {"a": 1}', '{"a": [1, 2.5, -3e10, 0, -0.1E+2, true, false, null, "x\\u00e9\\n\\"", []]}',
         '{"k":{"n":{"m": {}}}}', '{"a": "é 中文"}', '{\n"a": [\n{},\n[0]\n]\n}']
INVALID = ['{a: 1}', '{"a" 1}', '{"a": 01}', '{"a": 1,}', '[1]', '"x"', '{"a": tru}', '{"a": "\x01"}', '{"a": -}',
           '{"a": 1.}', '{"a": 1e}', '{"a": "\\x"}', '{} {}', '{"a": 1]', '{"a": NaN}', '{"a": "\\u12g4"}']


def whole(grammar: Grammar, text: str) -> bool:
    state = grammar.feed(grammar.start(), text.encode())
    return state is not None and grammar.at_end(state)


def test_json_object_automaton_agrees_with_json():
    grammar = Grammar.json_object()
    for text in VALID:
        assert whole(grammar, text), text
        data = text.encode()
        assert all(grammar.feed(grammar.start(), data[:cut]) is not None for cut in range(len(data))), text
    for text in INVALID:
        assert not whole(grammar, text), text
    # one-byte changes of valid documents: the automaton accepts them exactly when json.loads gives an object (and
    # no two blanks are in a row, which it refuses by design)
    rng = random.Random(0)
    alphabet = '{}[]":, \n0123456789-.eE+tfnrul\\a'
    for _ in range(3000):
        text = rng.choice(VALID).strip()
        at = rng.randrange(len(text))
        mutated = text[:at] + rng.choice(alphabet) + text[at + 1:]
        if re.search(r"\s\s", mutated):
            continue
        try:
            expected = isinstance(json.loads(mutated), dict)
        except json.JSONDecodeError:
            expected = False
        assert whole(grammar, mutated) == expected, mutated


def test_blank_runs_and_depth_are_bounded():
    grammar = Grammar.json_object()
    assert grammar.feed(grammar.start(), b'{\n"a": [1, 2],\t"b":\r{ } }') is not None
    assert grammar.feed(grammar.start(), b"{\n ") is None
    assert grammar.feed(grammar.start(), b'{"a": "' + b" " * 100) is not None  # blanks in a string are text
    assert grammar.feed(grammar.start(), b'{"a":' + b"[" * 31) is not None
    assert grammar.feed(grammar.start(), b'{"a":' + b"[" * 32) is None


def test_framed():
    builder = SchemaBuilder()
    grammar = Grammar.framed("call ", builder.build(builder.any_object()), ".")
    assert whole(grammar, 'call {"x": [1]}.')
    assert not whole(grammar, 'call {"x": [1]}')  # the closing text is not optional
    assert not whole(grammar, 'cal {"x": [1]}.') and not whole(grammar, 'call [].')


def test_token_bytes_spell_the_text(tiny_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    pieces = token_bytes(tokenizer, len(tokenizer) + 3)
    text = 'Ein Fuß, 中文 {"a": [1, "\\n"]}\n\tend'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(pieces[i] for i in ids) == text.encode()
    assert pieces[tokenizer.eos_token_id] == pieces[tokenizer.pad_token_id] == b"" and pieces[-1] == b""


@pytest.fixture(scope="module")
def random_model(tiny_tokenizer):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    config = MateConvConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tokenizer), max_seq_len=256)
    return MateConvForCausalLM(config).eval(), tokenizer


def generate(model, tokenizer, grammar: Grammar | None, rows: int, **sampling) -> list[tuple[str, bool]]:
    """(text, ended with EOS) of each row."""
    constraint = None
    if grammar is not None:
        table = TokenTable(token_bytes(tokenizer, model.config.vocab_size))
        constraint = GrammarConstraint(TokenGrammar(grammar, table, tokenizer.eos_token_id, model.device), rows)
    prompt = torch.tensor([tokenizer.encode("Reply in JSON:")] * rows)
    out = generate_tokens(model, prompt, max_new_tokens=120, eos_token_id=tokenizer.eos_token_id,
                          generator=torch.Generator().manual_seed(0), constraint=constraint, **sampling)
    return [(tokenizer.decode(row[prompt.shape[1]:], skip_special_tokens=True), tokenizer.eos_token_id in row)
            for row in out.tolist()]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0}, {"temperature": 1.3, "top_p": 0.9}])
def test_random_model_writes_json_under_the_grammar(random_model, sampling):
    """A reply that ends is one JSON object; one that max_new_tokens cut (sampled at random, a string seldom closes)
    is the start of one."""
    model, tokenizer = random_model
    grammar = Grammar.json_object()
    free = generate(model, tokenizer, None, 4, **sampling)
    assert not any(text.lstrip().startswith("{") for text, _ in free)  # on its own it writes no JSON
    replies = generate(model, tokenizer, grammar, 4, **sampling)
    for text, ended in replies:
        assert isinstance(json.loads(text), dict) if ended else grammar.feed(grammar.start(), text.encode()), text
    if not sampling["temperature"]:
        assert all(ended for _, ended in replies)


def test_random_model_calls_one_of_the_functions(random_model):
    """A forced call as the server builds it: one of the functions, with arguments its parameters hold."""
    model, tokenizer = random_model
    builder = SchemaBuilder()
    parameters = {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}, "days": {"type": "integer"}},
                  "required": ["unit"]}
    calls = [builder.object([("name", builder.const(name)), ("arguments", arguments)])
             for name, arguments in (("get_weather", builder.compile_object(parameters)),
                                     ("get_time", builder.any_object()))]
    grammar = Grammar.framed("<tool_call>\n", builder.build(builder.any_of(calls)), "\n</tool_call>")
    for text, ended in generate(model, tokenizer, grammar, 3, temperature=1.0):
        assert grammar.feed(grammar.start(), text.encode()) is not None, text
        assert text.startswith('<tool_call>\n{"name": "get_weather", "arguments": {"unit": ') or \
            text.startswith('<tool_call>\n{"name": "get_time", "arguments": {'), text
        if ended:
            call = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
            if call["name"] == "get_weather":
                jsonschema.validate(call["arguments"], parameters)
            assert isinstance(call["arguments"], dict)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_random_model_fills_a_schema(random_model, temperature):
    """A schema whose replies are finite: every row ends, within max_new_tokens, with an object the schema holds."""
    model, tokenizer = random_model
    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "sure", "why"], "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"},
        "why": {"type": "array", "maxItems": 2, "items": {"anyOf": [{"const": "prime"}, {"type": "null"}]}}}}
    builder = SchemaBuilder()
    grammar = Grammar.schema_object(builder.build(builder.compile_object(schema)))
    for text, ended in generate(model, tokenizer, grammar, 4, temperature=temperature):
        assert ended, text
        jsonschema.validate(json.loads(text), schema)
        assert text == json.dumps(json.loads(text))  # written as json.dumps writes it


def test_token_bytes_of_a_sentencepiece_style_tokenizer(tmp_path):
    """A Metaspace tokenizer (Llama's, T5's) decodes a lone token without its leading space: the table keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    text = '{"a": [1, 2], "b": "x y"} ' * 20 + "the quick brown fox jumps over the lazy dog " * 20
    backend.train_from_iterator([text], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    pieces = token_bytes(tokenizer, len(tokenizer))
    sample = '{"a": [1, 2], "b": "the lazy fox"}'
    ids = tokenizer.encode(sample, add_special_tokens=False)
    assert tokenizer.decode(ids) == sample
    assert b"".join(pieces[i] for i in ids).lstrip() == sample.encode()
    assert any(piece.startswith(b" ") for piece in pieces)


def test_token_bytes_of_byte_fallback_tokens():
    """Llama-style byte fallback: a character missing from the vocabulary is written as <0xXX> tokens, one byte each
    (alone each decodes to U+FFFD): the table has those bytes, so such characters can be written under a grammar."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{byte:02X}>": 2 + byte for byte in range(256)}}
    vocab.update({piece: len(vocab) + i for i, piece in enumerate(["▁", "a", "▁a"])})
    backend = Tokenizer(models.BPE(vocab, [("▁", "a")], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    ids = tokenizer.encode("a 中", add_special_tokens=False)
    assert tokenizer.decode(ids) == "a 中" and tokenizer.decode(ids[-1:]) == "\ufffd"  # the case under test
    pieces = token_bytes(tokenizer, len(tokenizer))
    assert b"".join(pieces[i] for i in ids).lstrip() == "a 中".encode()


def test_calls_in_free_text():
    """Free text in which each opening starts a call held to the schema, closed, then free again; EOS only in free
    text."""
    builder = SchemaBuilder()
    parameters = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    schema = builder.build(builder.object([("name", builder.const("f")), ("arguments", builder.compile_object(
        parameters))]))
    grammar = Grammar.calls("<c>", schema, "</c>")
    call = '<c>{"name": "f", "arguments": {"n": 1}}</c>'
    for text in ["", "plain < <c text", f"before {call} between {call}{call} after", "<<c" + call[2:], "<c<c>"[:2]]:
        assert whole(grammar, text), text
    for text in ['<c>{"name": "g"', '<c>{"name": "f", "arguments": {"n": "1"}}', '<<c>{"name": f}']:
        assert grammar.feed(grammar.start(), text.encode()) is None, text
    assert not whole(grammar, call[:-1]) and grammar.feed(grammar.start(), call[:-1].encode()) is not None


def test_strings_are_whole_utf8_characters():
    """Byte-level tokens may end inside a character: a string takes only the bytes that continue one, and a character
    cut short cannot end it (the reply held U+FFFD where a random model closed the string after half a character)."""
    builder = SchemaBuilder()
    schema = builder.build(builder.compile_object({"type": "object", "properties": {"v": {"type": "string"}}}))
    for grammar in (Grammar.json_object(), Grammar.schema_object(schema)):
        start = grammar.start()
        assert whole(grammar, '{"v": "中文 é 😀 \\u00e9"}')
        assert grammar.feed(start, b'{"v": "\xe4\xb8') is not None
        for cut in (b'\xe4"', b'\xe4\xb8"', b"\x83", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90", b"\xf8"):
            assert grammar.feed(start, b'{"v": "' + cut) is None, cut  # cut short, continuation, overlong, surrogate,
            # beyond U+10FFFF, no character's first byte


def test_masks_are_the_tokens_whose_bytes_the_grammar_takes():
    """The trie search (and its shortcuts: plain tokens inside a string, tokens that cannot open a call in free text)
    against feeding every token's bytes, in every state along replies of each grammar kind. The vocabulary is every
    string of 1-3 of the bytes that matter here (and of 4 of some), so that each shortcut meets the tokens that could
    fool it."""
    alphabet = [bytes([byte]) for byte in b'<c>{}[]"n: 1a\\'] + [b"\n"] + [bytes([byte]) for byte in "中".encode()]
    pieces = [b""] + [b"".join(letters) for size in (1, 2, 3) for letters in itertools.product(alphabet, repeat=size)]
    pieces += [bytes(letters) for letters in itertools.product(b"<c>{x", repeat=4)]
    table = TokenTable(pieces)
    builder = SchemaBuilder()
    schema = builder.build(builder.compile_object({"type": "object", "properties": {
        "a": {"type": "string"}, "n": {"type": "array", "items": {"enum": [1, 11]}}}}))
    replies = {Grammar.json_object(): '{"a": [1, "c\\"<中"], "n": {"c": null}}',
               Grammar.schema_object(schema): '{"a": "<c> \\u00e9中", "n": [11, 1]}',
               Grammar.calls("<c<c>\n", schema, "\n</c>"): 'a <c<c <c<c<c>\n{"a": "x", "n": []}\n</c> <c',
               Grammar.calls("<c<>", schema, "</c>"): '<c<c<<c<>{"n": [1]}</c>'}  # "<c<" ends with the start "<"
    for grammar, reply in replies.items():
        token_grammar = TokenGrammar(grammar, table, 0, torch.device("cpu"))
        state = grammar.start()
        for byte in reply.encode():
            expected = [bool(piece) and grammar.feed(state, piece) is not None for piece in pieces]
            # EOS at the end, and where no token goes on (this vocabulary has no "u" or "l" for "null")
            expected[0] = grammar.at_end(state) or not any(expected)
            assert token_grammar.allowed(state).tolist() == expected, (reply, state)
            state = grammar.step(state, byte)
