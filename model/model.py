"""Seed 001's quick-start name for the model: `from model.model import LLM`, `model = LLM(config)`."""
from model.modeling import MateConvForCausalLM as LLM

__all__ = ["LLM"]
