"""Per-kind component registries, filled from entry points on first lookup.

A component is registered under a *name* (what users type in recipes) in the entry-point
group of its kind. noisevalue registers its own built-ins through its ``pyproject.toml``
exactly as a third-party package does::

    [project.entry-points."noisevalue.raters"]
    my_rater = "my_package.raters:MyRater"

Set ``NOISEVALUE_DISABLE_PLUGIN_AUTOLOAD=1`` to ignore every distribution but noisevalue.

Discovery reads entry-point metadata only; a component's module is imported when the
component is first used. A name provided by more than one distribution is a *clash*: every
provider is kept, the name is listed with all of them, and using it raises a PluginError
that names them (no distribution silently wins).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

from noisevalue.errors import ConfigError, PluginError, UserError

KINDS: dict[str, str] = {
    "backbone": "noisevalue.backbones",
    "rater": "noisevalue.raters",
    "selector": "noisevalue.selectors",
    "loss_weighting": "noisevalue.loss_weightings",
    "timestep_sampler": "noisevalue.timestep_samplers",
    "meta_optimizer": "noisevalue.meta_optimizers",
    "evaluator": "noisevalue.evaluators",
    "dataset": "noisevalue.datasets",
    "encoder": "noisevalue.encoders",
}
AUTOLOAD_ENV = "NOISEVALUE_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DISTRIBUTION = "noisevalue"


@dataclass
class Entry:
    """One registered component: where it came from and, once loaded, the factory."""

    kind: str
    name: str
    distribution: str
    target: str  # "module:attr"
    entry_point: EntryPoint | None = None
    factory: Callable[..., Any] | None = None
    error: str | None = None
    clashes: list[Entry] = field(default_factory=list)  # other distributions providing this name

    @property
    def providers(self) -> list[Entry]:
        """Every entry registered under this name: this one first, then the clashing ones."""
        return [self, *self.clashes]

    def clash_message(self) -> str:
        """One line naming the kind, the name, every providing distribution and the way out."""
        listed = ", ".join(f"'{e.distribution}' ({e.target})" for e in self.providers)
        return (
            f"{self.kind} '{self.name}' is provided by more than one distribution: {listed}; "
            f"uninstall all but one of them, or set {AUTOLOAD_ENV}=1 to use noisevalue's built-ins only"
        )

    def load(self) -> Callable[..., Any]:
        if self.factory is None:
            if self.error is not None:
                raise PluginError(self._failure())
            assert self.entry_point is not None
            try:
                self.factory = self.entry_point.load()
            except Exception as exc:  # a broken plugin must not break the others
                self.error = f"{type(exc).__name__}: {exc}"
                raise PluginError(self._failure()) from exc
        return self.factory

    def _failure(self) -> str:
        return (
            f"{self.kind} '{self.name}' from distribution '{self.distribution}' "
            f"({self.target}) failed to load: {self.error}"
        )


_registries: dict[str, dict[str, Entry]] | None = None


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise PluginError(f"unknown component kind '{kind}'; known kinds: {', '.join(KINDS)}")
    return kind


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _discover() -> dict[str, dict[str, Entry]]:
    global _registries
    if _registries is not None:
        return _registries
    builtin_only = _autoload_disabled()
    found: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
    for kind, group in KINDS.items():
        for ep in entry_points(group=group):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            if builtin_only and dist != BUILTIN_DISTRIBUTION:
                continue
            entry = Entry(kind, ep.name, dist, ep.value, entry_point=ep)
            first = found[kind].get(ep.name)
            if first is None:
                found[kind][ep.name] = entry
            elif not any(e.distribution == dist and e.target == ep.value for e in first.providers):
                # A clash: keep every provider; using the name then asks the user to choose.
                if dist == BUILTIN_DISTRIBUTION:
                    # The built-in is listed first, whatever the order on sys.path.
                    entry.clashes = [first, *first.clashes]
                    first.clashes = []
                    found[kind][ep.name] = entry
                else:
                    first.clashes.append(entry)
    _registries = found
    return found


def reset() -> None:
    """Forget discovered entry points (tests, or after installing a plugin in-process)."""
    global _registries
    _registries = None


def register(kind: str, name: str, *, distribution: str = "<runtime>") -> Callable[[Any], Any]:
    """Decorator registering a factory in-process (notebooks, tests). It replaces whatever
    was registered under ``name``, a clash included: the caller chose explicitly."""
    _check_kind(kind)

    def decorator(factory: Any) -> Any:
        target = f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', '?')}"
        _discover()[kind][name] = Entry(kind, name, distribution, target, factory=factory)
        return factory

    return decorator


def names(kind: str) -> list[str]:
    """The registered names of one kind, sorted."""
    return sorted(_discover()[_check_kind(kind)])


def entries(kind: str | None = None) -> list[Entry]:
    """Registry entries (not loaded), for listing plugins and their distributions. A clashing
    name is one entry; its ``clashes`` hold the other providers."""
    kinds = [_check_kind(kind)] if kind else list(KINDS)
    reg = _discover()
    return [reg[k][n] for k in kinds for n in sorted(reg[k])]


def get(kind: str, name: str) -> Callable[..., Any]:
    """The factory registered under ``name``; unknown names list the known ones, and a name
    provided by more than one distribution names them all."""
    reg = _discover()[_check_kind(kind)]
    if name not in reg:
        known = ", ".join(sorted(reg)) or "(none)"
        raise PluginError(f"unknown {kind} '{name}'; known {kind} names: {known}")
    entry = reg[name]
    if entry.clashes:
        raise PluginError(entry.clash_message())
    return entry.load()


def check_params(kind: str, name: str, params: dict[str, Any], where: str = "") -> None:
    """Raise a ConfigError if ``params`` has a keyword the factory does not accept."""
    factory = get(kind, name)
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    for key in params:
        if key not in accepted:
            prefix = f"{where}: " if where else ""
            raise ConfigError(
                f"{prefix}unknown parameter '{key}' for {kind} '{name}'; "
                f"accepted: {', '.join(accepted) or '(none)'}"
            )


class Spec(Protocol):
    """What names a component: a registered ``name`` and its ``params`` (a recipe's
    ``Component``, or anything shaped like it)."""

    @property
    def name(self) -> str: ...

    @property
    def params(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Named:
    """A :class:`Spec` built in code."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


#: keywords filled from the data when a factory accepts them: the latent side, the latent
#: channels and the class count (0: unconditional)
SHAPE_KEYWORDS = ("input_size", "in_channels", "num_classes")


def resolve(kind: str, spec: Spec, where: str) -> Callable[..., Any]:
    """The factory of ``spec`` after checking its name and parameter names; errors are one
    line starting with the recipe path ``where`` (``where.name: ...``, ``where.params: ...``)."""
    try:
        factory = get(kind, spec.name)
    except UserError as exc:
        raise type(exc)(f"{_at(where, '.name')}{exc}") from None
    check_params(kind, spec.name, spec.params, where=f"{where}.params" if where else "")
    return factory


def _at(where: str, suffix: str) -> str:
    """The ``path: `` prefix of an error message (nothing when built outside a recipe)."""
    return f"{where}{suffix}: " if where else ""


def accepted(kind: str, name: str) -> set[str]:
    """The keyword names the factory of ``name`` takes (empty if it cannot be inspected)."""
    try:
        return set(inspect.signature(get(kind, name)).parameters)
    except (TypeError, ValueError):
        return set()


def with_shapes(
    kind: str, spec: Spec, where: str, latent_shape: tuple[int, int, int], num_classes: int
) -> dict[str, Any]:
    """``spec.params`` with the shape keywords the factory accepts filled from the data; a
    value written in the recipe must agree with it."""
    params = dict(spec.params)
    c, h, _ = latent_shape
    takes = accepted(kind, spec.name)
    for key, value in zip(SHAPE_KEYWORDS, (h, c, num_classes), strict=True):
        if key in params and params[key] != value:
            raise ConfigError(f"{_at(where, f'.params.{key}')}{params[key]} does not match the data, which gives {value}")
        if key in takes:
            params[key] = value
    return params


def build(kind: str, spec: Spec, *, where: str, **context: Any) -> Any:
    """The one way to build a component.

    Looks ``spec.name`` up, checks its parameter names, adds ``context`` (objects a workflow
    passes in code, such as an in-memory rater) and calls the factory. Shape keywords are
    filled beforehand with :func:`with_shapes`, whose result the caller also records in its
    checkpoint. A constructor's ``ValueError`` or ``TypeError`` (a bad value) becomes one
    ``ConfigError`` line starting with ``where`` (no prefix when ``where`` is empty); other
    errors are bugs and keep their traceback.
    """
    factory = resolve(kind, spec, where)
    try:
        return factory(**spec.params, **context)
    except UserError as exc:
        if not where or str(exc).startswith(where):
            raise
        if str(exc).startswith("params.") and not where.startswith("-"):  # a parameter: its full recipe key
            raise type(exc)(f"{where}.{exc} ({spec.name})") from None
        raise type(exc)(f"{where} ({spec.name}): {exc}") from None
    except (ValueError, TypeError) as exc:
        if not where:  # built in code: the caller's exception, unchanged
            raise
        raise ConfigError(f"{where} ({spec.name}): {exc}") from None


def build_on_meta(kind: str, spec: Spec, *, where: str) -> Any:
    """``build`` on PyTorch's meta device, to check a network's values without allocating
    its weights. A bad value is the usual one-line error; a network that cannot be built on
    the meta device at all gives None, and is checked when it is built for real."""
    import torch

    try:
        with torch.device("meta"):
            return build(kind, spec, where=where)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - not meta-device friendly: the run builds it for real
        return None


def create(kind: str, name: str, **params: Any) -> Any:
    """``build`` for code and notebooks: the component ``name`` of ``kind`` with ``params``."""
    return build(kind, Named(name, params), where="")
