"""Models named by a Hugging Face hub id ('name' or 'namespace/name') rather than a local directory: where their files
are on this machine (the local Hugging Face cache), and whether they can be downloaded here."""
from __future__ import annotations

import json
from pathlib import Path


def meant_as_local(path: str | Path) -> bool:
    """Whether a model path that does not exist was meant as a directory here, not as a hub id ('name' or
    'namespace/name'): absolute, relative to '.', more than two parts, or under a directory that exists here."""
    text = str(path)
    return (Path(text).is_absolute() or text.startswith(".") or len(Path(text).parts) > 2
            or Path(text).parent != Path(".") and Path(text).parent.is_dir())


def is_hub_id(path: str | Path) -> bool:
    return not Path(path).exists() and not meant_as_local(path)


def cached_hub_config(name: str) -> str | None:
    """The local Hugging Face cache's copy of hub model `name`'s config.json (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid hub id: from_pretrained says so
        return None
    return cached if isinstance(cached, str) else None


def local_model_dir(path: str | Path) -> Path:
    """Where model `path` is on this machine: itself, or for a hub id its snapshot in the local Hugging Face cache
    (the files fetched so far: config.json when the config is read, the tokenizer when it loads)."""
    if is_hub_id(path) and (cached := cached_hub_config(str(path))):
        return Path(cached).parent
    return Path(path)


def hub_unreachable(name: str) -> str | None:
    """Why hub model `name`, not in the local Hugging Face cache, cannot be downloaded here (HF_HUB_OFFLINE, or the
    hub's host cannot be resolved); None when it is cached or may be."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if cached_hub_config(name):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so nothing downloads"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} cannot be reached to download it"
    return None


def hub_settings(name: str) -> dict | None:
    """Hub model `name`'s config.json, from the local Hugging Face cache or downloaded there (its weights follow when
    the model loads); None where it cannot be had (the loader names the problem)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if hub_unreachable(name):
        return None
    try:
        return json.loads(Path(cached_hub_config(name) or hf_hub_download(name, "config.json")).read_text())
    except (OSError, ValueError, EntryNotFoundError):
        return None
