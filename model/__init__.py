"""MateConv model package. Importing it registers MateConv with transformers' Auto classes."""
from transformers import AutoConfig, AutoModelForCausalLM

from model.config import PRESETS, ConfigError, MateConvConfig, preset_config
from model.modeling import MateConvCausalLMOutput, MateConvForCausalLM, MateConvModel
from model.moe import MoEFeedForward

AutoConfig.register(MateConvConfig.model_type, MateConvConfig, exist_ok=True)
AutoModelForCausalLM.register(MateConvConfig, MateConvForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "ConfigError", "MateConvCausalLMOutput", "MateConvConfig", "MateConvForCausalLM",
           "MateConvModel", "MoEFeedForward", "preset_config"]
