"""`ptx` options show and use the defaults their dataclass field or function parameter declares (no copies)."""

import re

from click.testing import CliRunner

from ptx.cli import cli


def _default(help_text: str, flag: str) -> str:
    """The '[default: X]' click prints for `flag` (help lines wrap, so read across them)."""
    text = " ".join(help_text.split())
    m = re.search(re.escape(flag) + r"\b[^\[]*?\[default: ([^\]]+)\]", text)
    assert m, f"{flag} shows no default in:\n{help_text}"
    return m.group(1).split(";")[0]  # IntRange adds "; x>=1"


def test_options_show_the_declared_defaults(monkeypatch):
    from ptx.stages import indicators

    def recommend(task, backbone_name, tracker, workdir, top_k: int = 7, probe_steps: int = 13):
        return []

    monkeypatch.setattr(indicators, "recommend", recommend)  # a changed declaration shows up in the help
    out = CliRunner().invoke(cli, ["recommend", "--help"]).output
    assert (_default(out, "--top"), _default(out, "--probe-steps")) == ("7", "13")
    assert _default(CliRunner().invoke(cli, ["eval", "--help"]).output, "--batch-size") == "32"
    assert _default(CliRunner().invoke(cli, ["reference-check", "--help"]).output, "--bootstrap") == "1000"
    train = CliRunner().invoke(cli, ["train", "--help"]).output
    assert (_default(train, "--prompt-length"), _default(train, "--steps")) == ("100", "1000")
