"""Steering vectors on disk: safetensors + JSON, and export to llama.cpp's control-vector GGUF.

A :class:`SteeringVectors` holds named sets of per-layer directions read from contrast pairs
(``"concept"``: what to detect or remove; ``"behaviour"``: what to push toward, e.g. refusal).
Each set has unit directions ``[num_layers, hidden]`` and ``scales [num_layers]``, the length of the
mean difference between the two sides along the direction, so ``strength * scale * direction``
moves activations by ``strength`` times the typical gap between the sides. ``norms`` holds the
mean residual norm per layer (position 0 excluded), for reference.

Example:
    >>> vecs = SteeringVectors.load("vectors/harmful")  # doctest: +SKIP
    >>> vecs.export_gguf("harmful.gguf", "behaviour", layers=[12, 13, 14], strength=4.0)  # doctest: +SKIP
    >>> # llama-cli -m model.gguf --control-vector harmful.gguf
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import InvalidOptionError, MissingWeightsError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS = "vectors.safetensors"
CONFIG = "config.json"


@dataclass
class SteeringVectors:
    """Per-layer directions read on one model, with the calibration chosen for them.

    Attributes:
        directions: set name -> ``[num_layers, hidden]`` unit rows (float32, CPU).
        scales: set name -> ``[num_layers]`` mean-difference length along each direction.
        norms: ``[num_layers]`` mean residual-stream norm at each layer output.
        heads: learned detector heads, name -> their tensors (:class:`~safeguard.steering.head.MLPHead`).
        meta: JSON-able facts: concept, reading method and position, model fingerprint, data
            split sizes, and ``calibration`` (the detectors with their layers and thresholds and the
            chosen one, behaviour layers, strength, and the validation tables they were picked from).
    """

    directions: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    norms: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.norms.shape[0])

    @property
    def hidden_size(self) -> int:
        """Width of the residual-stream sets (the sentence-encoder set ``condition_encoder`` has its own)."""
        return int(next(d for n, d in self.directions.items() if n != "condition_encoder").shape[1])

    @property
    def calibration(self) -> dict[str, Any]:
        return self.meta.setdefault("calibration", {})

    def vector(self, name: str, layer: int, strength: float = 1.0) -> torch.Tensor:
        """``strength * scale * direction`` of set ``name`` at ``layer``."""
        self._check_set(name)
        return strength * self.scales[name][layer] * self.directions[name][layer]

    def _check_set(self, name: str) -> None:
        if name not in self.directions:
            raise InvalidOptionError(f"no direction set {name!r} in these vectors; sets: {sorted(self.directions)}.")

    # ------------------------------------------------------------------ disk
    def save(self, folder: str | Path) -> Path:
        """Write ``vectors.safetensors`` and ``config.json`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"norms": self.norms.float().contiguous()}
        for name in self.directions:
            tensors[f"{name}.directions"] = self.directions[name].float().contiguous()
            tensors[f"{name}.scales"] = self.scales[name].float().contiguous()
        for name, params in self.heads.items():
            for key, t in params.items():
                tensors[f"head.{name}.{key}"] = t.float().contiguous()
        save_file(tensors, str(folder / TENSORS), metadata={"format": "safeguard-steering", "version": "1"})
        config = {
            "format": "safeguard-steering",
            "version": FORMAT_VERSION,
            "sets": sorted(self.directions),
            **({"heads": sorted(self.heads)} if self.heads else {}),
            **self.meta,
        }
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SteeringVectors:
        """Read vectors written by :meth:`save` (safetensors only; nothing is unpickled)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / TENSORS).is_file() or not (folder / CONFIG).is_file():
            raise MissingWeightsError(
                f"{folder} has no {TENSORS} + {CONFIG}; write one with SteeringVectors.save() or "
                "`python scripts/calibrate_repe.py`."
            )
        config = json.loads((folder / CONFIG).read_text())
        if config.get("format") != "safeguard-steering" or int(config.get("version", 0)) > FORMAT_VERSION:
            raise InvalidOptionError(
                f"{folder / CONFIG} is not a safeguard steering-vector config of version <= {FORMAT_VERSION} "
                f"(format={config.get('format')!r}, version={config.get('version')!r})."
            )
        tensors = load_file(str(folder / TENSORS))
        sets = config.pop("sets")
        heads: dict[str, dict[str, torch.Tensor]] = {n: {} for n in config.pop("heads", [])}
        for key, t in tensors.items():
            if key.startswith("head."):
                name, param = key[len("head.") :].rsplit(".", 1)
                heads.setdefault(name, {})[param] = t
        for key in ("format", "version"):
            config.pop(key)
        return cls(
            directions={n: tensors[f"{n}.directions"] for n in sets},
            scales={n: tensors[f"{n}.scales"] for n in sets},
            norms=tensors["norms"],
            meta=config,
            heads=heads,
        )

    def export_gguf(
        self,
        path: str | Path,
        name: str = "behaviour",
        *,
        layers: list[int] | None = None,
        strength: float | None = None,
    ) -> Path:
        """Write set ``name`` as a llama.cpp control vector (``--control-vector FILE``).

        llama.cpp adds ``direction.<i>`` to the output of (0-based) layer ``i`` at every position,
        for ``i`` in 1..n_layer-1; it cannot steer layer 0 and has no conditional or ablation
        mode, so only the ``add`` part of a guard carries over. Layers default to the calibrated
        behaviour layers and strength to the calibrated strength.
        """
        try:
            import gguf
        except ImportError as e:
            from ..core.errors import MissingDependencyError

            raise MissingDependencyError("GGUF export needs the 'gguf' package: pip install 'safeguard[llm]'") from e
        self._check_set(name)
        cal = self.calibration
        layers = list(layers if layers is not None else cal.get("layers", []))
        strength = float(strength if strength is not None else cal.get("strength", 1.0))
        if not layers:
            raise InvalidOptionError("export_gguf needs layers=[...]: these vectors carry no calibrated layers.")
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise InvalidOptionError(f"layers {bad} out of range 0..{self.num_layers - 1}.")
        if 0 in layers:
            logger.warning("llama.cpp control vectors cannot steer layer 0; it is left out of %s", path)
            layers = [i for i in layers if i != 0]
        path = Path(path)
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", str(self.meta.get("model", {}).get("model_type", "")))
        writer.add_uint32("controlvector.layer_count", len(layers))
        for i in sorted(layers):
            vec = self.vector(name, i, strength).float().numpy()
            writer.add_tensor(f"direction.{i}", vec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path
