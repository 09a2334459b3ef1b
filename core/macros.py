"""Required macros: a recipe's ``%gin.REQUIRED`` (or ``'unset:NAME'``) settings, and which of them
a run must bind. Only the macros the run's selected components use are required (``MacroUsage``),
so overriding a recipe's rewards does not demand the paths of the rewards no longer used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import gin

from mixgrpo.core.plugins import SAMPLER_ROLES, PluginManager

UNSET_PREFIX = "unset:"  # a macro default that must be bound (gin.REQUIRED, where a string is needed)
_MACRO = "gin.macro"  # the selector of a macro's entry in gin's config: ``(name, "gin.macro")``


def _owner(selector: str) -> str:
    """The configurable's name of a gin selector (``mixgrpo.plugins.backbones.flux.FluxBackbone``)."""
    return selector.rsplit(".", 1)[-1]


def _macro_value(name: str) -> Any:
    return gin.config._CONFIG.get((name, _MACRO), {}).get("value")


def _is_required(value: Any) -> bool:
    return repr(value) == "%gin.REQUIRED"


def _is_unbound(value: Any) -> bool:
    return _is_required(value) or (isinstance(value, str) and value.startswith(UNSET_PREFIX))


def _references(value: Any) -> tuple[set[str], set[str]]:
    """``(macros, configurables)`` a binding's value refers to (``%NAME``, ``@Class`` / ``@Class()``)."""
    macros, owners = set(), set()
    for item in gin.config._iterate_flattened_values(value):
        if isinstance(item, gin.config.ConfigurableReference):
            if item.selector == _MACRO:
                macros.add(item.scoped_selector.rsplit("/", 1)[0])
            elif item.configurable.wrapped is not gin.config._retrieve_constant:  # not %gin.REQUIRED
                owners.add(_owner(item.selector))
    return macros, owners


class _Unknown:
    """A value that cannot be known before the run starts (an unbound macro, a ``@Class()`` call)."""


def _resolve(value: Any, seen: frozenset[str] = frozenset()) -> Any:
    """A parsed binding's value with its macros substituted (``_Unknown`` where that cannot be done
    without calling anything)."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.selector != _MACRO:
            return _Unknown()
        name = value.scoped_selector.rsplit("/", 1)[0]
        if name in seen or (name, _MACRO) not in gin.config._CONFIG:
            return _Unknown()
        resolved = _resolve(_macro_value(name), seen | {name})
        return _Unknown() if _is_unbound(resolved) else resolved
    if isinstance(value, dict):
        return {_resolve(k, seen): _resolve(v, seen) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, seen) for v in value)
    return value


def _known(value: Any) -> bool:
    if isinstance(value, _Unknown):
        return False
    if isinstance(value, dict):
        return all(_known(k) and _known(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_known(v) for v in value)
    return not _is_unbound(value)


_SELECTING = ("backbone", "sde_sampler", "pre_solver", "post_solver", "eval_solver", "schedule", "objective",
              "prompt_set", "rewards", "eval_rewards")  # the TrainConfig fields that ``components()`` reads


@attrs.define
class MacroUsage:
    """Which bindings and macros of the parsed gin config a training run uses.

    A binding is used when it belongs to ``TrainConfig``, to a component the config selects
    (``TrainConfig.components()``: a scoped sampler binding only when its role uses that sampler) or
    to a configurable that is not a registered component (we cannot tell whether it is called); a
    registered component the config does not select never is. A macro is used when a used binding
    refers to it, directly or through other macros. ``selected`` is None when the selection itself
    cannot be read from the parsed bindings (a component name bound to an unbound macro): then
    everything counts as used.
    """

    components: set[str]  # gin names of every registered component
    selected: set[str] | None  # gin names of the components the config selects
    roles: dict[str, str]  # sampler role -> gin name of the role's sampler
    macros: set[str] = attrs.field(factory=set)  # the macros used bindings reach

    @classmethod
    def of_parsed_config(cls, pm: PluginManager, config_class: Any) -> MacroUsage:
        """The usage of gin's parsed config by the ``TrainConfig`` (``config_class``) it would build."""
        components = {entry.gin_name for kind in pm.registry.values() for entry in kind.values()}
        fields = {f.name: f.default for f in attrs.fields(config_class)}
        fields = {name: d.factory() if isinstance(d, attrs.Factory) else d for name, d in fields.items()}
        for (scope, selector), params in gin.config._CONFIG.items():
            if not scope and selector != _MACRO and _owner(selector) == "TrainConfig":
                fields.update({k: _resolve(v) for k, v in params.items() if k in _SELECTING})
        usage = cls(components, None, {})
        if all(_known(fields[name]) for name in _SELECTING):
            view = _Fields(fields)
            names = set()
            for kind, name in config_class.components(view):  # type: ignore[arg-type]
                entry = pm.registry.get(kind, {}).get(name)
                if entry is not None:  # an unknown name fails in validate(), naming the known ones
                    names.add(entry.gin_name)
            usage.selected = names
            for role, name in config_class.samplers(view).items():  # type: ignore[arg-type]
                entry = pm.registry["sampler"].get(name)
                if entry is not None:
                    usage.roles[role] = entry.gin_name
        usage._follow()
        return usage

    def binding_used(self, scope: str, owner: str) -> bool:
        if self.selected is None or owner not in self.components:
            return True
        if scope in SAMPLER_ROLES and scope in self.roles:
            return self.roles[scope] == owner
        return owner in self.selected

    def uses(self, key: tuple[str, str]) -> bool:
        """Whether the entry ``(scope or macro name, selector)`` of gin's config is used."""
        scope, selector = key
        if selector == _MACRO:
            return scope in self.macros
        return self.binding_used(scope, _owner(selector))

    def _follow(self) -> None:
        """Collect the macros that used bindings reach, through other macros too; a ``@Class``
        reference in a used binding or macro makes ``Class`` used."""
        while True:  # ends: ``selected`` only grows, within the configurables' names
            pending: list[str] = []
            owners: set[str] = set()
            for (scope, selector), params in gin.config._CONFIG.items():
                if selector != _MACRO and self.binding_used(scope, _owner(selector)):
                    for value in params.values():
                        macros, refs = _references(value)
                        pending += macros
                        owners |= refs
            while pending:
                name = pending.pop()
                if name not in self.macros:
                    self.macros.add(name)
                    macros, refs = _references(_macro_value(name))
                    pending += macros
                    owners |= refs
            if self.selected is None or owners <= self.selected:
                return
            self.selected |= owners


class _Fields:
    """The selecting fields of a TrainConfig read from gin's bindings, for ``TrainConfig.components``."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)


def unbound_macros(usage: MacroUsage | None = None) -> list[str]:
    """Macros of the parsed config still set to ``%gin.REQUIRED`` or to an ``'unset:NAME'`` default;
    with ``usage``, only those a binding of the run reaches."""
    names = []
    for (name, selector), params in gin.config._CONFIG.items():
        if selector == _MACRO and _is_unbound(params.get("value")) and (usage is None or name in usage.macros):
            names.append(name)
    return sorted(names)


def check_macros_bound(config_file: str | Path, usage: MacroUsage | None = None) -> None:
    """All required macros bound, or one error naming every missing one (before any model loads);
    with ``usage``, only the macros the run's components use are required."""
    missing = unbound_macros(usage)
    if missing:
        example = " ".join(f'--gin "{name} = \'...\'"' for name in missing)
        from mixgrpo.core.config import ConfigError

        raise ConfigError(f"{config_file}: {len(missing)} required setting(s) not bound: {', '.join(missing)}. "
                          f"Bind each on the command line, e.g. {example} (paths are local: nothing is "
                          f"downloaded), or in a gin file that includes this one")


def _finalize(usage: MacroUsage | None) -> None:
    """``gin.finalize()``; with ``usage``, gin's check for ``%gin.REQUIRED`` values sees only the
    bindings and macros the run uses (a model path of a component the run does not select may stay
    unbound)."""
    hooks = gin.config._FINALIZE_HOOKS
    check = gin.config.find_missing_overrides_hook
    if usage is None or check not in hooks:
        gin.finalize()
        return
    index = hooks.index(check)
    hooks[index] = lambda config: check({key: params for key, params in config.items() if usage.uses(key)})
    try:
        gin.finalize()
    finally:
        hooks[index] = check
