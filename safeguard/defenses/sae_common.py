"""What the two SAE defenses share: finding the SAE, its recorded module, and that module in the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.errors import InvalidOptionError, MissingWeightsError


def sae_and_module(
    adapter: Any, sae: str | None, default: Path, module: str | None, kind: str
) -> tuple[Any, str, list[Any]]:
    """``(SAE, module name, modules)``: the SAE folder (or ``default``) and the pipeline module(s) it reads.

    The module comes from ``module`` or from the ``activations_meta.json`` the trainer wrote next
    to the SAE; ``kind`` ("text" or "denoiser") must match the module's component. Several modules
    joined by ``+`` (an SAE over layers concatenated per token) give one entry each.

    Raises:
        MissingWeightsError: no SAE folder. InvalidOptionError: no module, or not one of the pipeline.
    """
    from ..sae import load_sae
    from ..sae.activations import resolve_module

    folder = Path(sae) if sae else default
    if not folder.exists():
        raise MissingWeightsError(
            f"no SAE at {folder}; train one with `python -m safeguard sae train --model ... --module <{kind} module>` "
            "and pass sae='<its folder>'."
        )
    meta = folder / "activations_meta.json"
    name = module or (json.loads(meta.read_text()).get("module") if meta.is_file() else None)
    if name is None:
        raise InvalidOptionError(f"the SAE in {folder} does not record its module; pass module='<dotted path>'.")
    found = []
    for part in name.split("+"):
        _, _, mod, found_kind = resolve_module(adapter.pipe, part.strip())
        if found_kind != kind:
            raise InvalidOptionError(f"module={part!r} is a {found_kind} module; this defense needs a {kind} module.")
        found.append(mod)
    return load_sae(folder, device=adapter.device, dtype=torch.float32), name, found
