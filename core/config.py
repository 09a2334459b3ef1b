"""Experiment configuration: the gin-configurable ``TrainConfig`` and loading gin files.

Plugins load before gin parses, so every registered class is configurable by its class name
(``FlowSDE.noise_level = 0.9``) and components are selected by their registered names
(``TrainConfig.sde_sampler = 'sde.flow'``). Unknown names and misspelled bindings fail with the
list of valid choices.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import tokenize
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import gin

from mixgrpo.core.gin_files import _harden_gin_readers, _quiet_search_misses, _search_paths
from mixgrpo.core.macros import (
    UNSET_PREFIX,
    MacroUsage,
    _finalize,
    _is_required,
    _macro_value,
    check_macros_bound,
    unbound_macros,
)
from mixgrpo.core.parallel import PARALLELISMS
from mixgrpo.core.plugins import (
    SAMPLER_ROLES,
    PluginManager,
    UnknownComponentError,
    get_plugin_manager,
    unknown_message,
)
from mixgrpo.core.sigmas import GRID_KINDS

log = logging.getLogger(__name__)


@gin.configurable
@attrs.define
class TrainConfig:
    """Everything a run needs besides the components' own settings (bound on their classes).

    Components (registered names; see ``mixgrpo plugins``):
        backbone (required: no model is a sensible default), sde_sampler, pre_solver (ODE before the
        window), post_solver (ODE after it, e.g. ``dpmsolver++`` for Flash), eval_solver (the ODE
        solver of held-out evaluation and sample grids: the same for every method, so that base
        models compare equal), schedule, objective,
        prompt_set; rewards: {name: weight} trained on; eval_rewards: names scored on held-out
        prompts but never trained on. The four samplers are built in the gin scopes of their roles,
        ``sde``, ``pre``, ``post`` and ``eval``: ``post/DPMSolverPP.order = 1`` configures the
        post-window solver alone, an unscoped ``DPMSolverPP.order = 1`` every role that uses it.
        method: the method's name as the papers write it (``MixGRPO-Flash``), for model cards and
        reports; each preset in experiments/methods/ sets it; empty: the objective's name.
    Sampling:
        num_steps (T), shift (s), grid (``static``|``dynamic``|``diffusers``), mu (the dynamic grid's
        shift: FLUX's ``flux_mu`` of the image tokens, 0.80 at 720×720), shift_terminal (None, or
        the last nonzero σ the grid is stretched to, as Qwen-Image's scheduler does: 0.02), compression (Flash ratio r
        for the post-window grid, or None), shared_noise (same x_T within a group), share_prefix
        (with shared noise, the model calls a group's samples share, the ODE steps before the first
        SDE step and that step's, run once per group in the rollout and in training; the same
        values up to float rounding, fewer calls: docs/algorithms.md §4).
    Batch:
        prompts_per_iteration (groups per iteration, all processes together), group_size (G),
        rollout_batch_size (samples per model call in rollouts, and per rollout chunk: a chunk
        walks the whole grid and is decoded before the next starts), micro_batch_size (samples per
        backward pass), num_minibatches (optimizer steps per iteration).
    Rewards:
        overlap_rewards: score each rollout chunk's images in a background thread while the next
        chunk rolls out (the same reward calls on the same images as without: the scores are
        identical). It pays when scoring waits on something other than this process's cores: a
        reward model on another GPU, or a remote reward server (docs/rewards.md).
    Optimisation:
        learning_rate, weight_decay, adam_betas, max_grad_norm, iterations; ema_decay (None: no
        moving average; else the EMA of the trainable weights that evaluation and sample grids
        use, FlowGRPO's 0.9) and ema_interval (optimizer steps between EMA updates, FlowGRPO's 8).
    Scale:
        parallelism: ``"auto"`` (FSDP when accelerate was launched with an FSDP config, else DDP),
        ``"ddp"`` or ``"fsdp"`` (full fine-tuning only; see ``mixgrpo.core.parallel``).
    Bookkeeping:
        seed (of everything random in a run: prompts, noise, schedules, minibatches), output_dir,
        eval_every / eval_prompts / eval_seeds / eval_num_steps (held-out evaluation with the ODE,
        on a grid of eval_num_steps steps; None: the training grid's T),
        sample_every / sample_prompts (image grids at fixed prompts and seeds; both also at iteration
        0 and at the last iteration), checkpoint_every, keep_last (keep only the newest n checkpoints;
        0 keeps all, the latest is never deleted), max_failed_iterations (stop after this many
        consecutive iterations in which a trained reward scored no sample),
        ratio_tolerance (warn when the on-policy ratio deviates from 1 by more; None: a tenth of the
        objective's clip range), progress (bars).
    Reward hacking (``mixgrpo.core.hacking``, docs/rewards.md): every held-out evaluation also reports
        the within-prompt diversity of its images (``eval/diversity/{mean,sem}``) and the velocity
        drift from the base model (``eval/kl_base/mean``). eval_diversity: the image embedding the
        diversity is measured in, ``'pixels'`` (8×8 downsampled pixels, no model), ``'clip'`` (the
        image embedding of the local CLIP folder eval_clip_path) or ``'none'``; kl_base_copy: keep a
        frozen copy of a full fine-tune's base weights for ``eval/kl_base`` when the objective keeps
        none (LoRA and a KL term have one already; costs one copy of the network); stop_on_hacking:
        stop the run, with a checkpoint, at an evaluation where a trained reward rose while a
        held-out reward or the diversity fell by more than its standard error.
    Trackers (``mixgrpo.core.trackers``, docs/run-directory.md):
        trackers (any of ``'tensorboard'``, ``'wandb'``, ``'trackio'``, e.g. ``['tensorboard',
        'wandb']``; each an extra, ``pip install 'mixgrpo[wandb]'``; None: TensorBoard when it is
        installed; ``[]``: none), tracker_project (the wandb and trackio project), tensorboard
        (deprecated: True adds TensorBoard to the trackers, False removes it).
    """

    backbone: str = ""  # required: every experiment names its model (an include of experiments/backbones/)
    sde_sampler: str = "sde.flow"
    pre_solver: str = "euler"
    post_solver: str = "euler"
    eval_solver: str = "euler"
    schedule: str = "progressive"
    objective: str = "mixgrpo"
    method: str = ""
    prompt_set: str = "shapes"
    rewards: dict[str, float] = attrs.field(factory=lambda: {"shapes.composition": 1.0})
    eval_rewards: tuple[str, ...] = ()

    num_steps: int = 25
    shift: float = 3.0
    grid: str = "static"
    mu: float | None = None
    shift_terminal: float | None = None
    compression: float | None = None
    shared_noise: bool = True
    share_prefix: bool = True

    prompts_per_iteration: int = 4
    group_size: int = 12
    rollout_batch_size: int = 16
    micro_batch_size: int = 4
    num_minibatches: int = 1
    overlap_rewards: bool = False

    learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    iterations: int = 300
    ema_decay: float | None = None
    ema_interval: int = 1
    parallelism: str = "auto"

    seed: int = 0
    output_dir: str = "runs/default"
    eval_every: int = 0
    eval_prompts: int = 16
    eval_seeds: int = 2
    eval_num_steps: int | None = None
    eval_diversity: str = "pixels"
    eval_clip_path: str = ""
    kl_base_copy: bool = False
    stop_on_hacking: bool = False
    sample_every: int = 0
    sample_prompts: int = 8
    checkpoint_every: int = 0
    keep_last: int = 0
    max_failed_iterations: int = 3
    ratio_tolerance: float | None = None
    progress: bool = True
    trackers: tuple[str, ...] | None = None
    tracker_project: str = "mixgrpo"
    tensorboard: bool | None = None  # deprecated: TrainConfig.trackers

    def samplers(self) -> dict[str, str]:
        """``{role: sampler name}`` for the roles of ``SAMPLER_ROLES`` (each built in its gin scope)."""
        return {"sde": self.sde_sampler, "pre": self.pre_solver, "post": self.post_solver, "eval": self.eval_solver}

    def components(self) -> list[tuple[str, str]]:
        """``(kind, name)`` of every component this config selects."""
        pairs = [
            ("backbone", self.backbone),
            ("sampler", self.sde_sampler),
            ("sampler", self.pre_solver),
            ("sampler", self.post_solver),
            ("sampler", self.eval_solver),
            ("schedule", self.schedule),
            ("objective", self.objective),
            ("prompt_set", self.prompt_set),
        ]
        pairs += [("reward", name) for name in self.rewards]
        pairs += [("reward", name) for name in self.eval_rewards]
        return pairs

    def validate(self, pm: PluginManager) -> None:
        if not self.backbone:
            raise ConfigError(f"TrainConfig.backbone is not set: name the model to train, one of "
                              f"{', '.join(sorted(pm.registry['backbone']))} (`mixgrpo plugins` lists them), e.g. "
                              f"include 'backbones/flux.gin' in the experiment file or --gin \"TrainConfig.backbone "
                              f"= 'flux'\"")
        for kind, name in self.components():
            pm.get(kind, name)  # raises UnknownComponentError listing the known names
        positive = ("num_steps", "group_size", "prompts_per_iteration", "rollout_batch_size",
                    "micro_batch_size", "num_minibatches", "iterations", "max_failed_iterations", "ema_interval")
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"TrainConfig.{field} must be >= 1, got {getattr(self, field)}")
        if not self.rewards:
            raise ValueError("TrainConfig.rewards is empty: name at least one reward to train on")
        self._validate_optimisation()
        if self.group_size < 2:
            raise ValueError(f"TrainConfig.group_size = {self.group_size}: a group needs at least 2 samples, or every "
                             "advantage is 0 and nothing is learned (the papers use 12 to 24)")
        if self.grid not in GRID_KINDS:
            raise ValueError(f"TrainConfig.grid = {self.grid!r}: one of {', '.join(GRID_KINDS)}")
        if self.grid == "dynamic" and self.mu is None:
            raise ValueError("TrainConfig.grid = 'dynamic' needs TrainConfig.mu, FLUX's resolution-dependent shift: "
                             "mixgrpo.core.sigmas.flux_mu(image tokens), e.g. 0.80 at 720x720 (2025 tokens) and "
                             "1.15 at 1024x1024 (4096); or train on the static grid (grid = 'static', shift = 3) "
                             "as the three reference implementations do")
        if self.compression is not None and not 0 < self.compression <= 1:
            raise ValueError(f"TrainConfig.compression = {self.compression}: the Flash ratio of post-window steps "
                             "must be in (0, 1] (MixGRPO-Flash: 0.4, Flash*: 0.2), or None for no compression")
        if self.num_minibatches > self.prompts_per_iteration * self.group_size:
            raise ValueError("TrainConfig.num_minibatches exceeds the number of samples per iteration")
        if self.keep_last < 0:
            raise ValueError(f"TrainConfig.keep_last must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")
        if self.eval_num_steps is not None and self.eval_num_steps < 1:
            raise ValueError(f"TrainConfig.eval_num_steps must be >= 1 or None, got {self.eval_num_steps}")
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"TrainConfig.parallelism must be one of {', '.join(PARALLELISMS)}, "
                             f"got {self.parallelism!r}")

    def _validate_optimisation(self) -> None:
        """The optimizer's, the EMA's and the bookkeeping numbers, each refused with its binding and the
        fix (before any model loads; torch would name neither)."""
        def refuse(field: str, need: str, fix: str) -> None:
            raise ValueError(f"TrainConfig.{field} = {getattr(self, field)!r}: {need}; {fix}")

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not (number(self.learning_rate) and self.learning_rate > 0):
            refuse("learning_rate", "the learning rate must be > 0",
                   'e.g. --gin "TrainConfig.learning_rate = 1e-5" (the papers\' full fine-tuning rate)')
        if not (number(self.weight_decay) and self.weight_decay >= 0):
            refuse("weight_decay", "AdamW's weight decay must be >= 0",
                   'e.g. --gin "TrainConfig.weight_decay = 1e-4" (MixGRPO\'s), or 0 for none')
        if not (number(self.max_grad_norm) and self.max_grad_norm > 0):
            refuse("max_grad_norm", "gradients are clipped to this norm, which must be > 0",
                   'e.g. --gin "TrainConfig.max_grad_norm = 1.0" (the papers\'), or a large number to '
                   'clip nothing')
        betas = self.adam_betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(number(b) and 0 <= b < 1 for b in betas)):
            refuse("adam_betas", "AdamW takes two betas, each in [0, 1)",
                   'e.g. --gin "TrainConfig.adam_betas = (0.9, 0.999)" (AdamW\'s default)')
        if self.ema_decay is not None and not (number(self.ema_decay) and 0 <= self.ema_decay < 1):
            refuse("ema_decay", "the moving average's decay must be in [0, 1), or None for no moving average",
                   'e.g. --gin "TrainConfig.ema_decay = 0.9" (FlowGRPO\'s) or --gin "TrainConfig.ema_decay = None"')
        for field, what in (("eval_every", "held-out evaluations"), ("sample_every", "sample grids"),
                            ("checkpoint_every", "checkpoints")):
            if not (number(getattr(self, field)) and getattr(self, field) >= 0):
                refuse(field, f"iterations between {what} must be >= 0 (0: none)",
                       f'e.g. --gin "TrainConfig.{field} = 25", or 0 to turn them off')
        for field, what in (("eval_prompts", "held-out prompts per evaluation"),
                            ("eval_seeds", "sampling seeds per held-out prompt"),
                            ("sample_prompts", "prompts per sample grid")):
            if not (number(getattr(self, field)) and getattr(self, field) >= 1):
                refuse(field, f"the number of {what} must be >= 1",
                       f'e.g. --gin "TrainConfig.{field} = {attrs.fields_dict(TrainConfig)[field].default}" '
                       f"(the default); turn evaluation or grids off with eval_every / sample_every = 0")


class ConfigError(ValueError):
    """A gin file or binding that cannot be applied; the message says what is valid."""


def _configurable_names(pm: PluginManager) -> dict[str, Any]:
    names: dict[str, Any] = {"TrainConfig": TrainConfig}
    for kind in pm.registry:
        for entry in pm.registry[kind].values():
            names[entry.gin_name] = entry.factory
    names.update(_extra_configurables())
    return names


def _extra_configurables() -> dict[str, Any]:
    """Configurables outside the registries, found in gin's own registry: whatever the loaded
    plugins define (the shapes world's ``PretrainConfig``) and the commands' (``CompareConfig``,
    registered when ``mixgrpo.commands`` loads; the engine does not import the commands)."""
    extra: dict[str, Any] = {}
    for selector, configurable in gin.config._REGISTRY.items():
        if selector.startswith("mixgrpo."):
            extra.setdefault(selector.rsplit(".", 1)[-1], configurable.wrapped)
    return extra


def explain_gin_error(exc: Exception, pm: PluginManager) -> str:
    """Turn gin's error into one that lists the valid choices."""
    msg = str(exc)
    names = _configurable_names(pm)
    missing = re.search(r"No configurable matching '([^']+)'", msg)
    if missing and missing.group(1).split(".")[-1] == "CompareConfig":
        return (f"{msg}\nCompareConfig configures a comparison: run it with `mixgrpo compare FILE.gin` (from "
                "Python, import mixgrpo.commands.compare first); `mixgrpo train` trains one experiment")
    if missing:
        wanted = missing.group(1).split(".")[-1]
        close = difflib.get_close_matches(wanted, list(names), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"{msg}\nConfigurable classes: {', '.join(sorted(names))}.{hint}"
    param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", msg)
    if param:
        cls = names.get(param.group(1).split(".")[-1])
        if cls is not None:
            valid = _parameters(cls)
            close = difflib.get_close_matches(param.group(2), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            return f"{msg}\nValid parameters of {param.group(1)}: {', '.join(valid)}.{hint}"
    return msg


def _parameters(factory: Any) -> list[str]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    target = inspect.unwrap(target)
    return [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]


def parse_gin(config_files: Sequence[str | Path], bindings: Sequence[str] = (), pm: PluginManager | None = None,
              *, selected_only: bool = False) -> PluginManager:
    """Load plugins, then parse gin files and bindings (cleared first). Returns the plugin manager.

    A ``%gin.REQUIRED`` macro left unbound is an error naming every unbound macro. With
    ``selected_only`` (a training run's config: ``load_config``) only the macros that the components
    the parsed ``TrainConfig`` selects use are required (see ``MacroUsage``); without it, all are.
    """
    pm = pm or get_plugin_manager()
    _extra_configurables()  # import them so that gin files may bind them
    gin.clear_config()
    for file in config_files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {str(file)!r} not found (run from the repository root, "
                              f"or pass a path to a .gin file)")
        for search in _search_paths(path):
            gin.add_config_file_search_path(str(search))
    try:
        _harden_gin_readers()
        with _quiet_search_misses():
            gin.parse_config_files_and_bindings([str(f) for f in config_files], list(bindings),
                                                finalize_config=False)
    except SyntaxError as exc:  # gin's parser knows the file (or binding), the line and its text
        where = exc.filename if exc.filename and exc.filename != "<string>" else "a --gin binding"
        text = f": {exc.text.strip()!r}" if exc.text else ""
        raise ConfigError(f"cannot parse {where}, line {exc.lineno}{text}: {exc.msg}. A binding reads "
                          f"`Class.parameter = value` (strings quoted, e.g. TrainConfig.num_steps = 10)") from None
    except tokenize.TokenError as exc:  # an unclosed bracket or string runs to the end of a file
        files = ", ".join(str(f) for f in config_files) or "the --gin bindings"
        raise ConfigError(f"cannot parse {files} (or a file it includes): {exc.args[0]} from line "
                          f"{exc.args[1][0] - 1}: a bracket or quote is not closed") from None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        if isinstance(exc, UnknownComponentError):
            raise
        raise ConfigError(explain_gin_error(exc, pm)) from None
    usage = MacroUsage.of_parsed_config(pm, TrainConfig) if selected_only else None
    where = config_files[-1] if config_files else "the --gin bindings"
    if any(_is_required(_macro_value(name)) for name in unbound_macros(usage)):
        check_macros_bound(where, usage)  # gin would name only the first; this names them all
    try:
        _finalize(usage)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(explain_gin_error(exc, pm)) from None
    check_scoped_bindings(pm)
    return pm


def _scoped_bindings() -> Iterator[tuple[str, str, str]]:
    """``(scope, class name, parameter)`` of every scoped binding of the parsed config."""
    for (scope, selector), params in gin.config._CONFIG.items():
        if scope and selector != "gin.macro":
            for param in params:
                yield scope, selector.rsplit(".", 1)[-1], param


def check_scoped_bindings(pm: PluginManager) -> None:
    """gin scopes name the roles of samplers (``post/DPMSolverPP.order = 1``): a binding in any other
    scope, or on a class that is not a sampler, would never apply, so it is an error naming the roles."""
    samplers = {entry.gin_name for entry in pm.registry["sampler"].values()}
    roles = ", ".join(SAMPLER_ROLES)
    for scope, cls, param in _scoped_bindings():
        binding = f"{scope}/{cls}.{param}"
        if scope not in SAMPLER_ROLES:
            close = difflib.get_close_matches(scope, SAMPLER_ROLES, n=1)
            hint = f" Did you mean '{close[0]}/{cls}.{param}'?" if close else ""
            raise ConfigError(f"binding {binding}: {scope!r} is not a sampler role. A scope names the role of the "
                              f"sampler it configures ({roles}), e.g. post/DPMSolverPP.order = 1; a binding "
                              f"without a scope applies to every role.{hint}")
        if cls not in samplers:
            raise ConfigError(f"binding {binding}: scopes name the roles of samplers ({roles}) and {cls} is not a "
                              f"sampler, so the binding would never apply; bind {cls}.{param} without a scope")


def warn_unused_role_bindings(config: TrainConfig, pm: PluginManager) -> list[str]:
    """Log (and return) the role-scoped bindings on a class that the run does not use in that role,
    e.g. ``post/DPMSolverPP.order`` with ``post_solver = 'euler'`` (a comparison's variant may switch
    a solver, so this is a warning, not an error)."""
    chosen = config.samplers()
    unused = []
    for scope, cls, param in _scoped_bindings():
        name = chosen.get(scope)
        if name is not None and pm.get("sampler", name).gin_name != cls:
            unused.append(f"{scope}/{cls}.{param}")
            log.warning("binding %s/%s.%s applies to nothing: the %s role uses sampler %r (%s)", scope, cls, param,
                        scope, name, pm.get("sampler", name).gin_name)
    return unused


def load_config(config_file: str | Path, bindings: Sequence[str] = (), pm: PluginManager | None = None,
                ) -> tuple[TrainConfig, PluginManager]:
    """Parse a gin experiment and return its validated ``TrainConfig``. Every required macro that the
    selected components use must be bound (all missing ones are named at once); the model and
    reward paths of components the config does not select may stay unbound."""
    pm = parse_gin([config_file], bindings, pm, selected_only=True)
    check_macros_bound(config_file, MacroUsage.of_parsed_config(pm, TrainConfig))
    try:
        config = TrainConfig()
    except (ValueError, TypeError) as exc:
        raise ConfigError(explain_gin_error(exc, pm)) from None
    config.validate(pm)
    warn_unused_role_bindings(config, pm)
    return config, pm


__all__ = ["UNSET_PREFIX", "ConfigError", "TrainConfig", "UnknownComponentError", "check_macros_bound", "load_config",
           "parse_gin", "unbound_macros", "unknown_message"]
