"""The plugin manager: loads the ``mixgrpo`` entry-point group and keeps one registry per kind.

Built-in plugins are found through the same entry-point group as third-party ones. A plugin that
fails to import (or whose ``register_*`` hook raises) is recorded in ``failures`` and the others
still load. Every registered class is made gin-configurable under its class name, so plugins need
not import gin.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
import re
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import gin
import pluggy

from mixgrpo.core import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mixgrpo"

# kind → the hook that registers it
KINDS: dict[str, str] = {
    "backbone": "register_backbones",
    "sampler": "register_samplers",
    "schedule": "register_schedules",
    "reward": "register_rewards",
    "objective": "register_objectives",
    "prompt_set": "register_prompt_sets",
}


class UnknownComponentError(KeyError):
    """A component name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@attrs.frozen
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    origin: str

    @property
    def gin_name(self) -> str:
        return getattr(self.factory, "__name__", self.name)


@attrs.frozen
class LoadFailure:
    plugin: str
    origin: str
    error: str


_GIN_WRAPPED: dict[Any, Any] = {}


def _gin_configurable(factory: Callable[..., Any]) -> Callable[..., Any]:
    """The gin-configurable version of ``factory`` (registered once per process)."""
    if factory in _GIN_WRAPPED:
        return _GIN_WRAPPED[factory]
    if not (inspect.isclass(factory) or inspect.isfunction(factory)):
        _GIN_WRAPPED[factory] = factory
        return factory
    module = getattr(factory, "__module__", None) or "mixgrpo.plugins"
    try:
        # A plugin manager built after a parse (gin locks the config when it finalizes) still
        # registers its components.
        with gin.unlock_config():
            wrapped = gin.external_configurable(factory, name=factory.__name__, module=module)
    except ValueError:  # already configurable (the plugin decorated it itself)
        wrapped = factory
    _GIN_WRAPPED[factory] = wrapped
    return wrapped


def _distribution_of(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "?"


class PluginManager:
    """Loads plugins and resolves component names.

    Args:
        load_entry_points: load the ``mixgrpo`` entry-point group (built-ins included).
        plugins: extra plugin objects or modules to register directly (tests, notebooks).
    """

    def __init__(self, load_entry_points: bool = True, plugins: Iterable[Any] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[LoadFailure] = []
        self.registry: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._origins: dict[str, str] = {}
        if load_entry_points:
            self._load_entry_points()
        for plugin in plugins:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            self.pm.register(plugin, name=name)
            self._origins[name] = "direct"
        self._collect()

    # -- loading -------------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        seen: set[str] = set()
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(ep.name)
            origin = _distribution_of(ep)
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
                self._origins[ep.name] = origin
            except Exception as exc:  # a broken plugin must not stop the others
                self.failures.append(LoadFailure(ep.name, origin, _short_error(exc)))
                log.warning("mixgrpo plugin %r (%s) failed to load: %s", ep.name, origin, exc)

    def _collect(self) -> None:
        for kind, hook_name in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                plugin_name = impl.plugin_name
                origin = self._origins.get(plugin_name, "direct")
                try:
                    impl.function(register=self._registrar(kind, plugin_name, origin))
                except Exception as exc:
                    self.failures.append(LoadFailure(plugin_name, origin, _short_error(exc)))
                    log.warning("mixgrpo plugin %r failed in %s: %s", plugin_name, hook_name, exc)

    def _registrar(self, kind: str, plugin: str, origin: str) -> hookspecs.Register:
        def register(name: str, factory: Callable[..., Any]) -> None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{kind} names must be non-empty strings, got {name!r}")
            known = self.registry[kind].get(name)
            if known is not None and known.factory is not factory:
                raise ValueError(
                    f"{kind} {name!r} is registered twice: by plugin {known.plugin!r} ({known.origin}) "
                    f"and by {plugin!r} ({origin}); rename one of them"
                )
            self.registry[kind][name] = Entry(kind, name, _gin_configurable(factory), plugin, origin)

        return register

    def commands(self) -> dict[str, tuple[str, Callable[[Any], None], Callable[[Any], int], str]]:
        """Sub-commands plugins add: ``{name: (help, configure, run, plugin)}``."""
        found: dict[str, tuple[str, Callable[[Any], None], Callable[[Any], int], str]] = {}
        for impl in self.pm.hook.register_commands.get_hookimpls():
            def register(name: str, help: str, configure: Callable[[Any], None], run: Callable[[Any], int],
                         _plugin: str = impl.plugin_name) -> None:
                if name in found:
                    raise ValueError(f"command {name!r} is registered twice: by plugins {found[name][3]!r} and "
                                     f"{_plugin!r}; rename one of them")
                found[name] = (help, configure, run, _plugin)

            try:
                impl.function(register=register)
            except Exception as exc:
                origin = self._origins.get(impl.plugin_name, "direct")
                self.failures.append(LoadFailure(impl.plugin_name, origin, _short_error(exc)))
                log.warning("mixgrpo plugin %r failed in register_commands: %s", impl.plugin_name, exc)
        return found

    # -- lookup --------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind))

    def get(self, kind: str, name: str) -> Entry:
        entries = self._kind(kind)
        if name not in entries:
            raise UnknownComponentError(unknown_message(kind, name, sorted(entries), self.failures))
        return entries[name]

    def create(self, kind: str, name: str, **kwargs: Any) -> Any:
        """Instantiate component ``name`` of ``kind``; gin bindings on its class apply. A required
        argument that no binding supplies is a clear error naming the binding to add."""
        entry = self.get(kind, name)
        try:
            return entry.factory(**kwargs)
        except TypeError as exc:
            missing = re.search(r"No values supplied by Gin or caller for arguments: \[([^\]]*)\]", str(exc))
            if missing is None:
                raise
            params = [p.strip(" '\"") for p in missing.group(1).split(",") if p.strip()]
            example = " ".join(f"--gin \"{entry.gin_name}.{p} = ...\"" for p in params)
            raise ValueError(f"{kind} {name!r} ({entry.gin_name}) needs {', '.join(params)}, which no binding sets: "
                             f"add them to your gin file or the command line, e.g. {example}") from None

    def _kind(self, kind: str) -> dict[str, Entry]:
        if kind not in self.registry:
            raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self.registry[kind]

    # -- typed facade over the lifecycle hooks --------------------------------------------------
    def on_iteration_end(self, trainer: Any, iteration: int, metrics: dict[str, float]) -> None:
        self.pm.hook.on_iteration_end(trainer=trainer, iteration=iteration, metrics=metrics)

    def on_checkpoint(self, trainer: Any, path: Any) -> None:
        self.pm.hook.on_checkpoint(trainer=trainer, path=path)


#: The roles a sampler plays in a run (``TrainConfig.sde_sampler``, ``pre_solver``, ``post_solver``,
#: ``eval_solver``). Each is created inside the gin scope of its role's name, so ``post/DPMSolverPP.order = 1``
#: configures the post-window solver alone, while an unscoped ``DPMSolverPP.order = 2`` applies to every
#: role that uses the class (a scoped binding overrides an unscoped one).
SAMPLER_ROLES: tuple[str, ...] = ("sde", "pre", "post", "eval")


def make_sampler(pm: PluginManager, role: str, name: str, **kwargs: Any) -> Any:
    """The sampler ``name`` for ``role`` (one of ``SAMPLER_ROLES``), created in the gin scope ``role``.

    Every place that builds a sampler for a run (the trainer, ``mixgrpo sample``, evaluation of a
    checkpoint) goes through this, so a run's solver of one role is the same wherever it is built.
    """
    if role not in SAMPLER_ROLES:
        raise ValueError(f"unknown sampler role {role!r}; roles: {', '.join(SAMPLER_ROLES)}")
    with gin.config_scope(role):
        return pm.create("sampler", name, **kwargs)


def unknown_message(kind: str, name: str, known: list[str], failures: Iterable[LoadFailure] = ()) -> str:
    msg = f"unknown {kind} {name!r}; known {kind}s: {', '.join(known) or '(none)'}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        msg += f". Did you mean {close[0]!r}?"
    failed = [f.plugin for f in failures]
    if failed:
        msg += f" (plugins that failed to load: {', '.join(failed)}; run `mixgrpo plugins`)"
    return msg


def _short_error(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" [{last[0].filename}:{last[0].lineno}]" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


_DEFAULT: PluginManager | None = None


def get_plugin_manager(reload: bool = False) -> PluginManager:
    """The process-wide plugin manager (entry points loaded once)."""
    global _DEFAULT
    if _DEFAULT is None or reload:
        _DEFAULT = PluginManager()
    return _DEFAULT
