"""``--config FILE``: option values from a TOML (or JSON) file, for every preprocess and evaluate command.

The file's values become the command's defaults (click's ``default_map``), so an option given on the command
line still wins. Each value is turned into the text the command line would carry and then goes through the
option's own type and callback, so a value means exactly what the same flag means. What a command line
cannot say (a table, a date, null, a number where a flag or a path goes, a float for a whole number) is
refused with the file and the key named, never guessed at.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import click

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover - 3.10 installs tomli (setup.cfg)
    import tomli as tomllib


def _read_table(path: Path) -> dict:
    """The file as a table (TOML, or JSON for ``.json``); UTF-8, with or without a byte-order mark."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{path}: not a readable UTF-8 TOML (or .json) file: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a table of option = value")
    return data


def _long_names(ctx: click.Context, own: click.Parameter) -> dict[str, click.Option]:
    """Long option name, dashes as underscores -> the option it sets (``split`` -> the ``splits`` option)."""
    names = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p is not own:
            names.update({o.lstrip("-").replace("-", "_"): p for o in p.opts if o.startswith("--")})
    return names


def _as_text(option: click.Option, value, where: str) -> str:
    """One scalar as the command line would carry it."""
    is_bool = isinstance(option.type, click.types.BoolParamType)
    is_float = isinstance(option.type, (click.types.FloatParamType, click.FloatRange))
    if isinstance(value, bool):  # before int: bool is an int in Python
        if not is_bool:
            raise click.BadParameter(f"{where}: true/false for an option that takes a value")
        return "true" if value else "false"
    if isinstance(value, str) and "\0" in value:  # a path holding one made os.stat raise a bare ValueError
        raise click.BadParameter(f"{where}: a NUL character, which no command line can carry")
    if isinstance(value, str) or (isinstance(value, int) and not is_bool) or (isinstance(value, float) and is_float):
        return str(value)
    what = "a float for a whole number" if isinstance(value, float) else f"a {type(value).__name__}"
    raise click.BadParameter(f"{where}: {what} ({value!r}) is not something --{option.name.replace('_', '-')} "
                             "takes on the command line")


def _as_option_value(option: click.Option, value, where: str):
    """A file value as the option's command-line text: a list is repeated values for a repeatable option and
    the comma list for a text option (ranks = [5, 10, 20] is --ranks 5,10,20); anything else one scalar."""
    if isinstance(value, (dict, datetime.date, datetime.time)) or value is None:
        raise click.BadParameter(f"{where}: {value!r} is not something a command line can say")
    if option.multiple:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise click.BadParameter(f"{where}: an empty list; leave the key out for the default")
        return tuple(_as_text(option, v, where) for v in values)
    if isinstance(value, list):
        if option.type is not click.STRING or not value:
            raise click.BadParameter(f"{where}: a list for an option that takes one value")
        return ",".join(_as_text(option, v, where) for v in value)
    return _as_text(option, value, where)


def _load_config(ctx: click.Context, param: click.Parameter, path: Path | None) -> None:
    if path is None:
        return
    try:
        ctx.default_map = {**(ctx.default_map or {}), **_defaults(ctx, param, path)}
    except click.BadParameter as exc:  # reported as "Invalid value for '--config': FILE: key = value: why"
        exc.ctx, exc.param = ctx, param
        raise


def _defaults(ctx: click.Context, param: click.Parameter, path: Path) -> dict:
    """The file's values by parameter name, each as the command line's text, each checked by its option."""
    names = _long_names(ctx, param)
    defaults: dict = {}
    for key, value in _read_table(path).items():
        option = names.get(key.replace("-", "_"))
        if option is None:
            raise click.BadParameter(f"{path}: no option {key} in this command; it takes "
                                     f"{', '.join(sorted(n.replace('_', '-') for n in names))}")
        if option.name in defaults:
            raise click.BadParameter(f"{path}: {key} is given twice (dashes and underscores name the same option)")
        where = f"{path}: {key} = {value!r}"
        text = _as_option_value(option, value, where)
        try:
            option.type_cast_value(ctx, text)  # the option's own check, reported against the file
        except click.BadParameter as exc:
            raise click.BadParameter(f"{where}: {exc.message}") from None
        defaults[option.name] = text
    return defaults


# eager: the file's values are the defaults before any other option is read
config_option = click.option(
    "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), is_eager=True, expose_value=False,
    callback=_load_config,
    help="TOML file (or .json) of option values, keys as the long option names (shard-size = 500, "
         "ranks = [5, 10, 20], spectra = false); options given on the command line win.")
