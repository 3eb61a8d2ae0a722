"""Constrained decoding for replies that must parse: OpenAI's `response_format` (json_object, json_schema), forced
tool calls (`tool_choice` "required" or a named function) and the calls of strict functions.

A `Grammar` is the sequence of parts a reply goes through, byte by byte: fixed text, free text up to an opening, one
JSON object (any, or one that a schema holds: mateconv.json_schema), then the end of the reply (EOS) or back to the
first part. At every decode step `GrammarConstraint` sets to -inf the logits of the tokens whose bytes would leave
the grammar, so greedy and sampled replies alike parse (unless max_tokens cuts them short).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tokenizers import decoders

BLANKS = frozenset(b" \t\n\r")
# whitespace bytes in a row between JSON tokens: one, as compact JSON writes them (`{"a": 1, "b": 2}`), so that a
# model cannot stall in blank lines (a small model held to JSON readily fills its budget with newlines)
MAX_BLANKS = 1
MAX_DEPTH = 32
ESCAPES = frozenset(b'"\\/bfnrt')
STRING_SPECIAL = frozenset(b'"\\' + bytes(range(0x20)))  # the bytes that do something inside a JSON string
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
NUMBER_ENDS = frozenset({"zero", "int", "frac", "exp_digits"})  # number states that may end the number


# ---------------------------------------------------------------- one JSON object, byte by byte
# A state is (mode, stack, aux, blanks): `stack` the open containers ("o" object, "a" array), `aux` what the mode
# needs (is the string a key and where string_step is in it, the number's part, the literal's rest), `blanks` the
# whitespace run.

JSON_START = ("start", "", None, 0)
JSON_DONE = ("done", "", None, 0)


def _blank(state: tuple) -> tuple | None:
    mode, stack, aux, blanks = state
    return (mode, stack, aux, blanks + 1) if blanks < MAX_BLANKS else None


def _open(stack: str, kind: str) -> tuple | None:
    if len(stack) >= MAX_DEPTH:
        return None
    return ("key_or_close", stack + "o", None, 0) if kind == "o" else ("value_or_close", stack + "a", None, 0)


def _value(stack: str, byte: int) -> tuple | None:
    """The first byte of a value inside `stack`."""
    if byte == ord("{"):
        return _open(stack, "o")
    if byte == ord("["):
        return _open(stack, "a")
    if byte == ord('"'):
        return ("string", stack, (False, "plain"), 0)
    if (part := number_start(byte)) is not None:
        return ("number", stack, part, 0)
    if byte in LITERALS:
        return ("literal", stack, LITERALS[byte], 0)
    return None


def _close(stack: str) -> tuple:
    return ("after", stack[:-1], None, 0) if len(stack) > 1 else JSON_DONE


def utf8_rest(lead: int) -> tuple[int, int, int] | None:
    """After a UTF-8 character's first byte: (lowest, highest) next byte and how many bytes are left, as strict
    decoding has them (no overlong forms, surrogates or code points past U+10FFFF); None for no first byte."""
    if 0xC2 <= lead <= 0xDF:
        return (0x80, 0xBF, 1)
    if 0xE0 <= lead <= 0xEF:
        return {0xE0: (0xA0, 0xBF, 2), 0xED: (0x80, 0x9F, 2)}.get(lead, (0x80, 0xBF, 2))
    if 0xF0 <= lead <= 0xF4:
        return {0xF0: (0x90, 0xBF, 3), 0xF4: (0x80, 0x8F, 3)}.get(lead, (0x80, 0xBF, 3))
    return None


def string_step(part: str | int | tuple, byte: int) -> str | int | tuple | None:
    """Inside a JSON string: "plain", "escape" after a backslash, the hex digits left of a \\u escape, or inside a
    UTF-8 character (utf8_rest's tuple: a byte-level token may end there); "end" after the closing quote; None for a
    byte that cannot come."""
    if part == "plain":
        if byte == ord('"'):
            return "end"
        if byte == ord("\\"):
            return "escape"
        return utf8_rest(byte) if byte >= 0x80 else "plain" if byte >= 0x20 else None
    if isinstance(part, tuple):
        low, high, left = part
        return None if not low <= byte <= high else "plain" if left == 1 else (0x80, 0xBF, left - 1)
    if part == "escape":
        return 4 if byte == ord("u") else "plain" if byte in ESCAPES else None
    if byte not in HEX:
        return None
    return "plain" if part == 1 else part - 1


def number_start(byte: int) -> str | None:
    """The number's part after its first byte, None when `byte` cannot start one."""
    if byte == ord("-"):
        return "sign"
    if byte == ord("0"):
        return "zero"
    return "int" if byte in DIGITS else None


def number_part(part: str, byte: int) -> str | None:
    """The number's next part after `byte`, None when `byte` does not continue it."""
    if byte == ord("0") and part == "sign":
        return "zero"
    if byte in DIGITS:
        return {"sign": "int", "int": "int", "dot": "frac", "frac": "frac", "exp": "exp_digits",
                "exp_sign": "exp_digits", "exp_digits": "exp_digits"}.get(part)
    if byte == ord(".") and part in ("zero", "int"):
        return "dot"
    if byte in b"eE" and part in ("zero", "int", "frac"):
        return "exp"
    if byte in b"+-" and part == "exp":
        return "exp_sign"
    return None


def json_step(state: tuple, byte: int) -> tuple | None:
    """The state after one more byte of a JSON object; None when the byte cannot come there."""
    mode, stack, aux, _ = state
    if mode == "string":
        is_key, part = aux
        part = string_step(part, byte)
        if part == "end":
            return ("colon", stack, None, 0) if is_key else ("after", stack, None, 0)
        return None if part is None else ("string", stack, (is_key, part), 0)
    if mode == "number":
        part = number_part(aux, byte)
        if part is not None:
            return ("number", stack, part, 0)
        return json_step(("after", stack, None, 0), byte) if aux in NUMBER_ENDS else None
    if mode == "literal":
        if byte != aux[0]:
            return None
        return ("literal", stack, aux[1:], 0) if len(aux) > 1 else ("after", stack, None, 0)
    if mode == "done":
        return None
    if byte in BLANKS:
        return _blank(state)
    if mode == "start":
        return _open(stack, "o") if byte == ord("{") else None
    if mode in ("key_or_close", "key"):
        if byte == ord('"'):
            return ("string", stack, (True, "plain"), 0)
        return _close(stack) if byte == ord("}") and mode == "key_or_close" else None
    if mode == "colon":
        return ("value", stack, None, 0) if byte == ord(":") else None
    if mode == "value_or_close" and byte == ord("]"):
        return _close(stack)
    if mode in ("value", "value_or_close"):
        return _value(stack, byte)
    # mode "after": a value ended
    if byte == ord(","):
        return ("key", stack, None, 0) if stack[-1] == "o" else ("value", stack, None, 0)
    if byte == ord("}" if stack[-1] == "o" else "]"):
        return _close(stack)
    return None


# ---------------------------------------------------------------- a grammar of parts

@dataclass(frozen=True)
class Grammar:
    """parts: ("text", bytes) — that text; ("json",) — one JSON object; ("schema", Schema) — one JSON object that a
    schema holds (mateconv.json_schema); ("free", opening) — any text, EOS included, until it ends with `opening`;
    ("again",) — back to the first part; ("end",) — EOS. A state is (part index, the part's state)."""
    parts: tuple

    @classmethod
    def json_object(cls) -> Grammar:
        return cls((("json",), ("end",)))

    @classmethod
    def schema_object(cls, schema) -> Grammar:
        return cls((("schema", schema), ("end",)))

    @classmethod
    def framed(cls, before: str, schema, after: str) -> Grammar:
        """`before`, an object that `schema` holds, `after`, then the end."""
        return cls((("text", before.encode()), ("schema", schema), ("text", after.encode()), ("end",)))

    @classmethod
    def calls(cls, opening: str, schema, closing: str) -> Grammar:
        """Free text in which each `opening` starts an object that `schema` holds, closed by `closing`."""
        return cls((("free", opening.encode()), ("schema", schema), ("text", closing.encode()), ("again",)))

    def start(self) -> tuple:
        return self._enter(0)

    def _enter(self, index: int) -> tuple:
        part = self.parts[index]
        if part[0] == "again":
            return self._enter(0)
        if part[0] == "schema":
            return (index, part[1].start())
        return (index, {"text": 0, "free": 0, "json": JSON_START}.get(part[0]))

    def at_end(self, state: tuple) -> bool:
        """Whether EOS may come here."""
        return self.parts[state[0]][0] in ("end", "free")

    def plain_bytes(self, state: tuple) -> frozenset | None:
        """Bytes such that any token of whole UTF-8 characters without them may come here (None where there are
        none): inside a JSON string, a quote, backslash or control byte; in free text, where any byte may come, the
        opening's first byte and the one after the part of it the text ends with (k bytes). A token that completes the
        opening either holds all of it, or starts with its rest after some j <= k bytes that the text ends with, and
        that rest holds byte k."""
        part, inner = self.parts[state[0]], state[1]
        if part[0] == "free":
            return frozenset(part[1][:1] + part[1][inner:inner + 1])
        in_string = (part[0] == "json" and inner[0] == "string" and inner[2][1] == "plain") or \
            (part[0] == "schema" and part[1].in_string(inner))
        return STRING_SPECIAL if in_string else None

    def step(self, state: tuple, byte: int) -> tuple | None:
        index, inner = state
        part = self.parts[index]
        if part[0] == "text":  # inner: the bytes of it matched so far
            if part[1][inner] != byte:
                return None
            return self._enter(index + 1) if inner + 1 == len(part[1]) else (index, inner + 1)
        if part[0] == "json":
            inner = json_step(inner, byte)
            if inner is None:
                return None
            return self._enter(index + 1) if inner == JSON_DONE else (index, inner)
        if part[0] == "schema":
            inner = part[1].step(inner, byte)
            if inner is None:
                return None
            return self._enter(index + 1) if part[1].done(inner) else (index, inner)
        if part[0] == "free":  # inner: how much of the opening the text ends with
            matched = part[1][:inner] + bytes((byte,))
            while not part[1].startswith(matched):  # the longest end of the text that could still be the opening
                matched = matched[1:]
            return self._enter(index + 1) if matched == part[1] else (index, len(matched))
        return None  # the end takes no bytes

    def feed(self, state: tuple, data: bytes) -> tuple | None:
        for byte in data:
            state = self.step(state, byte)
            if state is None:
                return None
        return state


# ---------------------------------------------------------------- tokens

def byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins -> the bytes they stand for: the printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    decoder = {chr(byte): byte for byte in printable}
    others = [byte for byte in range(256) if byte not in decoder.values()]
    decoder.update({chr(256 + n): byte for n, byte in enumerate(others)})
    return decoder


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """Each token id's bytes (b"" for special tokens, ids beyond the tokenizer, and tokens that are part of a
    character in a tokenizer that is neither byte-level nor has byte fallback: those never pass the grammar)."""
    special = set(tokenizer.all_special_ids)
    added = {token_id: token.content for token_id, token in tokenizer.added_tokens_decoder.items()}
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast (Rust) tokenizers only
    byte_level = isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)
    table = byte_decoder()
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # other tokenizers decode a token after another one, as in a reply (SentencePiece drops a lone token's space)
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    lead = tokenizer.decode(anchor)
    result = []
    for token_id in range(vocab_size):
        if token_id >= len(pieces) or token_id in special:
            result.append(b"")
        elif token_id in added:
            result.append(added[token_id].encode())
        elif byte_level:
            piece = pieces[token_id]
            result.append(bytes(table[char] for char in piece) if all(char in table for char in piece) else b"")
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", pieces[token_id]):  # SentencePiece's byte fallback
            result.append(bytes([int(pieces[token_id][3:5], 16)]))
        else:
            text = tokenizer.decode(anchor + [token_id])
            result.append(text[len(lead):].encode() if text.startswith(lead) and "\ufffd" not in text else b"")
    return result


def whole_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class TokenTable:
    """One model's tokens as bytes, in tries for the search of the allowed ones: from node 0 every token; `split`
    adds one of the tokens that hold any of a set of bytes. A node is a number: `children[node]` maps a byte to the
    next node, `ends[node]` holds the tokens that the bytes on the way to it spell."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.children: list[dict[int, int]] = [{}]
        self.ends: dict[int, tuple[int, ...]] = {}
        self.splits: dict[frozenset, tuple[torch.Tensor, int]] = {}
        for token_id, piece in enumerate(pieces):
            if piece:
                self._insert(0, piece, token_id)

    def split(self, special: frozenset) -> tuple[torch.Tensor, int]:
        """(bool [V]: the tokens of whole UTF-8 characters without any of the `special` bytes, the root of a trie of
        the other tokens)."""
        if special not in self.splits:
            plain = [bool(piece) and special.isdisjoint(piece) and whole_utf8(piece) for piece in self.pieces]
            root = len(self.children)
            self.children.append({})
            for token_id, (piece, free) in enumerate(zip(self.pieces, plain)):
                if piece and not free:
                    self._insert(root, piece, token_id)
            self.splits[special] = (torch.tensor(plain), root)
        return self.splits[special]

    def _insert(self, node: int, piece: bytes, token_id: int) -> None:
        for byte in piece:
            child = self.children[node].get(byte)
            if child is None:
                child = self.children[node][byte] = len(self.children)
                self.children.append({})
            node = child
        self.ends[node] = self.ends.get(node, ()) + (token_id,)


class TokenGrammar:
    """A grammar over one model's tokens: which tokens may come next in a state (cached per state)."""

    def __init__(self, grammar: Grammar, table: TokenTable, eos_id: int, device: torch.device):
        self.grammar, self.table, self.eos_id, self.device = grammar, table, eos_id, device
        self.masks: dict[tuple, torch.Tensor] = {}

    def allowed(self, state: tuple) -> torch.Tensor:
        """Bool [V]: the tokens that keep the reply in the grammar from `state` (EOS only at the end). Where the
        grammar names bytes outside of which every token is allowed, only the tokens that hold one are searched."""
        mask = self.masks.get(state)
        if mask is None:
            if len(self.masks) > 4096:
                self.masks.clear()
            special = self.grammar.plain_bytes(state)
            if special is None:
                keep, root = torch.zeros(len(self.table.pieces), dtype=torch.bool), 0
            else:
                plain, root = self.table.split(special)
                keep = plain.clone()
            found: list[int] = []
            self._search(root, state, found)
            keep[found] = True
            # EOS at the end; also where no token goes on (a pattern whose branch only characters that a reply does
            # not write would continue), as where a tokenizer lacks the bytes the grammar needs (advance)
            keep[self.eos_id] = self.grammar.at_end(state) or not keep.any()
            mask = self.masks[state] = keep.to(self.device)
        return mask

    def _search(self, node: int, state: tuple, found: list[int]) -> None:
        """Walks the trie from `node` along the bytes the grammar takes from `state`, collecting the tokens."""
        for byte, child in self.table.children[node].items():
            after = self.grammar.step(state, byte)
            if after is not None:
                found.extend(self.table.ends.get(child, ()))
                self._search(child, after, found)


class GrammarConstraint:
    """The per-row state of a batch decoding under one TokenGrammar: `mask` the logits, then `advance` with the tokens
    taken (the decode loop in `model.generation.iter_tokens` calls both)."""

    def __init__(self, token_grammar: TokenGrammar, rows: int):
        self.token_grammar = token_grammar
        self.states = [token_grammar.grammar.start() for _ in range(rows)]
        self.ended = [False] * rows

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = torch.stack([torch.ones_like(self.token_grammar.allowed(state)) if ended else
                               self.token_grammar.allowed(state) for state, ended in zip(self.states, self.ended)])
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, tokens: torch.Tensor) -> None:
        grammar = self.token_grammar.grammar
        for row, token in enumerate(tokens.tolist()):
            if self.ended[row]:
                continue
            state = None if token == self.token_grammar.eos_id else \
                grammar.feed(self.states[row], self.token_grammar.table.pieces[token])
            if state is None:  # EOS (or, where a tokenizer lacks the bytes the grammar needs, no way on)
                self.ended[row] = True
            else:
                self.states[row] = state
