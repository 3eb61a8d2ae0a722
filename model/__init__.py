"""MateConv model package. Importing it registers MateConv with transformers' Auto classes.

`save_pretrained` writes the model code (config.py, modeling.py, moe.py) and an `auto_map` next to the weights, so
a checkpoint loads anywhere with `trust_remote_code=True`; the model files therefore import each other relatively.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from model.config import PRESETS, ConfigError, MateConvConfig, preset_config
from model.modeling import MateConvCausalLMOutput, MateConvForCausalLM, MateConvModel
from model.moe import MoEFeedForward

AutoConfig.register(MateConvConfig.model_type, MateConvConfig, exist_ok=True)
AutoModelForCausalLM.register(MateConvConfig, MateConvForCausalLM, exist_ok=True)
MateConvConfig.register_for_auto_class()
MateConvForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["PRESETS", "ConfigError", "MateConvCausalLMOutput", "MateConvConfig", "MateConvForCausalLM",
           "MateConvModel", "MoEFeedForward", "preset_config"]
