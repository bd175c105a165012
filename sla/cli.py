"""The ``sla`` command line. Each subcommand lives in ``sla/commands/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their command runs,
so ``sla --help`` stays fast and never touches a GPU."""

from __future__ import annotations

import argparse
import importlib
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sla",
        description="SLA (Sparse-Linear Attention) for diffusion transformers. Run `sla COMMAND --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
