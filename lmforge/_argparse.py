"""Command lines derived from typed function signatures and Google-style docstrings.

A verb is a plain function. Its sub-parser is read off the function itself, so `--help`
always matches the code:

- the docstring's first paragraph is the one-line help in the verb list, and the text
  before its sections (`Args:`, `Returns:`, ...) is the description of `VERB --help`;
- each entry of the `Args:` section is the help of the parameter of that name;
- a parameter without a default is positional, one with a default is an option
  `--kebab-case`; a `bool` default gives a `--flag/--no-flag` pair;
- `int`, `float`, `str`, `pathlib.Path`, `Literal[...]` (choices), `X | None` /
  `Optional[X]` and `list[X]` (one or more values) are understood; anything else is a
  `TypeError` when the parser is built, not when a user runs the verb.

`run(verbs, argv)` parses, calls the verb and turns user errors (`ValueError`,
`TypeError`, `FileNotFoundError`) into `PROG VERB: error: message` and exit code 2, and an
error with an `exit_code` attribute into the same message and that code.
`LMFORGE_DEBUG=1` re-raises them with the traceback instead.
"""

from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence

USER_ERRORS = (ValueError, TypeError, FileNotFoundError)

_SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Examples?|Notes?|Example usage):\s*$"
)
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")
_SCALARS = (int, float, str, pathlib.Path)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, keep the docstring's line breaks in descriptions."""


def parse_docstring(doc: str | None) -> tuple[str, str, dict[str, str]]:
    """Split a Google-style docstring into (summary, description, {parameter: help}).

    The summary is the first paragraph joined into one line; the description is all text
    before the first section header; parameter help comes from the `Args:` section, with
    indented continuation lines joined to their entry.
    """
    text = inspect.cleandoc(doc or "")
    lines = text.splitlines()
    body: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    current_indent = 0
    for line in lines:
        header = _SECTION.match(line)
        if header:
            section, current = header.group(1), None
            continue
        if section is None:
            body.append(line)
        elif section in ("Args", "Arguments", "Parameters") and line.strip():
            indent = len(line) - len(line.lstrip())
            entry = _ARG_LINE.match(line.strip())
            if entry and (current is None or indent <= current_indent):
                current, current_indent = entry.group(1).lstrip("*"), indent
                params[current] = entry.group(3).strip()
            elif current is not None:
                params[current] = f"{params[current]} {line.strip()}".strip()
    description = "\n".join(body).strip()
    summary = " ".join(description.split("\n\n", 1)[0].split())
    return summary, description, params


def _strip_optional(tp: object) -> object:
    """`X | None` and `Optional[X]` -> X; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _value_kwargs(tp: object, where: str) -> dict[str, object]:
    """argparse keywords (type / choices) for one scalar value of annotation `tp`."""
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1 or not kinds <= set(_SCALARS):
            raise TypeError(f"{where}: Literal choices must share one of int/float/str, got {choices!r}")
        return {"type": kinds.pop(), "choices": choices}
    if tp in _SCALARS:
        return {"type": tp}
    raise TypeError(
        f"{where}: unsupported annotation {tp!r}; use int, float, str, pathlib.Path, bool (with a "
        "default), Literal[...], list[...] or X | None"
    )


def add_verb(subparsers: argparse._SubParsersAction, name: str, fn: Callable) -> argparse.ArgumentParser:
    """Add the sub-parser `name` for `fn`, derived from its signature and docstring."""
    summary, description, param_help = parse_docstring(fn.__doc__)
    parser = subparsers.add_parser(
        name, help=summary, description=description or None, formatter_class=_HelpFormatter
    )
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        where = f"{fn.__name__}({param.name})"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{where}: *args / **kwargs cannot be turned into a command line")
        if param.name not in hints:
            raise TypeError(f"{where}: parameter needs a type annotation to become a command-line argument")
        tp = _strip_optional(hints[param.name])
        positional = param.default is inspect.Parameter.empty
        kwargs: dict[str, object] = {"help": param_help.get(param.name, "").replace("%", "%%")}
        if tp is bool:
            if positional:
                raise TypeError(f"{where}: a bool parameter needs a default (it becomes --flag/--no-flag)")
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp) or (str,)
            kwargs.update(_value_kwargs(item, where), nargs="+")
        else:
            kwargs.update(_value_kwargs(tp, where))
        if positional:
            kwargs["metavar"] = param.name.upper()
            parser.add_argument(param.name, **kwargs)
        else:
            option = "--" + param.name.replace("_", "-")
            parser.add_argument(option, dest=param.name, default=param.default, **kwargs)
    parser.set_defaults(_fn=fn, _verb=name)
    return parser


Verbs = Mapping[str, "Callable | Verbs"]  # a group (e.g. `lmforge data ...`) maps to its own verbs


def _add_verbs(subparsers: argparse._SubParsersAction, verbs: Verbs, prefix: str) -> None:
    for name, entry in verbs.items():
        if isinstance(entry, Mapping):
            first = next(iter(entry.values()))
            doc = inspect.getmodule(first).__doc__ if inspect.getmodule(first) else ""
            summary = parse_docstring(doc)[0]
            group = subparsers.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)
            sub = group.add_subparsers(title="verbs", metavar="VERB", dest=f"_{prefix}{name}", required=True)
            _add_verbs(sub, entry, f"{prefix}{name} ")
        else:
            add_verb(subparsers, name, entry).set_defaults(_verb=f"{prefix}{name}")


def build_parser(verbs: Verbs, prog: str, description: str = "") -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per verb (or group of verbs), in the order of `verbs`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    subparsers = parser.add_subparsers(title="verbs", metavar="VERB", dest="_verb", required=True)
    _add_verbs(subparsers, verbs, "")
    return parser


def call(args: argparse.Namespace) -> object:
    """Call the verb chosen in `args` with the parsed values."""
    fn = args._fn
    return fn(**{name: getattr(args, name) for name in inspect.signature(fn).parameters})


_DOTTED = re.compile(r"^--[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def _gather_overrides(argv: Sequence[str] | None) -> list[str]:
    """`--section.key=value` arguments become values of the verb's `overrides: list[str]` parameter."""
    argv = list(sys.argv[1:] if argv is None else argv)
    dotted = [a[2:] for a in argv if _DOTTED.match(a)]
    rest = [a for a in argv if not _DOTTED.match(a)]
    return [*rest, "--overrides", *dotted] if dotted else rest


def run(verbs: Verbs, argv: Sequence[str] | None, prog: str, description: str = "") -> int:
    """Parse `argv`, run the chosen verb and return the process exit code.

    A verb returning an int returns that code, anything else returns 0. User errors
    become one line on stderr and exit code 2 (argparse's own code for bad usage).
    """
    args = build_parser(verbs, prog, description).parse_args(_gather_overrides(argv))
    try:
        result = call(args)
    except Exception as err:
        # usage errors exit 2; an error class may carry its own `exit_code` (e.g. 1: unreachable registry)
        code = 2 if isinstance(err, USER_ERRORS) else getattr(err, "exit_code", None)
        if code is None or os.environ.get("LMFORGE_DEBUG", "") not in ("", "0"):
            raise
        print(f"{prog} {args._verb}: error: {err}", file=sys.stderr)
        return code
    except BrokenPipeError:  # output piped into e.g. `head`, which exited early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
