"""What every command shares: error handling, option bundles, parsing helpers.

Command modules import from here (never from ``ovss_cli.main``, which imports them), so there
is no import circle. Library errors carry facts; :func:`user_errors` turns them into one line
(plus the hint of ``ovss_cli.hints``) and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import sys
from typing import Any

import click

from featurestore.errors import OvssError

#: Exit codes (documented in the README): 0 ok, 1 error, 2 usage, 3 some inputs failed.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


def _os_error_line(e: OSError) -> str:
    what = e.strerror or str(e)
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        hint = " (the disk is full; free space and rerun: finished work is kept)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = " (no permission to write there; choose another location)"
    else:
        hint = ""
    return f"{what}{where}{hint}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's stop) raised in the main thread, so that a command stops
    as on Ctrl-C: finished blocks already handed to the writer are written, then exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def user_errors(fn):
    """Turn library errors into one-line messages with a non-zero exit code; SIGINT (exit
    130) and SIGTERM (exit 143) stop the command with one line, keeping finished work."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import signal
        import threading

        from featurestore.names import redact
        from ovss_cli.hints import render_error

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except OvssError as e:  # credentials in a store URL never reach the terminal
            raise click.ClickException(redact(render_error(e))) from None
        except OSError as e:
            raise click.ClickException(redact(_os_error_line(e))) from None
        except KeyboardInterrupt as e:
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            click.echo(
                f"{what}; finished work is kept — rerun the same command to resume", err=True
            )
            sys.exit(143 if isinstance(e, Terminated) else 130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def store_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback of an option whose value names a set in a store (``--write-labels``,
    ``--name``): ``featurestore.names.check_name``'s rule, a usage error (exit 2) otherwise."""
    from featurestore.names import InvalidNameError, check_name

    if value is None:
        return None
    try:
        return check_name(value, "label set")
    except InvalidNameError as e:
        raise click.BadParameter(e.reason) from None


def parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter("use the form i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"{value}: need 0 <= i < n")
    return i, n


def parse_overrides(items: tuple[str, ...]) -> dict | None:
    """``KEY=INT`` items -> dict; a dotted key nests (``vision_cfg.layers=2`` ->
    ``{"vision_cfg": {"layers": 2}}``, the CLIP config sections)."""
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            number = int(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: use KEY=INT, e.g. depth=2") from None
        *parents, leaf = [k.strip() for k in key.split(".")]
        node = out
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise click.BadParameter(f"{item!r}: '{k}' is already set to a number")
        node[leaf] = number
    return out or None


def parse_settings(items: tuple[str, ...]) -> dict[str, str]:
    """``--set KEY=VALUE`` items -> ``{key: text}``; the config coerces the values."""
    from methods.config import ConfigError
    from methods.config import parse_settings as parse

    try:
        return parse(items)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose choices come from a function, read when used (so a method or
    trainer registered after the CLI was imported, e.g. by a plugin or a test, is offered)."""

    def __init__(self, source, case_sensitive: bool = True):
        self._source = source
        super().__init__([], case_sensitive=case_sensitive)

    @property
    def choices(self):  # type: ignore[override]
        return tuple(self._source())

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it; the source decides
        pass


def add_options(options: list):
    """Decorator applying a list of click options in the order given."""

    def deco(fn):
        for o in reversed(options):
            fn = o(fn)
        return fn

    return deco


def _set_storage_options(ctx: click.Context, param: click.Parameter, value: str | None):
    from featurestore.remote import parse_storage_options, set_storage_options

    try:
        set_storage_options(parse_storage_options(value) if value else None)
    except ValueError as e:  # the message never repeats the value (it may hold secrets)
        raise click.BadParameter(str(e)) from None


def storage_options_option(fn):
    """``--storage-options JSON|@FILE``: fsspec options of a store given as a URL, set
    process-wide (``featurestore.remote.set_storage_options``) before the command runs."""
    return click.option(
        "--storage-options",
        metavar="JSON|@FILE",
        expose_value=False,
        callback=_set_storage_options,
        help="Options of a store on object storage (--store s3://bucket/x.zarr or any fsspec "
        'URL), as a JSON object or @FILE holding one, e.g. \'{"endpoint_url": '
        '"http://127.0.0.1:9000"}\'. Credentials default to the AWS_* environment variables '
        "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); "
        "these options are never recorded or printed.",
    )(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)


def quiet_option(fn):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(fn)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help_text(info: Any) -> str:
    text = " ".join(info.help.replace("``", "").split())
    if info.choices:
        text += f" Choices: {', '.join(str(c) for c in info.choices)}."
    return text


def config_options(config_cls: type, exclude: tuple[str, ...] = (), prefix: str = "cfg_"):
    """Click options generated from a config dataclass (see ``methods.config``): one
    ``--field-name`` per field, typed, with the field's docstring as help and its default
    shown. Values arrive in the command as ``{prefix}{field}`` keyword arguments (``None``
    when not given); :func:`collect_config` gathers them into an overrides dict."""
    from methods.config import config_fields

    opts = []
    for info in config_fields(config_cls):
        if info.name in exclude:
            continue
        default = None if info.default is dataclasses.MISSING else info.default
        shown = "on" if default is True else "off" if default is False else default
        help_text = _help_text(info)
        if info.type is bool:
            opts.append(
                click.option(
                    f"{_flag(info.name)}/--no-{info.name.replace('_', '-')}",
                    prefix + info.name,
                    default=None,
                    help=f"{help_text} [default: {shown}]",
                )
            )
            continue
        ptype: Any = {int: int, float: float}.get(info.type, str)
        if info.choices and info.type is str:
            ptype = click.Choice([str(c) for c in info.choices])
        opts.append(
            click.option(
                _flag(info.name),
                prefix + info.name,
                type=ptype,
                default=None,
                help=f"{help_text} [default: {shown}]",
            )
        )
    return add_options(opts)


def collect_config(kwargs: dict[str, Any], prefix: str = "cfg_") -> dict[str, Any]:
    """Pop the ``{prefix}*`` keyword arguments of :func:`config_options`; keep given ones."""
    out = {}
    for k in [k for k in kwargs if k.startswith(prefix)]:
        v = kwargs.pop(k)
        if v is not None:
            out[k[len(prefix) :]] = v
    return out
