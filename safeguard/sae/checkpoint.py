"""Saving and loading :class:`~safeguard.sae.TopKSAE` checkpoints.

Layouts read by :func:`load_sae` (one SAE per folder, detected from the file names):

- **sparsify** (EleutherAI; what :func:`save_sae` writes): ``cfg.json`` + ``sae.safetensors`` with
  ``encoder.weight`` ``[num_latents, d_in]``, ``encoder.bias`` ``[num_latents]``, ``W_dec``
  ``[num_latents, d_in]``, ``b_dec`` ``[d_in]``.
- **SAELens**: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc`` ``[d_in, d_sae]``,
  ``b_enc``, ``W_dec`` ``[d_sae, d_in]``, ``b_dec``. The orientation of ``W_enc`` / ``W_dec`` is
  detected from their shapes, so files stored the other way round load too.

Tensors are only ever read with ``safetensors``. Pickled checkpoints (``.pt`` / ``.pth``, such as
Concept Steerers' ``state_dict.pth``) are never loaded implicitly: convert them once with
:func:`convert_pickled_state_dict`, which uses ``torch.load(weights_only=True)`` and refuses any
pickle holding arbitrary objects.

Example:
    >>> from safeguard.sae import load_sae, save_sae
    >>> save_sae(sae, "my_sae")  # doctest: +SKIP
    >>> sae = load_sae("my_sae", device="cuda", dtype=torch.float16)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.errors import InvalidOptionError, MissingWeightsError, UnsafeCheckpointError
from .topk import SAEConfig, SAEFormatError, TopKSAE

logger = logging.getLogger(__name__)

FORMAT = "sparsify"
FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
SAELENS_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")

# convert_pickled_state_dict: accepted names for each tensor, and the layout each name implies
# for the weights ("ld" = [num_latents, d_in], "dl" = [d_in, num_latents]) when the shape alone
# cannot tell (num_latents == d_in).
_PICKLE_NAMES: dict[str, dict[str, str | None]] = {
    "encoder.weight": {"encoder.weight": "ld", "W_enc": "dl"},
    "encoder.bias": {"encoder.bias": None, "b_enc": None, "latent_bias": None},
    "W_dec": {"W_dec": "ld", "decoder.weight": "dl"},
    "b_dec": {"b_dec": None, "pre_bias": None, "b_pre": None},
}
# training statistics some checkpoints carry next to the weights (OpenAI's sparse_autoencoder)
_IGNORED_STATS = {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"}
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "sae", "autoencoder")


# ---------------------------------------------------------------------------- save


def save_sae(sae: TopKSAE, folder: str | Path) -> Path:
    """Write ``sae`` as a sparsify folder: ``cfg.json`` and ``sae.safetensors``.

    ``cfg.json`` holds the :class:`SAEConfig` fields plus ``"format": "sparsify"`` and
    ``"version": 1``; the weights keep their dtype. Returns the folder.
    """
    from safetensors.torch import save_file

    if not isinstance(sae, TopKSAE):
        raise InvalidOptionError(f"save_sae needs a TopKSAE, got {type(sae).__name__}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = sae.state_dict()
    tensors = {name: state[name].detach().to("cpu").contiguous() for name in SPARSIFY_KEYS}
    cfg = {**sae.cfg.to_dict(), "format": FORMAT, "version": FORMAT_VERSION}
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / SPARSIFY_WEIGHTS), metadata={"format": "pt"})
    return folder


# ---------------------------------------------------------------------------- load


def load_sae(
    folder: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    k: int | None = None,
) -> TopKSAE:
    """Load a TopK SAE from a sparsify or SAELens folder.

    Args:
        folder: the folder holding ``cfg.json`` and the weights (a path to one of those files
            is accepted too).
        device: where to put the SAE (default CPU).
        dtype: parameter dtype (default: the dtype stored in the file).
        k: TopK override; needed for SAELens folders whose config does not record ``k``.

    Raises:
        MissingWeightsError: the folder or its files are missing (names the subfolders when
            ``folder`` is a multi-SAE parent folder).
        SAEFormatError: a tensor has the wrong shape, keys are missing, or the config
            describes an SAE this loader cannot run exactly.
        InvalidOptionError: ``k`` is out of range.
    """
    folder = Path(folder)
    if folder.is_file() and folder.name in (CFG_FILE, SPARSIFY_WEIGHTS, SAELENS_WEIGHTS):
        folder = folder.parent
    if not folder.is_dir():
        raise MissingWeightsError(
            f"SAE folder {str(folder)!r} does not exist; expected a folder with {CFG_FILE} and "
            f"{SPARSIFY_WEIGHTS} (sparsify) or {SAELENS_WEIGHTS} (SAELens)."
        )
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        subfolders = sorted(p.name for p in folder.iterdir() if (p / CFG_FILE).is_file())
        if subfolders:
            raise MissingWeightsError(
                f"{str(folder)!r} holds several SAEs in subfolders {subfolders}, not one SAE; "
                f"load one of them, e.g. load_sae({str(folder / subfolders[0])!r})."
            )
        raise MissingWeightsError(
            f"{str(cfg_path)!r} not found; an SAE folder needs {CFG_FILE} next to {SPARSIFY_WEIGHTS} "
            f"(sparsify) or {SAELENS_WEIGHTS} (SAELens). Files present: {_listing(folder)}."
        )
    cfg = _read_json(cfg_path)
    if (folder / SPARSIFY_WEIGHTS).is_file():
        weights_path = folder / SPARSIFY_WEIGHTS
        tensors = _read_safetensors(weights_path)
        sae_cfg, state = _from_sparsify(cfg, tensors, k, cfg_path, weights_path)
    elif (folder / SAELENS_WEIGHTS).is_file():
        weights_path = folder / SAELENS_WEIGHTS
        tensors = _read_safetensors(weights_path)
        sae_cfg, state = _from_saelens(cfg, tensors, k, cfg_path, weights_path)
    else:
        raise MissingWeightsError(
            f"no weights in {str(folder)!r}: expected {SPARSIFY_WEIGHTS} (sparsify) or {SAELENS_WEIGHTS} "
            f"(SAELens) next to {CFG_FILE}. Files present: {_listing(folder)}."
        )
    return _build(sae_cfg, state, device, dtype, str(weights_path))


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())[:20]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SAEFormatError(f"could not read SAE config {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise SAEFormatError(f"SAE config {str(path)!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
        raise SAEFormatError(f"could not read safetensors file {str(path)!r}: {exc}") from exc


def _resolve_k(k: int | None, cfg: Mapping[str, Any], cfg_path: Path) -> int:
    """``k`` override, else the config's ``k`` / ``activation_fn_kwargs.k`` / ``top_k``."""
    if k is not None:
        return k
    kwargs = cfg.get("activation_fn_kwargs")
    for value in (cfg.get("k"), kwargs.get("k") if isinstance(kwargs, dict) else None, cfg.get("top_k")):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise SAEFormatError(f"SAE config {str(cfg_path)!r} has k={value!r}, which is not an integer.")
            return value
    raise SAEFormatError(
        f"SAE config {str(cfg_path)!r} does not say how many latents to keep (no 'k' or "
        "'activation_fn_kwargs.k'); pass it explicitly, e.g. load_sae(folder, k=32)."
    )


def _config_int(cfg: Mapping[str, Any], key: str, fallback: int, cfg_path: Path) -> int:
    value = cfg.get(key)
    if value is None or value == 0:
        return fallback
    if isinstance(value, bool) or not isinstance(value, int):
        raise SAEFormatError(f"SAE config {str(cfg_path)!r} has {key}={value!r}, which is not an integer.")
    return value


def _from_sparsify(
    cfg: dict[str, Any], tensors: dict[str, torch.Tensor], k: int | None, cfg_path: Path, weights_path: Path
) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    fmt, version = cfg.get("format", FORMAT), cfg.get("version", FORMAT_VERSION)
    if fmt != FORMAT or version != FORMAT_VERSION:
        raise SAEFormatError(
            f"{str(cfg_path)!r} says format={fmt!r}, version={version!r}; this safeguard reads "
            f"format={FORMAT!r} version {FORMAT_VERSION} next to {SPARSIFY_WEIGHTS}."
        )
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise SAEFormatError(
                f"{str(cfg_path)!r} has {flag}=true; only plain TopK SAEs (no transcoder, no skip "
                "connection) are supported."
            )
    _require_keys(tensors, SPARSIFY_KEYS, weights_path)
    d_in = _config_int(cfg, "d_in", tensors["b_dec"].shape[-1], cfg_path)
    expansion = cfg.get("expansion_factor")
    fallback = tensors["encoder.bias"].shape[-1]
    if isinstance(expansion, int) and not isinstance(expansion, bool) and expansion > 0:
        fallback = d_in * expansion
    num_latents = _config_int(cfg, "num_latents", fallback, cfg_path)
    normalize = cfg.get("normalize_decoder", True)
    sae_cfg = _make_config(d_in, num_latents, _resolve_k(k, cfg, cfg_path), bool(normalize), cfg_path)
    return sae_cfg, {name: tensors[name] for name in SPARSIFY_KEYS}


def _from_saelens(
    cfg: dict[str, Any], tensors: dict[str, torch.Tensor], k: int | None, cfg_path: Path, weights_path: Path
) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    arch = cfg.get("architecture")
    act = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if arch not in (None, "standard", "topk"):
        raise SAEFormatError(
            f"{str(cfg_path)!r} describes a SAELens {arch!r} SAE; only 'topk' (or 'standard' with an "
            "explicit k=) SAEs can be loaded."
        )
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none", False):
        raise SAEFormatError(
            f"{str(cfg_path)!r} has normalize_activations={norm!r}; SAEs that rescale their inputs are not "
            "supported (only 'none')."
        )
    _require_keys(tensors, SAELENS_KEYS, weights_path)
    d_in = _config_int(cfg, "d_in", tensors["b_dec"].shape[-1], cfg_path)
    d_sae = _config_int(cfg, "d_sae", tensors["b_enc"].shape[-1], cfg_path)
    topk_arch = arch == "topk" or act == "topk"
    if not topk_arch and k is not None:
        warnings.warn(
            f"{str(cfg_path)!r} describes a ReLU SAE (architecture={arch!r}, activation={act!r}); running it "
            f"with TopK k={k} only approximates the original.",
            stacklevel=3,
        )
    sae_cfg = _make_config(d_in, d_sae, _resolve_k(k, cfg, cfg_path), False, cfg_path)
    w_enc = _orient(tensors["W_enc"], "W_enc", d_sae, d_in, "dl", weights_path)
    w_dec = _orient(tensors["W_dec"], "W_dec", d_sae, d_in, "ld", weights_path)
    b_enc, b_dec = tensors["b_enc"], tensors["b_dec"]
    _check_shape(b_enc, "b_enc", (d_sae,), weights_path)
    _check_shape(b_dec, "b_dec", (d_in,), weights_path)
    if cfg.get("apply_b_dec_to_input", True) is False:
        # SAELens then encodes x @ W_enc + b_enc; TopKSAE always encodes W (x - b_dec) + b, so
        # fold W b_dec into the encoder bias (exact up to rounding).
        logger.info("%s: apply_b_dec_to_input=false, folding W_enc @ b_dec into the encoder bias", cfg_path)
        b_enc = b_enc + (w_enc.to(torch.float64) @ b_dec.to(torch.float64)).to(b_enc.dtype)
    state = {"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    return sae_cfg, state


def _make_config(d_in: int, num_latents: int, k: int, normalize: bool, source: Path) -> SAEConfig:
    try:
        return SAEConfig(d_in=d_in, num_latents=num_latents, k=k, normalize_decoder=normalize)
    except InvalidOptionError as exc:
        raise type(exc)(f"{exc} (SAE config read from {str(source)!r})") from exc


def _require_keys(tensors: Mapping[str, torch.Tensor], keys: tuple[str, ...], path: Path) -> None:
    missing = [key for key in keys if key not in tensors]
    extra = sorted(key for key in tensors if key not in keys)
    if missing:
        raise SAEFormatError(
            f"{str(path)!r} lacks tensor(s) {missing}; it has {sorted(tensors)}, expected exactly {list(keys)}."
        )
    if extra:
        raise SAEFormatError(
            f"{str(path)!r} has extra tensor(s) {extra} besides {list(keys)}; they would change the SAE's "
            "output, and this loader only runs plain TopK SAEs."
        )


def _shape_text(shape: tuple[int, ...] | torch.Size) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _check_shape(tensor: torch.Tensor, name: str, expected: tuple[int, ...], source: str | Path) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise SAEFormatError(
            f"tensor {name!r} in {str(source)!r} has shape {_shape_text(tensor.shape)}; expected "
            f"{_shape_text(expected)}."
        )


def _orient(
    tensor: torch.Tensor, name: str, num_latents: int, d_in: int, default: str, source: str | Path
) -> torch.Tensor:
    """``tensor`` as ``[num_latents, d_in]``, transposing a ``[d_in, num_latents]`` one.

    ``default`` ("ld" or "dl") is the layout assumed when both match (``num_latents == d_in``).
    """
    shape = tuple(tensor.shape)
    ld, dl = (num_latents, d_in), (d_in, num_latents)
    if shape == ld and (shape != dl or default == "ld"):
        return tensor
    if shape == dl:
        return tensor.t().contiguous()
    raise SAEFormatError(
        f"tensor {name!r} in {str(source)!r} has shape {_shape_text(shape)}; expected {_shape_text(ld)} "
        f"or {_shape_text(dl)} (num_latents={num_latents}, d_in={d_in})."
    )


def _build(
    cfg: SAEConfig,
    state: dict[str, torch.Tensor],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    source: str,
) -> TopKSAE:
    expected = {
        "encoder.weight": (cfg.num_latents, cfg.d_in),
        "encoder.bias": (cfg.num_latents,),
        "W_dec": (cfg.num_latents, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    for name, shape in expected.items():
        _check_shape(state[name], name, shape, source)
    if dtype is None:
        dtype = state["encoder.weight"].dtype
    if not dtype.is_floating_point:
        raise InvalidOptionError(f"SAE dtype={dtype!r} must be a floating-point dtype.")
    device = torch.device("cpu") if device is None else torch.device(device)
    sae = TopKSAE(cfg, device="meta", dtype=dtype)
    sae.load_state_dict(
        {name: state[name].to(device=device, dtype=dtype).contiguous() for name in expected}, strict=True, assign=True
    )
    return sae


# ---------------------------------------------------------------------------- pickled checkpoints


def convert_pickled_state_dict(
    path: str | Path,
    out_folder: str | Path,
    k: int | None = None,
    *,
    normalize_decoder: bool = True,
    dtype: torch.dtype | None = None,
) -> TopKSAE:
    """Convert a pickled SAE state dict (``.pt`` / ``.pth``) to a sparsify safetensors folder.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``, which only
    rebuilds tensors and plain containers; anything else is refused. Keys are mapped to
    :class:`TopKSAE`'s parameters:

    ========================  ================================================
    TopKSAE                   accepted names in the checkpoint
    ========================  ================================================
    ``encoder.weight``        ``encoder.weight`` [L, d], ``W_enc`` [d, L]
    ``encoder.bias``          ``encoder.bias``, ``b_enc``, ``latent_bias``
    ``W_dec``                 ``W_dec`` [L, d], ``decoder.weight`` [d, L]
    ``b_dec``                 ``b_dec``, ``pre_bias``, ``b_pre``
    ========================  ================================================

    Weight orientation is detected from the shapes (the bracketed layout is assumed when
    ``L == d``). A ``module.`` prefix and a wrapping ``{"state_dict": ...}`` dict are undone.
    The SAE must compute ``topk(relu(W_enc (x - b_dec) + b_enc))``; checkpoints that also
    normalise their inputs (e.g. OpenAI's ``normalize=True``) need that step done by the caller.

    Args:
        path: the pickled checkpoint.
        out_folder: where to write ``cfg.json`` + ``sae.safetensors`` (see :func:`save_sae`).
        k: latents kept per row; when ``None`` it is read from the checkpoint's
            ``activation_state_dict["k"]`` (OpenAI's layout) or a top-level ``"k"``.
        normalize_decoder: recorded in the config (for further training); weights are kept as-is.
        dtype: dtype to store (default: the checkpoint's).

    Returns:
        The converted SAE, on CPU.

    Raises:
        UnsafeCheckpointError: the pickle holds objects other than tensors and plain containers.
        MissingWeightsError: ``path`` does not exist.
        SAEFormatError: the keys cannot be mapped (the message lists the keys found) or shapes
            disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"pickled SAE checkpoint {str(path)!r} not found; expected a .pt/.pth file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{str(path)!r} holds objects other than tensors and plain containers; safeguard refuses to "
            "unpickle arbitrary objects (that can run code). Re-save only the tensors, e.g. "
            "torch.save({k: v for k, v in state_dict.items()}, path), in a trusted environment."
        ) from exc
    except Exception as exc:
        raise SAEFormatError(f"could not read {str(path)!r} as a torch checkpoint: {exc}") from exc
    source = str(path)
    state = _unwrap_state(obj, source)
    if k is None:
        k = _pickled_k(state, source)
    tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
    mapped = _map_pickled(tensors, source)
    b_dec, b_enc = mapped["b_dec"][1], mapped["encoder.bias"][1]
    d_in, num_latents = b_dec.shape[-1] if b_dec.ndim else 0, b_enc.shape[-1] if b_enc.ndim else 0
    _check_shape(b_dec, mapped["b_dec"][0], (d_in,), source)
    _check_shape(b_enc, mapped["encoder.bias"][0], (num_latents,), source)
    layouts = {target: names[mapped[target][0]] for target, names in _PICKLE_NAMES.items() if names[mapped[target][0]]}
    state_out = {
        "encoder.weight": _orient(
            mapped["encoder.weight"][1],
            mapped["encoder.weight"][0],
            num_latents,
            d_in,
            layouts["encoder.weight"],
            source,
        ),
        "encoder.bias": b_enc,
        "W_dec": _orient(mapped["W_dec"][1], mapped["W_dec"][0], num_latents, d_in, layouts["W_dec"], source),
        "b_dec": b_dec,
    }
    if not isinstance(normalize_decoder, bool):
        raise InvalidOptionError(f"normalize_decoder={normalize_decoder!r} must be True or False.")
    cfg = _make_config(d_in, num_latents, k, normalize_decoder, path)
    sae = _build(cfg, state_out, "cpu", dtype, source)
    save_sae(sae, out_folder)
    return sae


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_state(obj: Any, source: str) -> dict[str, Any]:
    """The flat state dict: a ``{"state_dict": {...}}``-style wrapper and ``module.`` prefixes undone."""
    if not isinstance(obj, Mapping):
        raise SAEFormatError(f"{source!r} holds a {type(obj).__name__}, not a state dict (a mapping of tensors).")
    state = dict(obj)
    if not _is_tensor_dict(state):
        key = next((key for key in _WRAPPER_KEYS if _is_tensor_dict(state.get(key))), None)
        if key is None:
            raise SAEFormatError(f"{source!r} holds no tensors; its keys are {sorted(map(str, state))}.")
        state = {**{name: value for name, value in state.items() if name != key}, **state[key]}
    tensor_names = [str(name) for name, value in state.items() if isinstance(value, torch.Tensor)]
    while tensor_names and all(name.startswith("module.") for name in tensor_names):
        state = {
            (str(name)[len("module.") :] if isinstance(value, torch.Tensor) else name): value
            for name, value in state.items()
        }
        tensor_names = [name[len("module.") :] for name in tensor_names]
    return state


def _pickled_k(state: Mapping[str, Any], source: str) -> int:
    candidates = [state.get("k")]
    activation = state.get("activation_state_dict")
    if isinstance(activation, Mapping):
        candidates.insert(0, activation.get("k"))
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise SAEFormatError(
        f"{source!r} does not record k (no 'activation_state_dict.k' or 'k'); pass it explicitly, "
        "e.g. convert_pickled_state_dict(path, out_folder, k=32)."
    )


def _map_pickled(tensors: dict[str, torch.Tensor], source: str) -> dict[str, tuple[str, torch.Tensor]]:
    """{target: (name in file, tensor)} for the four TopKSAE tensors."""
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    problems = []
    for target, names in _PICKLE_NAMES.items():
        found = [name for name in names if name in tensors]
        if len(found) == 1:
            mapped[target] = (found[0], tensors[found[0]])
        elif not found:
            problems.append(f"no tensor for {target!r} (accepted names: {list(names)})")
        else:
            problems.append(f"several candidates for {target!r}: {found}")
    if problems:
        raise SAEFormatError(
            f"cannot map the state dict in {source!r} onto a TopK SAE: {'; '.join(problems)}. "
            f"Tensors found: {_describe(tensors)}."
        )
    used = {name for name, _ in mapped.values()}
    ignored = sorted(name for name in tensors if name not in used and name.split(".")[-1] not in _IGNORED_STATS)
    if ignored:
        warnings.warn(
            f"{source!r}: ignoring tensor(s) {ignored} that are not part of a TopK SAE's weights.", stacklevel=3
        )
    return mapped


def _describe(tensors: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {_shape_text(t.shape)}" for name, t in sorted(tensors.items())) or "none"
