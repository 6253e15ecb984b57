"""The public API: wrap, unwrap, is_wrapped, disabled, last_report."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from .adapters import get_adapter
from .concepts.concept import Concept, resolve_concepts
from .core.config import DefenseConfig
from .core.errors import AlreadyWrappedError, IncompatibleMethodError, InvalidOptionError, NotWrappedError
from .core.guard import Guard
from .core.registry import available_methods, get_defense_class
from .core.report import CallReport

P = TypeVar("P")

_GUARDS: weakref.WeakKeyDictionary[Any, Guard] = weakref.WeakKeyDictionary()
# the first that supports the pipeline's family; safree is the fallback where guidance-side methods
# cannot act (FLUX has no batched negative branch); on ShapesWorld its detection does not fire (README)
DEFAULT_METHOD_PREFERENCE = ("sld", "negative_prompt", "repe", "safree")

MethodSpec = str | DefenseConfig | Iterable[str | DefenseConfig] | None


def _configs(method: MethodSpec, options: dict[str, Any], adapter: Any) -> tuple[DefenseConfig, ...]:
    if method is None:
        for name in DEFAULT_METHOD_PREFERENCE:
            if name in available_methods() and adapter.family in get_defense_class(name).families:
                method = name
                break
        else:
            raise IncompatibleMethodError(
                f"no default method works on {adapter.pipeline_name}; pass method= one of {available_methods()} "
                "that supports it."
            )
    items = [method] if isinstance(method, (str, DefenseConfig)) else list(method)
    if not items:
        raise InvalidOptionError(f"method={method!r} is empty; pass a method name, e.g. method='sld'.")
    if options and not (len(items) == 1 and isinstance(items[0], str)):
        raise InvalidOptionError(
            f"options {sorted(options)} given with method={method!r}: options go with one method name only; "
            "for several methods pass config objects, e.g. method=[SLDConfig(preset='strong'), NegativePromptConfig()]."
        )
    out: list[DefenseConfig] = []
    for item in items:
        if isinstance(item, DefenseConfig):
            get_defense_class(item.defense)
            out.append(item)
        elif isinstance(item, str):
            out.append(get_defense_class(item).config_class.from_options(**options))
        else:
            raise InvalidOptionError(
                f"method entry {item!r} is neither a method name nor a config; use e.g. 'sld' or SLDConfig()."
            )
    names = [c.defense for c in out]
    if len(set(names)) != len(names):
        raise InvalidOptionError(f"method list {names} names a defense twice; give each defense once.")
    return tuple(out)


def wrap(
    pipe: P,
    concepts: str | Concept | Iterable[str | Concept] | None = None,
    method: MethodSpec = None,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    **method_options: Any,
) -> P:
    """Guard ``pipe`` against ``concepts`` with one or more training-free defenses.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
            ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (or a subclass); or a transformers
            causal LM (``AutoModelForCausalLM``) or ``pipeline("text-generation")``.
        concepts: built-in set names (``"nudity"``, ``"violence"``, ``"red"``...), free text
            (``"a red star"``), or :class:`safeguard.Concept` objects.
        method: a method name (see ``safeguard.available_methods()``), a config object, or a list
            of them (applied in the fixed composition order). ``None`` picks the first of ``sld``,
            ``negative_prompt``, ``repe``, ``safree`` that supports this pipeline (``safree`` on FLUX).
        tokenizer: the tokenizer of a causal LM (language models only; a text-generation
            pipeline brings its own).
        overwrite: replace an existing guard with a different config instead of raising.
        **method_options: options of the single named method, e.g. ``preset="strong"`` for ``sld``.

    Returns:
        The same ``pipe`` object, now guarded. Calling it is unchanged; see
        :func:`last_report` for what the guard did.

    Raises:
        UnsupportedPipelineError, InvalidConceptError, UnknownMethodError, InvalidOptionError,
        IncompatibleMethodError, AlreadyWrappedError. On any error the pipeline is left exactly as
        it was.

    Example:
        >>> import safeguard
        >>> pipe = safeguard.wrap(pipe, concepts=["nudity"], method="sld", preset="strong")  # doctest: +SKIP
        >>> model = safeguard.wrap(model, tokenizer=tok, concepts=["harmful"])  # doctest: +SKIP
        >>> image = pipe("a photo of a beach").images[0]  # doctest: +SKIP
        >>> print(safeguard.last_report(pipe).summary())  # doctest: +SKIP
    """
    adapter = get_adapter(pipe, tokenizer=tokenizer)
    inner = getattr(adapter, "model", None)
    if inner is not None:  # a language model and a text-generation pipeline around it: guard one of the two
        for other, g in list(_GUARDS.items()):
            if other is not pipe and getattr(g.adapter, "model", None) is inner:
                raise AlreadyWrappedError(
                    f"this model is already guarded through {type(other).__name__}; unwrap that first, "
                    "or wrap only one of the model and its pipeline."
                )
    resolved = resolve_concepts(concepts)
    guard = Guard(adapter, resolved, _configs(method, method_options, adapter))
    guard.check()
    old = _GUARDS.get(pipe)
    if old is not None:
        if old.key == guard.key:
            return pipe
        if not overwrite:
            raise AlreadyWrappedError(
                f"{type(pipe).__name__} is already guarded with {[c.to_dict() for c in old.configs]} for concepts "
                f"{[c.name for c in old.concepts]}; pass overwrite=True to replace that guard, or call "
                "safeguard.unwrap(pipe) first."
            )
        old.detach()
        del _GUARDS[pipe]
    try:
        guard.attach()
    except BaseException:
        if old is not None:  # put the previous guard back: a failed wrap changes nothing
            restored = Guard(old.adapter, old.concepts, old.configs).attach()
            _GUARDS[pipe] = restored
        raise
    _GUARDS[pipe] = guard
    return pipe


def unwrap(pipe: P) -> P:
    """Remove the guard: every hook is gone and outputs are bit-identical to the unguarded pipeline.

    Idempotent: unwrapping an unguarded pipeline returns it unchanged.
    """
    guard = _GUARDS.pop(pipe, None)
    if guard is not None:
        guard.detach()
    return pipe


def is_wrapped(pipe: Any) -> bool:
    """Whether ``pipe`` is guarded by :func:`wrap`."""
    try:
        return pipe in _GUARDS
    except TypeError:  # unhashable objects can never be wrapped
        return False


def get_guard(pipe: Any) -> Guard:
    guard = _GUARDS.get(pipe)
    if guard is None:
        raise NotWrappedError(f"{type(pipe).__name__} is not guarded; call safeguard.wrap(pipe, concepts=[...]) first.")
    return guard


@contextlib.contextmanager
def disabled(pipe: Any) -> Iterator[Any]:
    """Run ``pipe`` unguarded inside the block (for A/B comparisons); the guard is back after it.

    Example:
        >>> with safeguard.disabled(pipe):  # doctest: +SKIP
        ...     reference = pipe("a red star", generator=torch.Generator().manual_seed(0)).images[0]
    """
    monitor = get_guard(pipe).monitor
    previous = monitor.enabled
    monitor.enabled = False
    try:
        yield pipe
    finally:
        monitor.enabled = previous


def last_report(pipe: Any) -> CallReport | None:
    """What the guard did on the most recent call of ``pipe`` (``None`` before the first call)."""
    return get_guard(pipe).report()
