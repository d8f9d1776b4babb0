"""`chatforge chat`: talk to a trained model in the terminal, or get one reply for a script (`-p`).

Replies stream to stdout; notes (which model, dropped turns) go to stderr. Reads stdin line by line, so
`printf 'hi\\n/quit\\n' | chatforge chat` works as well as a terminal.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# most trained first; the stage that builds each, for "run `dvc repro …`" hints
MODEL_CHOICES = {Path("models/ppo"): "ppo", Path("models/sft"): "sft", Path("models/base"): "pretrain"}
SAMPLING_FLAGS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "repetition_penalty": float,
    "max_new_tokens": int,
}
HELP = """commands:
  /reset              forget the conversation (the system prompt stays)
  /set KEY=VALUE ...  change a generation setting, e.g. /set temperature=0.5 top_k=20
  /set                show the current settings
  /help               this help
  /quit               leave (Ctrl-D works too)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, help="model directory (default: the best of models/ppo, models/sft, models/base)"
    )
    parser.add_argument("-p", "--prompt", help="print one reply to this message and exit")
    parser.add_argument("--system", help="system prompt that starts the conversation")
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible replies")
    for name, kind in SAMPLING_FLAGS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, help=f"overrides params.yaml generate.{name}"
        )


def run(args: argparse.Namespace) -> None:
    from chatforge.console import console
    from chatforge.inference.loading import load_model
    from chatforge.inference.sampling import default_sampling

    model_dir, stage = _pick_model(args.model)
    sampling = default_sampling().updated(
        {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    )
    model, tokenizer = load_model(model_dir, stage_hint=stage)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        _one_shot(model, tokenizer, system, args.prompt, sampling, args.seed)
        return
    console.print(f"[dim]chatting with {model_dir}; /help for commands[/]")
    Chat(model, tokenizer, system, sampling, args.seed).loop()


def _pick_model(requested: Path | None) -> tuple[Path, str]:
    """The requested directory, or the most trained model that exists, with a note saying which."""
    from chatforge.console import console
    from chatforge.errors import ChatforgeError

    if requested is not None:
        return requested, MODEL_CHOICES.get(requested, "sft")
    for path, stage in MODEL_CHOICES.items():
        if (path / "config.json").exists():
            console.print(f"[dim]model: {path} (the most trained one available; --model DIR picks another)[/]")
            return path, stage
    names = ", ".join(str(path) for path in MODEL_CHOICES)
    raise ChatforgeError(f"no trained model in {names}; run `dvc repro sft` (or pass --model DIR)")


def _one_shot(model, tokenizer, system, prompt, sampling, seed) -> None:
    from chatforge.inference.generate import stream_reply
    from chatforge.inference.prompting import fit_history, prompt_budget

    messages, _ = fit_history(tokenizer, system + [{"role": "user", "content": prompt}], prompt_budget(model, sampling))
    for piece in stream_reply(model, tokenizer, messages, sampling, seed=seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


class Chat:
    """The interactive loop: history, slash commands, streamed replies."""

    def __init__(self, model, tokenizer, system: list[dict], sampling, seed: int | None):
        from rich.console import Console

        self.model, self.tokenizer = model, tokenizer
        self.system, self.sampling, self.seed = system, sampling, seed
        self.history: list[dict] = []
        self.out = Console(highlight=False, soft_wrap=True)
        self.interactive = sys.stdin.isatty()

    def loop(self) -> None:
        while True:
            line = self._read()
            if line is None:
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self._command(line):
                    return
            else:
                self._reply(line)

    def _read(self) -> str | None:
        """The next line typed or piped; None at end of input."""
        if self.interactive:
            try:
                return self.out.input("[bold green]you>[/] ")
            except EOFError:
                return None
        line = sys.stdin.readline()
        return line if line else None

    def _command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        from chatforge.console import console
        from chatforge.errors import ChatforgeError

        name, *words = line.split()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.out.print(HELP, markup=False)
        elif name == "/reset":
            self.history = []
            self.out.print("[dim]conversation reset[/]")
        elif name == "/set":
            try:
                self.sampling = self.sampling.updated(dict(_setting(word) for word in words))
            except ChatforgeError as error:
                console.print(str(error), style="red", markup=False)
                return True
            settings = ", ".join(f"{k}={v}" for k, v in vars(self.sampling).items())
            self.out.print(f"[dim]settings: {settings}[/]")
        else:
            console.print(f"unknown command {name}; /help lists them", style="red", markup=False)
        return True

    def _reply(self, text: str) -> None:
        from chatforge.console import console
        from chatforge.errors import ChatforgeError
        from chatforge.inference.generate import stream_reply
        from chatforge.inference.prompting import fit_history, prompt_budget

        turns = self.history + [{"role": "user", "content": text}]
        try:
            budget = prompt_budget(self.model, self.sampling)
            messages, dropped = fit_history(self.tokenizer, self.system + turns, budget)
        except ChatforgeError as error:
            console.print(str(error), style="red", markup=False)
            return
        if dropped:
            console.print(f"[yellow]context full: forgot the {dropped} oldest turn{'s' * (dropped > 1)}[/]")
        self.history = messages[len(self.system):]
        self.out.print("[bold blue]bot>[/] ", end="")
        pieces = []
        try:
            for piece in stream_reply(self.model, self.tokenizer, messages, self.sampling, seed=self.seed):
                pieces.append(piece)
                self.out.print(piece, end="", markup=False)
                self.out.file.flush()
        except KeyboardInterrupt:
            self.out.print("\n[dim](reply interrupted; it is not kept)[/]")
            self.history.pop()
            return
        self.out.print()
        self.history.append({"role": "assistant", "content": "".join(pieces)})


def _setting(word: str) -> tuple[str, str]:
    from chatforge.errors import ChatforgeError

    name, sep, value = word.partition("=")
    if not sep or not value:
        raise ChatforgeError(f"{word!r}: expected KEY=VALUE, e.g. temperature=0.5")
    return name, value
