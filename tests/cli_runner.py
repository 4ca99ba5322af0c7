"""The `ptx` console-script entry point run in-process, shared by the CLI tests."""

import sys

from click.testing import CliRunner

from ptx.cli import main


def invoke_cli(*args) -> tuple[int, str, str]:
    """Run `ptx ARGS...` through `ptx.cli.main` in-process: (exit code, stdout, stderr); sys.argv is restored."""
    argv = sys.argv
    sys.argv = ["ptx", *[str(a) for a in args]]
    try:
        with CliRunner().isolation() as (out, err, _):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code or 0  # sys.exit() and sys.exit(None) are exit 0
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            return code, out.getvalue().decode(), err.getvalue().decode()
    finally:
        sys.argv = argv


def user_error(result: tuple[int, str, str]) -> str:
    """The stderr of an `invoke_cli` result that must be a user error: exit 2 and one `error: ...` line."""
    code, _, err = result
    assert code == 2, result
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err
