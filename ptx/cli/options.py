"""The CLI's options: a click option declared by the config dataclass field (or function parameter) it fills, so
its type, range, default and message come from that one declaration; the options many commands share; and the
values they resolve to (the workdir, the tracker, an output directory).
"""

import os
from pathlib import Path

import click

from ptx.errors import PtxError

DEFAULT_WORKDIR = "ptx-work"


def workdir_path(value: str | None) -> Path:
    """--workdir, else $PTX_WORKDIR, else ./ptx-work, as an absolute path."""
    return Path(value or os.environ.get("PTX_WORKDIR") or DEFAULT_WORKDIR).expanduser().resolve()


def writable_workdir(value: str | None) -> Path:
    """The workdir, created now: a path that cannot be a directory fails here, before any work starts."""
    from ptx.io import ensure_dir

    return ensure_dir(workdir_path(value), "--workdir")


def check_out_dir(out: str | None, flag: str = "--out") -> None:
    """An output directory must not be an existing file (checked before the work that would fill it)."""
    if out is not None and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise PtxError(f"{flag} {Path(out).expanduser().resolve()}: expected a directory, found an existing file")


def _dataclass(ref: str):
    """'module:Class' -> the class, imported on first use (the CLI starts without importing torch)."""
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


class FieldType(click.ParamType):
    """A click type checked by the config dataclass field it fills (ptx.fields): one declaration, one message."""

    name = "value"

    def __init__(self, ref: str, field: str):
        self.ref, self.field = ref, field

    def _annotation(self):
        from ptx.fields import field_annotation

        return field_annotation(_dataclass(self.ref), self.field)

    def get_metavar(self, param, ctx):
        from enum import Enum

        from ptx.fields import split_annotation

        base, rules, _ = split_annotation(self._annotation())
        enum = next((r for r in rules if isinstance(r, type) and issubclass(r, Enum)), None)
        if enum is not None:
            return "[" + "|".join(m.value for m in enum) + "]"
        return {int: "INTEGER", float: "FLOAT"}.get(base, "TEXT")

    def convert(self, value, param, ctx):
        from ptx.fields import check_value, expected, split_annotation

        annotation = self._annotation()
        flag = param.opts[0] if param is not None else self.field
        if isinstance(value, str):
            base = split_annotation(annotation)[0]
            try:
                value = base(value.strip()) if base in (int, float) else value
            except ValueError:
                self.fail(f"expected {expected(annotation, None)}, found {value!r}", param, ctx)
        try:
            return check_value(value, annotation, flag, null=None)
        except PtxError as exc:
            self.fail(str(exc).removeprefix(f"{flag}: "), param, ctx)


class _FieldDefault:
    """The declared default of a dataclass field (or of a function's parameter), looked up when click needs it."""

    def __init__(self, ref: str, field: str):
        self.ref, self.field = ref, field

    def __call__(self):
        import dataclasses
        import inspect

        from ptx.fields import field_default

        obj = _dataclass(self.ref)
        if dataclasses.is_dataclass(obj):
            return field_default(obj, self.field)
        return inspect.signature(obj).parameters[self.field].default


class FieldOption(click.Option):
    """An option whose help shows the dataclass default itself, not '(dynamic)'."""

    def get_default(self, ctx, call=True):
        value = super().get_default(ctx, call=call)
        return value() if isinstance(value, _FieldDefault) else value



def field_option(flag: str, ref: str, field: str, **kwargs):
    """A click option typed, ranged and defaulted by the dataclass field `field` of `ref` ('module:Class')."""
    return click.option(flag, cls=FieldOption, type=FieldType(ref, field), default=_FieldDefault(ref, field),
                        show_default=True, **kwargs)


def default_option(flag: str, ref: str, param: str, **kwargs):
    """A click option whose default is the one the function `ref` ('module:function') declares for `param`."""
    return click.option(flag, param, cls=FieldOption, default=_FieldDefault(ref, param), show_default=True, **kwargs)


def open_tracker(tracking_uri: str | None, workdir: Path, experiment: str | None = None):
    """The MLflow tracker of --tracking-uri (else $MLFLOW_TRACKING_URI, else WORKDIR/mlflow.db)."""
    from ptx import track

    uri = track.resolve_tracking_uri(tracking_uri, workdir)
    return track.open(uri, experiment or track.DEFAULT_EXPERIMENT, workdir=workdir)


workdir_option = click.option("--workdir", default=None, help="Results directory [env PTX_WORKDIR; default ./ptx-work].")
uri_option = click.option("--tracking-uri", default=None,
                          help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///WORKDIR/mlflow.db].")


address_option = click.option("--address", default=None,
                              help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start a local Ray).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a spec field, e.g. --set train.steps=10 (repeatable).")
offline_ok_option = click.option("--offline-ok", is_flag=True,
                                 help="Go on when a task's data cannot be reached from this driver (workers can).")

