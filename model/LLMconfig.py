"""Seed 001's quick-start name for the config: `from model.LLMconfig import LLMconfig`."""
from model.config import MateConvConfig as LLMconfig

__all__ = ["LLMconfig"]
