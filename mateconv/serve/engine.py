"""The model behind the server: prompts, token budgets, batched and streamed generation, log-probabilities."""
from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from mateconv.chat import context_length, prompt_ids
from mateconv.data import DataError
from mateconv.data.formats import chat_messages
from mateconv.json_grammar import Grammar, GrammarConstraint, TokenGrammar, TokenTable, token_bytes
from mateconv.logprobs import token_logps
from mateconv.serve.replies import StopScanner
from mateconv.serve.schema import APIError, GenerationRequest, Message
from model.generation import SamplingConfig, detokenize, iter_tokens


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    grammar: Grammar | None = None  # what the reply must be (constrained decoding); None: anything
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    tokens: list[int]  # the completion's tokens (those behind the text when a stop string cut it)
    eos: bool = False  # the model ended it with EOS (which `tokens` leaves out)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def batch_rows(steps: Iterator[torch.Tensor], n: int) -> list[Iterator[int]]:
    """The n rows of `steps` ([n] tensors) as token iterators, read one after another: a row draws a step from
    `steps` only when no row has drawn it before, so the batch runs as long as the longest-read row needs."""
    drawn: list[list[int]] = []

    def row(index: int) -> Iterator[int]:
        for step in itertools.count():
            if step == len(drawn):
                tokens = next(steps, None)
                if tokens is None:
                    return
                drawn.append(tokens.tolist())
            yield drawn[step][index]

    return [row(index) for index in range(n)]


class Engine:
    """The model, its tokenizer and the two ways to generate: whole choices (batched) and one streamed choice."""

    def __init__(self, model, tokenizer, compile: bool | None = None):
        self.model, self.tokenizer, self.compile = model, tokenizer, compile
        self.context = context_length(model)
        self.eos_id = tokenizer.eos_token_id
        self.grammars: dict[Grammar, TokenGrammar] = {}  # each grammar over this model's tokens, built once

    @functools.cached_property
    def token_table(self) -> TokenTable:
        return TokenTable(token_bytes(self.tokenizer, self.model.config.vocab_size))

    def constraint(self, grammar: Grammar | None, rows: int) -> GrammarConstraint | None:
        if grammar is None:
            return None
        if grammar not in self.grammars:
            if len(self.grammars) >= 64:
                self.grammars.clear()
            self.grammars[grammar] = TokenGrammar(grammar, self.token_table, self.eos_id, self.model.device)
        return GrammarConstraint(self.grammars[grammar], rows)

    def chat_prompt(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """The prompt as stage 3 renders an SFT record: tool calls, tool results and tools converted by
        `chat_messages`."""
        try:
            conversation = chat_messages([message.turn() for message in messages], tools)
        except DataError as error:
            raise APIError(400, f"messages: {error}", param="messages") from None
        return prompt_ids(self.tokenizer, conversation)

    def text_prompts(self, prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = [p if isinstance(p, list) else self.tokenizer.encode(p, add_special_tokens=False) for p in prompt]
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        vocab = len(self.tokenizer)
        if any(not 0 <= token < vocab for p in prompts for token in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return prompts

    def budget(self, prompt_tokens: int, max_tokens: int | None, default_max_tokens: int, what: str) -> int:
        """New tokens to allow; 400 in OpenAI's words (which client libraries recognise) when they do not fit."""
        room = self.context - prompt_tokens
        if max_tokens is None and room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                                f"{what} resulted in {prompt_tokens} tokens. Please reduce the length of the {what}.",
                           param=what, code="context_length_exceeded")
        wanted = max_tokens if max_tokens is not None else min(default_max_tokens, room)
        if wanted > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {prompt_tokens + wanted} tokens ({prompt_tokens} in the {what}, {wanted} "
                                f"in the completion). Please reduce the length of the {what} or completion.",
                           param=what, code="context_length_exceeded")
        return wanted

    def sampling(self, req: GenerationRequest, max_tokens: int, grammar: Grammar | None = None) -> Sampling:
        """The request's sampling options; 400 for logit_bias token ids outside the vocabulary."""
        vocab = min(len(self.tokenizer), self.model.config.vocab_size)
        if any(not 0 <= token < vocab for token in req.logit_bias or {}):
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        return Sampling(max_tokens, req.temperature, req.top_p, req.stop, req.seed, grammar, req.presence_penalty,
                        req.frequency_penalty, req.logit_bias, max(req.top_k, 0), req.repetition_penalty)

    def token_bytes(self, token: int) -> bytes:
        return self.token_table.pieces[token] or self.tokenizer.decode([token]).encode()

    def token_text(self, token: int) -> str:
        """A token as OpenAI's logprobs show it: its text, or "bytes:\\xe4\\xbd" for bytes that are part of a
        character (two such tokens would otherwise both be U+FFFD, one key in legacy `top_logprobs`)."""
        data = self.token_bytes(token)
        try:
            return data.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)

    def logprobs(self, ids: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each token after the first: (its log-probability given the tokens before it, the `top` most likely
        tokens there with theirs), from one forward pass over the whole sequence (the model's own distribution,
        before temperature or top_p)."""
        with torch.inference_mode():
            input_ids = torch.tensor([ids], device=self.model.device)
            logits = self.model(input_ids).logits
            if not top:
                return [(logprob, []) for logprob in token_logps(logits, input_ids)[0][0].tolist()]
            # the chosen tokens' numbers from the same log-softmax as the alternatives': lm-eval's is_greedy compares
            # a token's logprob with the best alternative's by ==
            logps = logits[0, :-1].float().log_softmax(-1)
            chosen = logps.gather(-1, input_ids[0, 1:, None])[:, 0].tolist()
            best = logps.topk(top, dim=-1)
        return [(logprob, list(zip(indices, values)))
                for logprob, indices, values in zip(chosen, best.indices.tolist(), best.values.tolist())]

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.model.device).manual_seed(seed)

    def steps(self, ids: list[int], sampling: Sampling, n: int) -> Iterator[torch.Tensor]:
        """The next token of each of n samples of `ids` ([n] tensors), until all of them end or max_tokens."""
        config = SamplingConfig(sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k,
                                sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty,
                                sampling.logit_bias)
        return iter_tokens(self.model, torch.tensor([ids] * n, device=self.model.device), config,
                           eos_token_id=self.eos_id, generator=self._generator(sampling.seed), compile=self.compile,
                           constraint=self.constraint(sampling.grammar, n))

    def complete(self, ids: list[int], sampling: Sampling, n: int, cancel: threading.Event | None = None
                 ) -> list[Choice]:
        """n choices sampled as one batch, which runs only until every choice has ended (EOS, a stop string:
        lm-eval's generate_until asks for 256 tokens and cuts at its stop strings) or `cancel` is set."""
        if sampling.max_tokens == 0:
            return [Choice("", "length", []) for _ in range(n)]
        steps = self.steps(ids, sampling, n)
        try:
            return [list(self.reply(ids, row, sampling, cancel))[-1] for row in batch_rows(steps, n)]
        finally:
            steps.close()

    def stream(self, ids: list[int], sampling: Sampling, cancel: threading.Event) -> Iterator[str | Choice]:
        """Text pieces as they come, then one Choice with the whole text, finish reason and token count."""
        steps = self.steps(ids, sampling, 1)
        try:
            yield from self.reply(ids, batch_rows(steps, 1)[0], sampling, cancel)
        finally:
            steps.close()

    def reply(self, prompt: list[int], tokens: Iterable, sampling: Sampling, cancel: threading.Event | None = None
              ) -> Iterator[str | Choice]:
        """The text of `tokens` generated after `prompt` in pieces as it decodes, cut before the first stop string,
        then the Choice.
        Tokens are taken only until EOS, the one that completes a stop string, or `cancel`: streamed or not, a
        choice counts the tokens generated up to there."""
        taken: list[int] = []
        eos = False

        def cancelled() -> bool:
            return cancel is not None and cancel.is_set()

        def until_end() -> Iterator[int]:
            nonlocal eos
            for token in map(int, tokens):
                eos = token == self.eos_id
                if eos or cancelled():
                    return
                taken.append(token)
                yield token
                if cancelled():  # set while the token was decoded: before the next token's step is drawn
                    return

        scanner, pieces = StopScanner(sampling.stops), []
        for piece in detokenize(self.tokenizer, until_end(), context=prompt):
            pieces.append(scanner.feed(piece))
            if pieces[-1]:
                yield pieces[-1]
            if scanner.stopped:
                break
        pieces.append(scanner.flush())
        if pieces[-1]:
            yield pieces[-1]
        ended = eos and not scanner.stopped
        yield Choice("".join(pieces), "stop" if scanner.stopped or ended else "length", taken, eos=ended)


def chat_logprobs(engine: Engine, prompt: list[int], tokens: list[int], top: int) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": engine.token_text(token), "logprob": logprob, "bytes": list(engine.token_bytes(token))}

    scored = engine.logprobs(prompt + tokens, top)[len(prompt) - 1:] if tokens else []
    content = [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in alternatives]}
               for token, (logprob, alternatives) in zip(tokens, scored)]
    return {"content": content, "refusal": None}


def completion_logprobs(engine: Engine, prompt: list[int], tokens: list[int], top: int, echo: bool) -> dict:
    """OpenAI's legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset; with echo the prompt's
    tokens come first and the very first one has no log-probability (null)."""
    shown = prompt + tokens if echo else tokens
    scored = engine.logprobs(prompt + tokens, top) if len(prompt) + len(tokens) > 1 else []
    scored = [(None, None)] + scored if echo else scored[len(prompt) - 1:]
    texts = [engine.token_text(token) for token in shown]
    start = len(engine.tokenizer.decode(prompt)) if echo else 0  # the reply's text: the prompt's, then the choice's
    offsets = (text_offsets(engine.tokenizer, prompt, skip_special_tokens=False) if echo else []) + \
        text_offsets(engine.tokenizer, tokens, skip_special_tokens=True, start=start)
    return {"tokens": texts, "token_logprobs": [logprob for logprob, _ in scored],
            "top_logprobs": [None if alternatives is None else {engine.token_text(t): lp for t, lp in alternatives}
                             for _, alternatives in scored],
            "text_offset": offsets}


def text_offsets(tokenizer, ids: list[int], skip_special_tokens: bool, start: int = 0) -> list[int]:
    """Where each token's text begins in `start` characters + the decoded `ids`. All the tokens of a character split
    across several (their text alone U+FFFD) begin where it does. Each step decodes only the tokens since the last
    clean cut, with the ones before it as context (as `detokenize` does), so a long prompt costs linear time."""
    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=skip_special_tokens)

    offsets, base, context, anchor = [], start, 0, 0  # ids[anchor] begins at `base`; ids[context:anchor] is context
    for i in range(len(ids)):
        so_far = decode(ids[context:i])
        offset = base + len(so_far.rstrip("\ufffd")) - len(decode(ids[context:anchor]))
        if not so_far.endswith("\ufffd"):  # a clean cut: ids[i] begins a character
            base, context, anchor = offset, anchor, i
        offsets.append(offset)
    return offsets
