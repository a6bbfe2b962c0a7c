"""MkDocs hook: the CLI reference page is generated from the console script's own parsers.

A page containing the marker ``<!-- cli-reference -->`` gets, in its place, one section per
subcommand (usage, description, every option with its help and default) read from
``starlift.cli.build_parser()``, so the reference cannot drift from the code. Written by hand
because mkdocs-click and sphinx-argparse target click and Sphinx respectively.
"""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, (argparse._StoreTrueAction,
                                                                         argparse._StoreFalseAction,
                                                                         argparse._HelpAction)):
        return ""
    return f"`{action.default}`"


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (("{" + ",".join(map(str, action.choices)) + "}") if action.choices
                                 else action.dest.upper())
    return f"{names} `{metavar}`"


def _escape(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def render() -> str:
    from starlift.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, p in sub.choices.items():
        p.prog = f"starlift {name}"
        out.append(f"## `starlift {name}`\n")
        if p.description:
            out.append(_escape(p.description) + "\n")
        out.append("```text\n" + p.format_usage().strip() + "\n```\n")
        out.append("| argument | what it does | default |\n|---|---|---|")
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = _escape(action.help).strip()
            if action.choices:
                text = (text.rstrip(".") + ". " if text else "") + f"Choices: {', '.join(map(str, action.choices))}."
            out.append(f"| {_flags(action)} | {text} | {_default(action)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
