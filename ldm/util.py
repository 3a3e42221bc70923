"""Config instantiation and small generic helpers (nothing model-specific lives here)."""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import enum
import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import torch

# Configs of the original model zoo name classes of the `taming-transformers` package. When that package is
# not installed, these prefixes resolve to the equivalent classes of this project.
LEGACY_TARGET_PREFIXES = {
    "taming.modules.losses.vqperceptual.": "ldm.modules.losses.vqperceptual.",
    "taming.modules.losses.": "ldm.modules.losses.",
    "taming.modules.vqvae.quantize.": "ldm.modules.vqvae.quantize.",
    "taming.modules.discriminator.model.": "ldm.modules.losses.discriminator.",
    "taming.data.faceshq.": "ldm.data.faceshq.",
}

# Modules that original configs name but whose code was never published.
UNPUBLISHED_MODULES = {
    "ldm.data.openimages": "the OpenImages data code of the original release was never published",
    "ldm.data.previews": "the 'previews' data code of the original release was never published",
    "ldm.data.landscapes": "the landscapes (RFW) data code of the original release was never published",
}

SPECIAL_TARGETS = ("__is_first_stage__", "__is_unconditional__")

E = TypeVar("E", bound=enum.Enum)

_CONFIG_SOURCES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("config_sources", default=())


class ConfigError(ValueError):
    """A config names something that cannot be built; the message names the key, target and file."""


@contextlib.contextmanager
def config_source(*paths: str | Path) -> Iterator[None]:
    """Within this context, instantiation errors name the config file(s) a failing target came from.

    :param paths: the YAML files the config being instantiated was merged from.
    """
    token = _CONFIG_SOURCES.set(tuple(str(p) for p in paths))
    try:
        yield
    finally:
        _CONFIG_SOURCES.reset(token)


def _origin(target: str) -> str:
    """Names the config files (of the active :func:`config_source`) that mention `target`."""
    files = _CONFIG_SOURCES.get()
    if not files:
        return ""
    hits = []
    for f in files:
        try:
            if target in Path(f).read_text():
                hits.append(f)
        except OSError:
            continue
    return f" (in {', '.join(hits or files)})"


def _import_module(module: str, target: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        if not (module == missing or module.startswith(missing + ".")):
            raise  # the module exists but one of its own imports is missing: report that as it is
        for prefix, why in UNPUBLISHED_MODULES.items():
            if module == prefix or module.startswith(prefix + "."):
                raise ConfigError(f"cannot import target '{target}'{_origin(target)}: {why}; "
                                  f"point the config at a dataset of this project (see ldm/data/)") from None
        raise ConfigError(f"cannot import target '{target}'{_origin(target)}: no module named '{missing}'") from None


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Resolves a dotted path such as ``ldm.models.autoencoder.AutoencoderKL`` to the object it names."""
    if "." not in string:
        raise ConfigError(f"target '{string}'{_origin(string)} is not a dotted path 'package.module.Name'")
    for legacy, ours in LEGACY_TARGET_PREFIXES.items():
        if string.startswith(legacy) and importlib.util.find_spec(legacy.split(".")[0]) is None:
            string_resolved = ours + string[len(legacy):]
            break
    else:
        string_resolved = string
    module, cls = string_resolved.rsplit(".", 1)
    mod = _import_module(module, string)
    if reload:
        mod = importlib.reload(mod)
    if not hasattr(mod, cls):
        public = [n for n in dir(mod) if not n.startswith("_")]
        close = difflib.get_close_matches(cls, public, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"cannot import target '{string}'{_origin(string)}: module '{module}' has no "
                          f"attribute '{cls}'{hint}")
    return getattr(mod, cls)


def accepted_arguments(cls: Any) -> tuple[set[str], set[str], bool]:
    """The keyword arguments that constructing `cls` accepts, following ``**kwargs`` up the MRO.

    :return: (accepted names, required names, open) where `open` means any keyword is accepted.
    """
    accepted: set[str] = set()
    required: set[str] = set()
    classes = cls.__mro__ if inspect.isclass(cls) else (cls,)
    first = True
    for klass in classes:
        if klass in (object, torch.nn.Module):
            return accepted, required, False
        fn = klass.__init__ if inspect.isclass(klass) else klass
        if inspect.isclass(klass) and "__init__" not in vars(klass):
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return accepted, required, True
        var_kw = False
        for i, (name, p) in enumerate(sig.parameters.items()):
            if inspect.isclass(klass) and i == 0:
                continue  # self
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                accepted.add(name)
                if p.default is p.empty and first:
                    required.add(name)
        first = False
        if not var_kw:
            return accepted, required, False
        if not inspect.isclass(klass):
            return accepted, required, True
    return accepted, required, True


def check_arguments(cls: Any, params: Mapping[str, Any], target: str) -> None:
    """Raises :class:`ConfigError` naming every unknown or missing constructor argument of `cls`."""
    accepted, required, open_ = accepted_arguments(cls)
    problems = []
    if not open_:
        for key in params:
            if key not in accepted:
                close = difflib.get_close_matches(key, sorted(accepted), n=3, cutoff=0.5)
                hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                problems.append(f"unknown key 'params.{key}'{hint}")
    for key in sorted(required - set(params)):
        problems.append(f"missing required key 'params.{key}'")
    if problems:
        valid = ", ".join(sorted(accepted)) or "none"
        raise ConfigError(f"cannot build {target}{_origin(target)}: " + "; ".join(problems)
                          + f". Valid keys of {getattr(cls, '__name__', cls)}: {valid}")


def instantiate_from_config(config: Any, **extra: Any) -> Any:
    """Builds ``config.target(**config.params, **extra)``.

    :param config: a mapping with ``target`` (dotted path) and optional ``params``; the strings
        ``__is_first_stage__`` and ``__is_unconditional__`` yield None (the caller handles them).
    :raises ConfigError: naming the target, the offending key, and the closest valid keys.
    """
    if isinstance(config, str) and config in SPECIAL_TARGETS:
        return None
    if not isinstance(config, Mapping) and not hasattr(config, "keys"):
        raise ConfigError(f"expected a config with a 'target' key, got {type(config).__name__}: {config!r}")
    if "target" not in config:
        raise ConfigError(f"config has no 'target' key to instantiate (keys: {', '.join(map(str, config.keys()))})")
    target = str(config["target"])
    obj = get_obj_from_str(target)
    params = dict(config.get("params", None) or {})
    params.update(extra)
    check_arguments(obj, params, target)
    return obj(**params)


def parse_enum(enum_cls: type[E], value: Any, key: str) -> E:
    """`value` as a member of `enum_cls` (members pass through); otherwise a :class:`ConfigError` (a ValueError)
    naming the config `key` and the valid values."""
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"unknown {key} {value!r}; choose one of {choices}") from None


def parse_kind_config(config: Mapping[str, Any] | str | None, enum_cls: type[E], default: E, key: str,
                      allowed: Mapping[E, Sequence[str]]) -> tuple[E, dict[str, Any]]:
    """A config option given as None (the `default` kind), a kind, or ``{"kind": ..., **params}``.

    :param key: the config key, for messages (``timestep_sampling``, ...).
    :param allowed: the parameter names each kind accepts.
    :return: (the kind, its parameters).
    :raises ValueError: naming ``<key>.kind`` for an unknown kind and `key` for parameters the kind does not take.
    """
    params = {} if config is None else {"kind": config} if isinstance(config, str) else dict(config)
    kind = parse_enum(enum_cls, params.pop("kind", default.value), f"{key}.kind")
    unknown = sorted(set(params) - set(allowed[kind]))
    if unknown:
        raise ValueError(f"unknown {key} key(s) {', '.join(unknown)} for kind '{kind.value}'; allowed: "
                         f"{', '.join(allowed[kind]) or 'none'}")
    return kind, params


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """`val` unless it is None; otherwise `d` (called if callable)."""
    if exists(val):
        return val
    return d() if callable(d) else d


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: an [N x ...] Tensor -> an [N] Tensor."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def as_list(x: Any) -> list:
    """Wraps a single item in a list; lists and tuples are returned as lists."""
    if isinstance(x, (list, tuple)) or (isinstance(x, Sequence) and not isinstance(x, (str, bytes))):
        return list(x)
    return [x]
