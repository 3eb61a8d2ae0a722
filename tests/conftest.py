"""Shared test fixtures (generic, reusable by every area's tests)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def _tiny_llama(seed: int = 0, vocab_size: int = 50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """Factory: `tiny_llama(seed, vocab_size=50)` -> a randomly initialised 2-layer Hugging Face LlamaForCausalLM."""
    return _tiny_llama


def _random_dpo_pairs(n: int, seq_len: int, vocab_size: int = 50, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Items shaped like `mateconv.data.shards.DPOTokens`: a shared prompt, responses of random length, right padding,
    labels -100 on prompt and padding."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        prompt_len = int(torch.randint(2, seq_len // 3, (1,), generator=generator))
        prompt = torch.randint(3, vocab_size, (prompt_len,), generator=generator)
        item = {}
        for side in ("chosen", "rejected"):
            total = int(torch.randint(prompt_len + 1, seq_len + 1, (1,), generator=generator))
            ids = torch.zeros(seq_len, dtype=torch.long)
            ids[:prompt_len] = prompt
            ids[prompt_len:total] = torch.randint(3, vocab_size, (total - prompt_len,), generator=generator)
            labels = torch.full((seq_len,), -100)
            labels[prompt_len:total] = ids[prompt_len:total]
            item[f"{side}_input_ids"] = ids
            item[f"{side}_labels"] = labels
            item[f"{side}_attention_mask"] = (torch.arange(seq_len) < total).long()
        items.append(item)
    return items


@pytest.fixture(scope="session")
def random_dpo_pairs() -> Callable[..., list[dict[str, torch.Tensor]]]:
    """Factory: `random_dpo_pairs(n, seq_len, vocab_size=50, seed=0)` -> list of DPOTokens-shaped items."""
    return _random_dpo_pairs
