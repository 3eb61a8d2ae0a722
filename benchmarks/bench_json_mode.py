"""What constrained decoding costs: `generate_tokens` held to a JSON object, to a JSON schema and to text with strict
tool calls (mateconv.json_grammar and json_schema, as the server's response_format, forced calls and strict functions
run them) vs the same decoding unconstrained, side by side.

A random MateConv model with a real 6400-token tokenizer (MiniMind's, from the shared data sets, or --tokenizer),
greedy, a fixed number of new tokens (EOS stops neither run), fp32. The grammar's allowed-token masks are computed
once per grammar state and cached: a warm-up run fills the cache, as earlier requests to a server do, and the time
to compute one state's mask is reported apart (the mean over the states that a typical reply goes through:
the random model goes into a string at once and stays there), and so is the grammar's own work per step (masking the
logits and stepping each row's state, replayed over the tokens generated).
Decode tokens/s = batch * new_tokens / time, best of --repeats, the two runs taking turns (each first every other
time).

    python benchmarks/bench_json_mode.py --threads 1 --repeats 6
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("MATECONV_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
WIND = {"type": "object", "properties": {"speed": {"type": "number"}, "dir": {"enum": ["N", "E", "S", "W", "NW"]}},
        "required": ["speed", "dir"], "additionalProperties": False}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "temp_c", "tags", "wind"],
          "properties": {"city": {"type": "string"}, "temp_c": {"type": "integer"}, "wind": WIND,
                         "tags": {"type": "array", "items": {"enum": ["sunny", "warm", "windy", "rain"]}}}}
SAMPLE = '{"city": "Paris", "temp_c": 21, "wind": {"speed": 12.5, "dir": "NW"}, "tags": ["sunny", "warm"]}'
# bounds, a format and a pattern (mateconv.json_schema holds them: a string with a pattern or format steps a regex)
BOOKING = {"type": "object", "additionalProperties": False, "required": ["day", "guests", "name", "code", "email"],
           "properties": {"day": {"type": "string", "format": "date"},
                          "guests": {"type": "integer", "minimum": 1, "maximum": 8},
                          "name": {"type": "string", "maxLength": 12},
                          "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2}$"},
                          "email": {"type": "string", "format": "email"}}}
SAMPLE_BOOKING = '{"day": "2026-12-06", "guests": 2, "name": "Ada", "code": "ABC-12", "email": "ada@example.org"}'
SAMPLE_CALL = f'Let me look that up.\n<tool_call>\n{{"name": "get_weather", "arguments": {SAMPLE}}}\n</tool_call>'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(SHARED / "jingyaogong__minimind" / "model"))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if not Path(args.tokenizer).exists():
        raise SystemExit(f"bench_json_mode: no tokenizer at {args.tokenizer} (set MATECONV_SHARED_DATA or --tokenizer)")

    from transformers import AutoTokenizer

    from mateconv.json_grammar import Grammar, GrammarConstraint, TokenGrammar, TokenTable, token_bytes
    from mateconv.json_schema import SchemaBuilder
    from model import MateConvConfig, MateConvForCausalLM
    from model.generation import generate_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    config = MateConvConfig(dim=args.dim, n_layers=args.n_layers, vocab_size=len(tokenizer), max_seq_len=512)
    model = MateConvForCausalLM(config).eval()
    started = time.perf_counter()
    table = TokenTable(token_bytes(tokenizer, config.vocab_size))
    table_seconds = time.perf_counter() - started
    builder = SchemaBuilder()
    schema = builder.build(builder.compile_object(SCHEMA))
    call = builder.build(builder.object([("name", builder.const("get_weather")), ("arguments", builder.compile_object(
        SCHEMA))]))
    booking = builder.build(builder.compile_object(BOOKING))
    grammars = {"JSON object": (Grammar.json_object(), SAMPLE), "JSON schema": (Grammar.schema_object(schema), SAMPLE),
                "strict tool calls": (Grammar.calls("<tool_call>\n", call, "\n</tool_call>"), SAMPLE_CALL),
                "bounds, formats, pattern": (Grammar.schema_object(booking), SAMPLE_BOOKING)}
    prompt = tokenizer.encode("Reply with a JSON object:", add_special_tokens=False)

    print(f"dim {args.dim}, {args.n_layers} layers, vocab {config.vocab_size}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads; token table built in {table_seconds * 1000:.0f} ms")
    print("| grammar | batch | free (tok/s) | held (tok/s) | held / free | grammar per step (us) | new state's mask "
          "(ms) | replies parse |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (grammar, sample) in grammars.items():
        token_grammar = TokenGrammar(grammar, table, tokenizer.eos_token_id, model.device)
        sample_tokens = tokenizer.encode(sample, add_special_tokens=False)
        mask_ms = cold_mask_ms(token_grammar, [table.pieces[token] for token in sample_tokens])
        for batch in args.batch_sizes:
            input_ids = torch.tensor([prompt] * batch)

            def run(constrained: bool) -> torch.Tensor:
                constraint = GrammarConstraint(token_grammar, batch) if constrained else None
                return generate_tokens(model, input_ids, max_new_tokens=args.new_tokens, temperature=0,
                                       constraint=constraint)

            def timed(constrained: bool) -> float:
                start = time.perf_counter()
                run(constrained)
                return time.perf_counter() - start

            run(True)
            times = {False: [], True: []}
            for repeat in range(args.repeats):  # which goes first alternates, so neither gets the quieter moments
                for constrained in ((False, True) if repeat % 2 else (True, False)):
                    times[constrained].append(timed(constrained))
            free, constrained = min(times[False]), min(times[True])
            generated = run(True)[:, len(prompt):]
            texts = [tokenizer.decode(row, skip_special_tokens=True) for row in generated.tolist()]
            replay, logits = GrammarConstraint(token_grammar, batch), torch.zeros(batch, config.vocab_size)
            start = time.perf_counter()
            for step in range(generated.shape[1]):
                replay.mask(logits)
                replay.advance(generated[:, step])
            per_step = (time.perf_counter() - start) / generated.shape[1]
            parse = all(grammar.feed(grammar.start(), text.encode()) is not None for text in texts)
            rate = batch * args.new_tokens
            print(f"| {name} | {batch} | {rate / free:.1f} | {rate / constrained:.1f} | x{free / constrained:.2f} | "
                  f"{per_step * 1e6:.0f} | {mask_ms:.2f} | {parse} |")


def cold_mask_ms(token_grammar, pieces: list[bytes]) -> float:
    """The mean time to compute the mask of a state not seen before, over the states a sample's tokens go through."""
    grammar, state, states = token_grammar.grammar, token_grammar.grammar.start(), []
    for piece in pieces:
        states.append(state)
        state = grammar.feed(state, piece)
    assert state is not None and grammar.at_end(state), "SAMPLE must be a reply the grammar holds"
    token_grammar.masks.clear()
    start = time.perf_counter()
    for state in states:
        token_grammar.allowed(state)
    return (time.perf_counter() - start) / len(states) * 1000


if __name__ == "__main__":
    main()
