"""The `chatforge` command. Each subcommand lives in its own module with `add_arguments` and `run`."""
from __future__ import annotations

import argparse
import importlib

from chatforge.console import run_stage

# subcommand name -> module under chatforge/commands (imported only when used: torch is slow to import)
COMMANDS = {
    "chat": ("chat", "talk to a trained model (interactive, or one reply with -p)"),
    "export": ("export", "write a trained model as GGUF files (f16, q8_0) with Ollama Modelfiles, for llama.cpp and Ollama"),
    "experiment": ("experiment", "run the pipeline as a DVC experiment with a params profile (profiles/*.yaml)"),
    "label": ("label", "rank sampled replies; the judgements become preference pairs for the reward model"),
    "noise": ("noise", "run the pipeline with every seed moved, N times: each metric's spread (reports/noise.json)"),
    "pr-report": ("pr_report", "markdown review of a change against a base revision: metrics judged against noise"),
    "rate": ("rate", "judge blinded A/B replies of the human_eval stage"),
    "serve": ("serve", "OpenAI-compatible API and a web chat page with blinded A/B feedback"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chatforge", description="Train and talk to your own chat model.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        sub.set_defaults(module=module_name)
        importlib.import_module(f"chatforge.commands.{module_name}").add_arguments(sub)
    args = parser.parse_args(argv)
    run_stage(importlib.import_module(f"chatforge.commands.{args.module}").run)(args)


if __name__ == "__main__":
    main()
