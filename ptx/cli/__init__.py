"""The `ptx` command line: parse, call one library function, print where the results are.

A package by concern: options (the dataclass-to-option framework and the shared options), group (the root `ptx`
group), commands (tasks, train, eval, the prompt bank), studies (run, sweep, the stages, resume, status), plans
(what --dry-run prints), servers (mlflow-server, ui), output (tables). The only click user and the only part of ptx
that prints.
"""

import sys

import click

from ptx.cli import commands, servers, studies  # noqa: F401  (each attaches its commands to the group)
from ptx.cli.group import cli
from ptx.errors import PtxError, SweepInterrupted

__all__ = ["cli", "main"]


def _terminate(signum, _frame):
    """SIGTERM unwinds like Ctrl-C: the open MLflow run is closed as KILLED and temp dirs are removed."""
    raise SystemExit(128 + signum)


def main():
    """Entry point: one-line errors and exit code 2 for user errors."""
    import signal

    from ptx.track import disable_telemetry

    disable_telemetry()  # before anything imports mlflow
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(standalone_mode=False)
    except PtxError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as exc:  # click turns a KeyboardInterrupt (ours included) into Abort
        cause = exc.__cause__
        click.echo(f"interrupted: {cause}" if isinstance(cause, SweepInterrupted) else "aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line like every other bad input; the help is one -h away
        where = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SweepInterrupted as exc:  # Ctrl-C or SIGTERM: trials stopped, runs KILLED, the experiment resumable
        click.echo(f"interrupted: {exc}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
