"""The ``sla`` command line. Each subcommand lives in ``sla/commands/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import nothing heavy at their top level
and ``import sla`` is lazy, so building the parser (``sla --help``, ``sla finetune --help``) never imports
torch or touches a GPU (tested); torch is imported inside ``run``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (name, module, one-line help). Add a command by adding a module and one line here.
COMMANDS = [
    ("demo", "sla.commands.demo", "accuracy and CPU speed of SLA against dense attention on generated inputs"),
    ("analyze", "sla.commands.analyze", "measure SLA's premise on a model's own attention: weights, errors, ranks, plots"),
    ("quickstart", "sla.commands.quickstart", "shipped small model -> SLA -> brief fine-tune -> eval vs full attention -> report"),
    ("prepare", "sla.commands.prepare", "encode captioned videos with a Wan pipeline's VAE and text encoder into latents for finetune"),
    ("finetune", "sla.commands.finetune", "fine-tune a diffusers video DiT into SLA (or an ablation) with flow matching"),
    ("eval", "sla.commands.eval", "held-out loss, sample quality, attention error and sparsity of fine-tuned models"),
    ("sample", "sla.commands.sample", "generate a video with a Wan pipeline (+ SLA) to mp4, or small-model clips to PNG/GIF"),
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the line breaks of descriptions and examples. A help text that
    already states its default, and a required option (it has none), is left as written."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are two short lines, not the whole usage block (``sla finetune``'s
    usage alone is 30 lines): what is wrong, with the flag, and where the help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


_DEBUG_HELP = "on an error, show the full Python traceback (also: environment variable SLA_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sla",
        description="SLA (Sparse-Linear Attention) for diffusion transformers. Run `sla COMMAND --help` for details.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
        # Accepted after the command too (`sla finetune ... --debug`); SUPPRESS keeps `sla --debug finetune`.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


# Errors that describe a problem with the user's input or environment: the message is the whole story. (The
# commands raise ValueError for bad values; a TypeError reaching here is more likely a bug, so it gets the
# "unexpected" report with the --debug hint.)
USER_ERRORS = (ValueError, OSError, ImportError, NotImplementedError)


def _debug_requested(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("SLA_DEBUG", "").strip() not in ("", "0")


def format_error(command: str, err: BaseException) -> str:
    """The one- or two-line report of an exception for ``sla COMMAND`` (no traceback)."""
    text = str(err).strip()
    if isinstance(err, KeyError):  # str(KeyError('x')) is "'x'", which says nothing on its own
        text = f"missing key {text}"
    if isinstance(err, USER_ERRORS) and text:
        lines = text.splitlines()
        first = lines[0] if len(lines) == 1 else lines[0] + " ..."
        return f"sla {command}: error: {first}"
    # Anything else is unexpected (a bug, or a library failing inside): say so, and how to see more.
    summary = text.splitlines()[0] if text else ""
    summary = summary if len(summary) <= 300 else summary[:300] + "..."
    return (f"sla {command}: unexpected {type(err).__name__}" + (f": {summary}" if summary else "")
            + "\n(run again with --debug, or SLA_DEBUG=1, for the traceback)")


def main(argv: list[str] | None = None) -> int:
    """Run ``sla ARGV``; returns the exit status.

    Errors are reported on stderr in one or two lines without a traceback (exit status 2 for bad input,
    1 for unexpected failures, 130 for Ctrl-C); ``--debug`` or ``SLA_DEBUG=1`` lets the exception propagate
    with its traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args._argv = argv  # lets a command print a command line to repeat, e.g. finetune's resume hint
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        if _debug_requested(args):
            raise
        print(f"sla {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's one place that turns exceptions into messages
        if _debug_requested(args):
            raise
        print(format_error(args.command, err), file=sys.stderr)
        return 2 if isinstance(err, USER_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
