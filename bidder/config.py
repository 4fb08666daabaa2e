"""The configuration file, and ``bidder config show | example``.

``bidder serve --config bidder.toml`` (or ``BIDDER_CONFIG=bidder.toml``) reads a TOML file
whose keys are the setting names of ``bidder.settings``. Precedence, highest first: command
line flag, ``BIDDER_*`` environment variable, file, default. A key that is no setting, or a
value its setting refuses, stops the start with the file, the key and the reason, as a bad
flag does. ``config show`` prints each effective value and where it came from, secrets
masked; ``config example`` prints a commented file with every setting and its doc.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bidder import settings as settings_mod
from bidder.settings import Setting, Settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

CONFIG_ENV = settings_mod.ENV_PREFIX + "CONFIG"
SECRET_WORDS = ("secret", "password", "token")  # a setting named with one of these is masked
MASK = "********"


class ConfigError(SystemExit):
    """A configuration file that cannot be used; the message names file, key and reason."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, for ``bidder serve`` and ``bidder config show``."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"TOML file of settings (keys: the setting names; `bidder config "
                             f"example` writes one). Flags and BIDDER_* variables win over it. "
                             f"[env {CONFIG_ENV}]")


def config_path(args: argparse.Namespace | None, environ: dict[str, str]) -> str | None:
    return getattr(args, "config", None) or environ.get(CONFIG_ENV) or None


def load(path: str) -> dict[str, Any]:
    """The settings a TOML file sets, parsed and checked by each setting's own parser."""
    if tomllib is None:
        raise ConfigError(f"bidder: {path}: reading a config file needs Python 3.11 or later "
                          "(tomllib); use flags or BIDDER_* variables instead")
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"bidder: config file {path} does not exist: check --config or "
                          f"{CONFIG_ENV}; `bidder config example > {path}` writes one") from None
    except OSError as exc:
        raise ConfigError(f"bidder: cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"bidder: {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, raw in document.items():
        setting = settings_mod.BY_NAME.get(key)
        if setting is None:
            close = difflib.get_close_matches(key, settings_mod.BY_NAME, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"bidder: {path}: unknown key {key!r}{hint}: keys are setting "
                              "names, `bidder config example` lists them all")
        try:
            values[key] = parse_value(setting, raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"bidder: {path}: {key} = {toml_value(raw)}: {exc}") from None
    return values


def parse_value(setting: Setting, raw: Any) -> Any:
    """A TOML value for ``setting``: booleans for on/off settings, lists for comma-separated
    ones, and everything through the parser the flag uses."""
    if setting.boolean:
        if not isinstance(raw, bool):
            raise ValueError("expected true or false")
        return raw
    if isinstance(raw, bool):
        raise ValueError(f"expected a value like {toml_value(setting.default)}, not a boolean")
    if isinstance(raw, dict):
        raise ValueError("expected a value, not a table")
    if isinstance(raw, list):
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in raw):
            raise ValueError("expected a list of strings or numbers")
        raw = ",".join(str(v) for v in raw)
    return setting.type(str(raw))


def resolve(args: argparse.Namespace | None = None,
            environ: dict[str, str] | None = None) -> tuple[Settings, dict[str, str]]:
    """The effective settings, flag > environment > file > default, and each one's source."""
    environ = os.environ if environ is None else environ
    path = config_path(args, environ)
    from_file = load(path) if path else {}
    sources: dict[str, str] = {}
    for s in settings_mod.SETTINGS:
        if args is not None and getattr(args, s.name, None) is not None:
            sources[s.name] = "flag"
        elif s.env in environ:
            sources[s.name] = "env"
        elif s.name in from_file:
            sources[s.name] = f"file {path}"
        else:
            sources[s.name] = "default"
    file_wins = {name: value for name, value in from_file.items()
                 if sources[name].startswith("file")}
    return settings_mod.resolve(args, environ, **file_wins), sources


def is_secret(name: str) -> bool:
    return any(word in name for word in SECRET_WORDS)


def shown(name: str, value: Any) -> str:
    """A value as ``config show`` prints it: secrets masked, URL passwords too."""
    if value is None:
        return "(none)"
    if is_secret(name):
        return MASK if value else "(empty)"
    text = ",".join(value) if isinstance(value, tuple) else str(value)
    if "://" in text:
        parts = urlsplit(text)
        if parts.password:
            netloc = f"{parts.username}:{MASK}@{parts.hostname}" + (
                f":{parts.port}" if parts.port else "")
            text = urlunsplit(parts._replace(netloc=netloc))
    return text


def show(args: argparse.Namespace, out=sys.stdout) -> int:
    s, sources = resolve(args)
    if args.json:
        print(json.dumps({name: {"value": shown(name, value) if is_secret(name) else value,
                                 "source": sources[name]}
                          for name, value in s.values.items()}, indent=2, default=str), file=out)
        return 0
    rows = [(name, shown(name, s.values[name]), sources[name]) for name in sources]
    width = max(len(r[0]) for r in rows)
    value_width = min(40, max(len(r[1]) for r in rows))
    print("# effective settings: flag > environment (BIDDER_*) > file > default", file=out)
    print(f"{'SETTING':<{width}}  {'VALUE':<{value_width}}  SOURCE", file=out)
    for name, value, source in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {source}", file=out)
    return 0


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def example() -> str:
    """A TOML file with every setting commented out at its default, each with its doc."""
    lines = [
        "# bidder configuration: `bidder serve --config bidder.toml` (or BIDDER_CONFIG).",
        "# Keys are the setting names. A flag (--NAME) or a BIDDER_<NAME> variable wins over",
        "# this file: flag > environment > file > default; `bidder config show --config FILE`",
        "# prints what is in force and where each value came from. Uncomment what you change;",
        "# an unknown key or a bad value stops the start. Keep secrets (notice_secret) in the",
        "# environment, e.g. a systemd EnvironmentFile readable by root only.",
    ]
    for s in settings_mod.SETTINGS:
        lines.append("")
        lines.extend("# " + line for line in wrap(s.doc))
        lines.append(f"# flag {s.flag}{'/--no-' + s.flag[2:] if s.boolean else ''}, env {s.env}")
        if s.default is None:
            lines.append("# unset by default; the form of a value:")
            lines.append(f"#{s.name} = \"{s.metavar or 'VALUE'}\"")
        else:
            lines.append(f"#{s.name} = {toml_value(s.default)}")
    return "\n".join(lines) + "\n"


def wrap(text: str, width: int = 96) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines


def run(args: argparse.Namespace) -> int:
    if args.action == "example":
        sys.stdout.write(example())
        return 0
    return show(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``bidder config show|example``: show takes the serve flags too, to see what wins."""
    parser.add_argument("action", choices=("show", "example"),
                        help="show: every effective setting and its source (default, file, "
                             "env, flag), secrets masked; example: a commented TOML file with "
                             "every setting at its default")
    parser.add_argument("--json", action="store_true", help="show: as JSON")
    add_config_flag(parser)
    settings_mod.add_arguments(parser, "serve")
