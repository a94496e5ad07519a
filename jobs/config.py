"""The shape every job shares: ``python -m jobs.NAME CONFIG.yaml [key=value ...] [--flags]``.

The YAML file is read, ``key=value`` overrides are applied by dotted path (values parsed as YAML,
so ``grid.resolution=1.40625`` is a float and ``splits.train=[2015,2016]`` a list), the result is
validated by the job's pydantic model before any Ray work, printed, and returned. A bad key, value
or file exits with status 2 and a message that names it.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from climax.redact import REDACTED, is_secret_key, redact, redact_argv

__all__ = ["ConfigError", "parse_args", "apply_overrides", "validate", "describe_keys", "fail"]


class ConfigError(ValueError):
    """A configuration problem, reported without a traceback."""


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {redact_argv([item])[0]!r} is not of the form key=value "
                              "(e.g. grid.resolution=1.40625)")
        value = yaml.safe_load(raw) if raw else ""
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit():
                node = node[int(part)]
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {redact_argv([item])[0]!r}: {part!r} is not a section")
        last = parts[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return cfg


def _allowed(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at ``loc`` (walks nested models and lists of models)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = inner_model(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = inner_model(arg)
        if found is not None:
            return found
    return None


def validate(model: type[BaseModel], cfg: dict, source: str = "config") -> BaseModel:
    try:
        return model.model_validate(cfg)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(err["loc"])
            where = ".".join(str(p) for p in loc) or "(top level)"
            if err["type"] == "extra_forbidden":
                allowed = _allowed(model, loc[:-1])
                lines.append(f"unknown key {where!r}; allowed keys here: {', '.join(allowed)}")
            elif err["type"] == "missing":
                lines.append(f"missing key {where!r}")
            elif not loc:  # a check across keys: its message says what is wrong, the input is everything
                lines.append(err["msg"].removeprefix("Value error, "))
            else:  # the input may hold credentials (a storage_options mapping): redacted
                shown = REDACTED if any(is_secret_key(str(p)) for p in loc) else redact(err.get("input"))
                lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')} (got {shown!r})")
        if len(lines) == 1:  # one problem, one line: it names the key and says what is wrong
            raise ConfigError(f"invalid {source}: {lines[0]}") from None
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines)) from None


def describe_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """``key (type) = default  description`` lines for --help."""
    out = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = inner_model(f.annotation)
        if inner is not None and typing.get_origin(f.annotation) not in (list, dict):
            out.append(f"  {key}:")
            out += describe_keys(inner, key + ".")
            continue
        default = "(required)" if f.is_required() else repr(f.get_default(call_default_factory=True))
        type_name = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
        desc = f"  {f.description}" if f.description else ""
        out.append(f"  {key} ({type_name}) = {default}{desc}")
    return out


def fail(message: str, code: int = 2) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def parse_args(model: type[BaseModel], description: str, argv: list[str] | None = None,
               flags: dict[str, str] | None = None, *, config_required: bool = True,
               default_config: str | None = None) -> tuple[BaseModel, argparse.Namespace]:
    """Parse ``CONFIG.yaml [key=value ...]`` plus boolean ``flags`` {name: help}; exit 2 on error."""
    epilog = "configuration keys (set in the YAML file or as key=value):\n" + "\n".join(describe_keys(model))
    ap = argparse.ArgumentParser(description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?" if not config_required else None, default=default_config,
                    help="YAML configuration file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides by dotted path")
    for name, help_text in (flags or {}).items():
        ap.add_argument(f"--{name}", action="store_true", help=help_text)
    args = ap.parse_args(argv)
    cfg: dict = {}
    if args.config:
        path = Path(args.config)
        if "=" in args.config and not path.exists():  # only overrides were given
            args.overrides.insert(0, args.config)
            args.config = default_config
            path = Path(default_config) if default_config else None
        if path is not None:
            if not path.is_file():
                fail(f"configuration file {path} does not exist")
            try:
                cfg = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                fail(f"configuration file {path} is not valid YAML: {e}")
            if not isinstance(cfg, dict):
                fail(f"configuration file {path} must hold a mapping of keys, not a {type(cfg).__name__}")
    try:
        config = validate(model, apply_overrides(cfg, args.overrides),
                          source=f"configuration {args.config or ''}".strip())
    except ConfigError as e:
        fail(str(e))
    print("effective configuration:")
    # credentials (storage_options key/secret, URL userinfo) stay in memory, never in the job's log
    print(yaml.safe_dump(redact(config), sort_keys=False, default_flow_style=None).rstrip())
    return config, args
