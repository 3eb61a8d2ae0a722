"""The model a stage trains: a new MateConv model, or any Hugging Face causal LM (`init_from`); LoRA; HF saving."""
from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from mateconv.chat_format import BOS, CHAT_TEMPLATE, EOS, has_chatml
from mateconv.config import (STAGE_PROGRAMS, TRAINING_ONLY_MODEL, ConfigError, LoRAConfig, TrainConfig,
                             hf_dropout_settings, is_mateconv, is_training_checkpoint, load_run_config,
                             saved_model_settings)
from mateconv.files import atomic_dir
from mateconv.hub import hub_unreachable, local_model_dir, meant_as_local
from mateconv.tokenizer import save_pretrained_portable
from mateconv.train.checkpoint import CHECKPOINTS, checkpoint_problem, pointed_checkpoint, unwrap
from mateconv.train.distributed import Runtime, barrier, first_error
from mateconv.train.fsdp import full_model_state
from mateconv.train.signals import TrainingHalted
from mateconv.train.universal import saved_world_size
from model import MateConvConfig, MateConvForCausalLM, MoEFeedForward  # also registers the Auto classes
from model.config import ConfigError as ModelConfigError
from model.config import check_config


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (transformers renamed the method; v6 drops the old)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_hub_reachable(name: str, key: str) -> None:
    """A hub id that cannot be loaded (hub_unreachable) fails now, in one line, instead of in transformers' message
    or after huggingface_hub's half a minute of retries."""
    if why := hub_unreachable(name):
        raise ConfigError(f"{key}: {name} is not a directory here nor in the Hugging Face cache, and {why} (download "
                          "it where there is a network, or name a local directory)")


def load_causal_lm(path: str | Path, key: str, trust_remote_code: bool = False, **settings) -> nn.Module:
    """A saved Hugging Face causal LM (a local directory, or a hub id where downloads are possible), fp32 on the CPU;
    `key` names the setting in the error; `settings` replace its config's (its modules are built with them)."""
    if not Path(path).exists() and meant_as_local(path):
        writer = STAGE_PROGRAMS.get(Path(path).parent.name) if Path(path).name == "final" else None
        raise ConfigError(f"{key}: {path} does not exist (a model directory written by save_pretrained"
                          f"{f', which {writer} writes there' if writer else ''}, or a Hugging Face hub id)")
    if Path(path).is_file():
        raise ConfigError(f"{key}: {path} is a file; name the model directory that holds it (config.json and the "
                          "weights, as save_pretrained writes them); a file of weights alone loads with init_weights")
    if not (Path(path) / "config.json").is_file() and (Path(path) / "final" / "config.json").is_file():
        raise ConfigError(f"{key}: {path} is a training run's output directory; its model is {Path(path) / 'final'}")
    if not (Path(path) / "config.json").is_file() and (Path(path) / CHECKPOINTS).is_dir():
        latest = pointed_checkpoint(path, "latest")
        raise ConfigError(f"{key}: {path} is the output directory of a training run that has not reached its end (no "
                          f"final/); " + (f"its newest checkpoint, {latest}, is a model too" if latest else
                                          "it has no checkpoint either"))
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():  # transformers asks for a model_type
        raise ConfigError(f"{key}: {path} is not a model directory: it has no config.json (name one written by "
                          "save_pretrained, such as a run's final/)")
    if not Path(path).exists():
        check_hub_reachable(str(path), key)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                     **settings)
    except (OSError, ValueError, SafetensorError) as e:  # the last: a weights file cut short or damaged
        hint = "; set trust_remote_code true to run it" if "trust_remote_code" in str(e) else ""
        raise ConfigError(f"{key}: cannot load a causal LM from {path} ({str(e).splitlines()[0]}){hint}") from None
    if settings and isinstance(model.config, MateConvConfig):
        try:
            check_config(model.config)  # from_pretrained sets them without the config's checks (flex_attention's)
        except ModelConfigError as e:
            raise ConfigError(f"{key}: {path} with {e}") from None
    return model


def check_vocab(model: nn.Module, data_vocab: int, name: str = "the model",
                fix: str = "set vocab_size, or tokenize with the model's tokenizer") -> None:
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if data_vocab > model_vocab:
        raise ConfigError(f"the training data's token ids need a vocabulary of {data_vocab} but {name} has "
                          f"{model_vocab} embeddings ({fix})")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Loads a file of weights into `model` (init_weights): a state dict (torch.save'd or safetensors), or a dict
    holding one under "state" (seed 003's policy.pt), "state_dict" or "model". Every weight must fit; a tied weight may
    be missing."""
    if not Path(path).is_file():
        raise ConfigError(f"init_weights: {path} does not exist (a file of weights: .pt, .pth, .bin or .safetensors)")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors each raise their own
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"init_weights: cannot read {path} ({reason})") from None
    for key in ("state", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"init_weights: {path} holds no state dict (a mapping of names to tensors)")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[name].data_ptr() for name in state if name in params}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that differs
        raise ConfigError(f"init_weights: {path} does not fit the model ({str(e).splitlines()[-1].strip()})") from None
    missing = [name for name in missing if name not in params or params[name].data_ptr() not in loaded]
    if missing or unexpected:
        raise ConfigError(f"init_weights: {path} does not fit the model: {len(missing)} weights missing "
                          f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}")


def lacks_chatml(model: str | Path) -> bool:
    """Whether a model's tokenizer (a local one, or a hub model's in the Hugging Face cache) has no ChatML tokens
    (<|im_start|>, <|im_end|>): Pythia's, Llama's, GPT-2's."""
    from tokenizers import Tokenizer

    tokenizer_file = local_model_dir(model) / "tokenizer.json"
    if not tokenizer_file.is_file():
        return False
    return not has_chatml(Tokenizer.from_file(str(tokenizer_file)))


def with_chatml(config: TrainConfig, runtime: Runtime, stage: str) -> None:
    """SFT writes conversations in ChatML. A starting model whose tokenizer has no ChatML tokens gets them once (as
    TRL's setup_chat_format does): the tokens <|im_start|> (bos) and <|im_end|> (eos, and pad where there is none)
    and the ChatML template are added to its tokenizer, its embeddings grow to hold them (to a multiple of 64), and
    the result (init_weights applied) is saved to <out_dir>/chatml_start, which becomes init_from."""
    source = config.checkpoint.init_from
    if not source or not lacks_chatml(source):
        return
    if config.lora.enabled:
        raise ConfigError(f"init_from: {source}'s tokenizer has no ChatML tokens; SFT adds them, and LoRA would leave "
                          "their new embeddings untrained: train this SFT without --use_lora")
    target = Path(config.checkpoint.out_dir) / "chatml_start"
    made_from = {"init_from": str(source), "init_weights": config.checkpoint.init_weights}
    marker = target / "mateconv_chatml_from.json"  # rebuilt when the run starts from another model
    if runtime.is_main and not (marker.is_file() and json.loads(marker.read_text()) == made_from):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.checkpoint.trust_remote_code)
        model = load_causal_lm(source, "init_from", config.checkpoint.trust_remote_code)
        if config.checkpoint.init_weights:
            load_weights(model, config.checkpoint.init_weights)
        tokenizer.add_special_tokens({"bos_token": BOS, "eos_token": EOS, "pad_token": tokenizer.pad_token or EOS})
        tokenizer.chat_template = CHAT_TEMPLATE
        torch.manual_seed(config.optim.seed)  # the new rows are drawn around the mean embedding
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # its two-paragraph note on that; our line below says it
        try:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        finally:
            transformers_logging.set_verbosity(verbosity)
        for settings in (model.config, model.generation_config):
            settings.bos_token_id, settings.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
            settings.pad_token_id = tokenizer.pad_token_id
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            save_pretrained_portable(tokenizer, tmp)
            (tmp / marker.name).write_text(json.dumps(made_from))
        print(f"[{stage}] {source}'s tokenizer has no ChatML tokens: added {BOS} and {EOS} and the ChatML template, "
              f"embeddings grown to {model.get_input_embeddings().num_embeddings}; starting from {target}", flush=True)
    barrier()
    config.checkpoint.init_from, config.checkpoint.init_weights = str(target), ""


MOE_SETTINGS = ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "scoring_func", "aux_loss_alpha",
                "seq_aux", "norm_topk_prob", "moe_impl")


def unused_settings(config: TrainConfig) -> list[str]:
    """A note for each kind of settings that do nothing in this run, as given: MoE settings of a dense model built here
    (a saved model's own are checked against the flags when it is loaded), LoRA settings without use_lora."""
    notes = []
    model, dense = config.model, MateConvConfig()
    if not (model.use_moe or config.checkpoint.init_from):
        moe = [f"{name} {getattr(model, name)}" for name in MOE_SETTINGS if getattr(model, name) != getattr(dense, name)]
        if moe:
            notes.append(f"the MoE settings {', '.join(moe)} do nothing: this model is dense (use_moe false)")
    lora, plain = config.lora, LoRAConfig()
    if not lora.enabled:
        changed = [f"{lora.PREFIX}{f.name} {getattr(lora, f.name)}" for f in dataclasses.fields(lora)
                   if f.name != "enabled" and getattr(lora, f.name) != getattr(plain, f.name)]
        if changed:
            notes.append(f"the LoRA settings {', '.join(changed)} do nothing: use_lora is false, every weight trains")
    return notes


def check_grouped_experts(model: nn.Module, config: TrainConfig, runtime: Runtime) -> None:
    """`moe_impl grouped` where torch._grouped_mm cannot run: one line before training, not a traceback from the
    first forward."""
    compiles = config.parallel.compiles(runtime.device)
    for module in model.modules():
        if isinstance(module, MoEFeedForward) and (refusal := module.grouped_refusal(runtime.device, runtime.dtype,
                                                                                     compiles)):
            raise ConfigError(refusal)


def build_model(config: TrainConfig) -> nn.Module:
    """fp32 weights on the CPU; the engine moves/casts them. With init_from the model section is ignored but for
    flash_attn and the settings only training reads (a Hugging Face model's: its dropout probabilities)."""
    if init_from := config.checkpoint.init_from:
        saved = saved_model_settings(Path(init_from)) or {}
        training = ({name: getattr(config.model, name) for name in TRAINING_ONLY_MODEL} if saved and is_mateconv(saved)
                    else hf_dropout_settings(saved, config.model.dropout))
        model = load_causal_lm(init_from, "init_from", config.checkpoint.trust_remote_code, **training)
        if not config.model.flash_attn:  # the plain attention, as for our own model
            model.set_attn_implementation("eager")
    else:
        model = MateConvForCausalLM(copy.deepcopy(config.model))  # the model may change its config (max_seq_len)
    if config.checkpoint.init_weights:
        load_weights(model, config.checkpoint.init_weights)
    if config.parallel.gradient_checkpointing:  # the training forwards pass use_cache=False; the saved config keeps it
        enable_activation_checkpointing(model)
    if config.lora.enabled:
        if not (config.checkpoint.init_from or config.checkpoint.init_weights):
            raise ConfigError("use_lora adapts a trained model, and this run starts from a random one (no init_from "
                              "or init_weights): name the model to adapt, or train without --use_lora")
        model = add_lora(model, config.lora)
    return model


def extend_length(model: nn.Module, max_seq_len: int) -> int | None:
    """Lets a model whose positions are computed (RoPE) take rows of max_seq_len tokens; returns the limit it had if
    that was lower. Its limit (a MateConv model's max_seq_len, a Hugging Face model's max_position_embeddings) is a
    check, not a table, so fine-tuning on longer rows than pretraining is possible; the saved model then takes the
    longer length (chat and serve cut the context at it). A Hugging Face model whose RoPE is scaled from that length
    (a rope_type other than default) keeps it."""
    config = model.config
    name = "max_seq_len" if isinstance(config, MateConvConfig) else "max_position_embeddings"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    limit = getattr(config, name, None)
    if limit is None or max_seq_len <= limit or rope.get("rope_type", None if rope else "default") != "default":
        return None
    setattr(config, name, max_seq_len)
    return limit


def learned_positions(model: nn.Module) -> int | None:
    """How many positions a model with a table of learned position embeddings (GPT-2's, OPT's) takes; None for one
    whose positions are computed (RoPE, ALiBi), which has no embedding table but the tokens'."""
    tokens = model.get_input_embeddings()
    if not any(isinstance(m, nn.Embedding) and m is not tokens for m in model.modules()):
        return None
    return getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)


LINEAR_LAYERS = (nn.Linear, Conv1D)  # what LoRA adapts here (Conv1D: GPT-2's linear layers)
ALL_LINEAR = "all-linear"  # PEFT's and TRL's name for every linear layer but the output head


def add_lora(model: nn.Module, lora: LoRAConfig) -> nn.Module:
    shared = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))  # tied: counted twice
    kinds: dict[str, set[str]] = {}  # each module name: what its modules are (linear, tied linear, other)
    for name, module in model.named_modules():
        linear = isinstance(module, LINEAR_LAYERS)
        kind = "other" if not linear else "tied" if shared[id(module.weight)] > 1 else "linear"
        kinds.setdefault(name.rsplit(".", 1)[-1], set()).add(kind)
    linear_names = sorted(name for name, kind in kinds.items() if kind == {"linear"})
    linears = ", ".join(linear_names)
    if ALL_LINEAR in (t.lower() for t in lora.target_modules):
        if len(lora.target_modules) > 1:
            raise ConfigError(f"lora_target_modules: {ALL_LINEAR} names every linear layer; give it alone")
        head = model.get_output_embeddings()
        heads = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head}
        return _peft_model(model, lora, [name for name in linear_names if name not in heads])
    targets = [t for t in lora.target_modules if t in kinds]
    missing = [t for t in lora.target_modules if t not in kinds]
    # the default names are tried on any model (a Hugging Face one may lack some); names given must all be there
    default = lora.target_modules == LoRAConfig().target_modules
    if not targets or missing and not default:
        hint = (f": name some with --lora_target_modules, or {ALL_LINEAR} for every one but the output head"
                if default else "")
        raise ConfigError(f"lora_target_modules: no module of the model is named {', '.join(missing)} (its linear "
                          f"layers: {linears}){hint}")
    # peft adapts embeddings too, but then (as for a tied lm_head) the merged model is not the one trained; it fails on
    # anything else in a traceback
    for target in targets:
        problem = ("is not a linear layer" if "other" in kinds[target] else "shares its weight with another layer "
                   "(tied embeddings): merged into the saved model the adapter would change both"
                   if "tied" in kinds[target] else None)
        if problem:
            raise ConfigError(f"lora_target_modules: {target} {problem} (LoRA adapts these linear layers of the "
                              f"model: {linears})")
    return _peft_model(model, lora, targets)


def _peft_model(model: nn.Module, lora: LoRAConfig, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # peft asks the model for transformers' deprecated is_gradient_checkpointing: a FutureWarning in every LoRA log
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=targets, task_type="CAUSAL_LM"))


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DeepSpeed/DDP and PEFT wrappers."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "peft_config") else inner


def load_tokenizer(config: TrainConfig):
    """The tokenizer saved with the model: from init_from if it has one, else tokenizer_path; None if neither."""
    trust = config.checkpoint.trust_remote_code
    for path in (config.checkpoint.init_from, config.data.tokenizer_path):
        if path and (Path(path) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if config.checkpoint.init_from and not Path(config.checkpoint.init_from).exists():
        try:
            return AutoTokenizer.from_pretrained(config.checkpoint.init_from, trust_remote_code=trust)  # a hub id
        except (OSError, ValueError):
            return None
    return None


CONSOLIDATED = "model"  # a training checkpoint's weights as a save_pretrained directory, inside the checkpoint


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights in a training checkpoint, whichever engine wrote it."""
    if saved_world_size(path):  # ZeRO 1-3: the fp32 weights are partitioned over the ranks' optimizer files
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    if (path / "mp_rank_00_model_states.pt").is_file():  # DeepSpeed ZeRO-0: whole
        return torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)["model"]


def model_dir(path: str | Path) -> Path:
    """The save_pretrained directory a model path stands for: a training checkpoint (`checkpoints/step_N`, of a run
    that has no final/ yet) is consolidated once into `<checkpoint>/model/` with the run's tokenizer (LoRA merged in);
    any other path is itself. Not collective: one process calls it."""
    path = Path(path)
    if not is_training_checkpoint(path):
        return path
    target = path / CONSOLIDATED
    if (target / "config.json").is_file():
        return target
    if problem := checkpoint_problem(path):  # else a torch or DeepSpeed traceback from deep in the loading
        raise ConfigError(f"{path} is damaged ({problem}): use an intact checkpoint of its run, or its final/")
    config = load_run_config(path / "config.yaml")
    config.parallel.gradient_checkpointing = False
    model = build_model(config)
    model.load_state_dict(checkpoint_weights(path))
    if hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    tokenizer = load_tokenizer(config)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                save_pretrained_portable(tokenizer, tmp)
    except (OSError, SafetensorError) as e:  # a full disk
        raise ConfigError(f"consolidating {path} into {target} failed ({type(e).__name__}: {e}): free some space, "
                          "then run the same command") from None
    print(f"[model] {path} holds a training checkpoint: its weights consolidated into {target}", flush=True)
    return target


def resolve_init_from(config: TrainConfig, runtime: Runtime) -> None:
    """init_from naming a training checkpoint trains its consolidated weights (rank 0 writes them, once)."""
    source = config.checkpoint.init_from
    if source and is_training_checkpoint(source):
        if runtime.is_main:
            model_dir(source)
        barrier()
        config.checkpoint.init_from = str(Path(source) / CONSOLIDATED)


def gather_state_dict(engine, runtime: Runtime) -> dict | None:
    """Full weights on rank 0 under ZeRO-3 and FSDP (collective); None means 'use the module's own state dict'."""
    if runtime.use_deepspeed and engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if runtime.fsdp:
        return full_model_state(engine)
    return None


def save_hf(engine, tokenizer, target: str | Path, runtime: Runtime) -> Path:
    """Hugging Face format (`save_pretrained` + tokenizer), written atomically; LoRA adapters are merged in, and
    also saved on their own in `adapter/` (peft's layout: `PeftModel.from_pretrained(base, target / "adapter")`).

    Collective (every rank must call it); only rank 0 writes. A write that fails (a full disk) leaves `target` as it
    was and raises TrainingHalted on every rank.
    """
    target = Path(target)
    state_dict = gather_state_dict(engine, runtime)
    error = None
    if runtime.is_main:
        module = unwrap(engine)
        try:
            with atomic_dir(target) as tmp:
                if hasattr(module, "peft_config"):
                    module.save_pretrained(tmp / "adapter")
                    module = copy.deepcopy(module).merge_and_unload()
                module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                if tokenizer is not None:
                    save_pretrained_portable(tokenizer, tmp)
        except (OSError, SafetensorError) as e:
            error = f"{type(e).__name__}: {e}"
    failed = first_error(error)  # the other ranks wait here for rank 0's outcome
    if failed is not None:
        raise TrainingHalted(f"writing {target} failed ({failed}); it is as it was, and the checkpoints are intact: "
                             "free some space, then run the same command to resume")
    return target
