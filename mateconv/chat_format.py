"""The chat format every stage shares: the special tokens, the ChatML chat template, and `render_chat`.

Special tokens have fixed ids: <|endoftext|> = 0 (pad, unk), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos).
`render_chat` is the Python twin of the Jinja template; stage 3 uses it to find the assistant spans for the loss mask.
"""
from __future__ import annotations

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # list position == token id

# ChatML; {% generation %} marks the trainable assistant tokens for `return_assistant_tokens_mask` (TRL interop), of
# every assistant turn: `"weight": 0` is left to render_chat, so that exported templates stay plain ChatML.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def has_chatml(tokenizer) -> bool:
    """Whether a `tokenizers.Tokenizer` holds the ChatML tokens <|im_start|> and <|im_end|> (Pythia's, Llama's and
    GPT-2's do not)."""
    return tokenizer.token_to_id(BOS) is not None and tokenizer.token_to_id(EOS) is not None


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text and the character spans of every assistant content + its closing <|im_end|>, but for
    the assistant messages of `"weight": 0` (OpenAI's fine-tuning format: context, not trained)."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for message in messages:
        head = f"{BOS}{message['role']}\n"
        body = f"{message['content']}{EOS}"
        if message["role"] == "assistant" and message.get("weight", 1):
            spans.append((length + len(head), length + len(head) + len(body)))
        parts.append(f"{head}{body}\n")
        length += len(parts[-1])
    if add_generation_prompt:
        parts.append(f"{BOS}assistant\n")
    return "".join(parts), spans
