"""docs/cli.md, the command line's reference, says what ``normtrace COMMAND --help`` says.

The reference is rendered from the parser's own arguments (names, help with defaults filled in, choices),
not from argparse's formatted output, whose wrapping differs between Python versions. After changing
an option, rewrite the page with ``python tests/analysis/test_cli_reference.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normtrace_analysis.cli import build_parser

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
HEADER = """Installed with `normtrace-analysis` (`pip install ./analysis`). Every command takes run directories or
globs (`'runs/*'`) and prints a one-line error naming the file, run or option at fault (exit code 2);
`NORMTRACE_DEBUG=1` shows the full traceback instead. This page is generated from the parser
(`python tests/analysis/test_cli_reference.py`) and tested against it.
"""


def _commands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Each sub-command's one-line help and parser, in the order the parser lists them."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {name: (helps[name], sub) for name, sub in action.choices.items()}


def _argument(action: argparse.Action) -> str:
    """How the argument is written: ``--epochs LO:HI``, ``-o, --output OUTPUT``, ``RUN``."""
    if not action.option_strings:
        return str(action.metavar or action.dest)
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    )
    return f"{names} {metavar}"


def _meaning(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help as ``--help`` prints it: defaults filled in by the parser's formatter."""
    formatter = parser._get_formatter()
    text = formatter._expand_help(action) if action.help else ""
    extras = []
    if action.required and action.option_strings:
        extras.append("required")
    if isinstance(action, argparse._AppendAction):
        extras.append("repeatable")
    return " ".join(text.split()) + (f" ({', '.join(extras)})" if extras else "")


def render() -> str:
    """The whole reference page."""
    parser = build_parser()
    parts = [f"# The `normtrace` command line\n\n{parser.description}\n\n", HEADER]  # --help's first words
    for name, (summary, sub) in _commands(parser).items():
        parts.append(f"\n## `normtrace {name}`\n\n{summary}.\n")
        if sub.description:
            parts.append(f"\n{' '.join(sub.description.split())}\n")
        parts.append("\n| argument | meaning |\n| --- | --- |\n")
        required = {id(a) for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            meaning = _meaning(sub, action) + (
                " (one of these is required)" if id(action) in required else ""
            )
            parts.append(f"| `{_argument(action)}` | {meaning.replace('|', '&#124;')} |\n")
    return "".join(parts)


def test_the_reference_page_is_what_the_parser_says() -> None:
    assert PAGE.read_text() == render(), (
        "docs/cli.md is stale: run python tests/analysis/test_cli_reference.py"
    )


def test_every_option_of_every_command_is_documented_with_its_default() -> None:
    """An independent look at the page: each option named by ``--help`` appears, with the default value
    ``--help`` shows for it."""
    page = PAGE.read_text()
    for name, (_, sub) in _commands(build_parser()).items():
        section = page.split(f"## `normtrace {name}`", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert f"`{option}" in section or f", {option}" in section, (name, option)
            if (
                action.option_strings
                and action.default not in ([], argparse.SUPPRESS)
                and not (action.default is None or action.default is False)
            ):
                assert f"(default: {action.default})" in section, (name, action.dest)


if __name__ == "__main__":
    PAGE.write_text(render())
    sys.stdout.write(f"wrote {PAGE}\n")
