"""`chatforge serve`: an OpenAI-compatible API and a web chat page (with blinded A/B feedback) for your models.

    chatforge serve                                  # models/sft, models/ppo, models/base: those that exist
    chatforge serve --model sft=models/sft --model ppo=models/ppo --port 8000 --max-batch 32
    chatforge serve --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"   # every route then needs the key
    chatforge serve --collect-feedback               # the page's A/B mode writes ratings and labels to data/
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

API_KEY_ENV = "CHATFORGE_API_KEY"  # the key without putting it on the command line (where `ps` shows it)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", metavar="[NAME=]DIR",
                        help="a model directory to serve, optionally named (repeat for several); "
                             "default: whichever of models/sft, models/ppo, models/base exist")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=32,
                        help="sequences one model decodes together, one forward step for all (default 32)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="sequences that may wait per model for a place in the batch; beyond, the server "
                             "answers 429 with Retry-After (default 64)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body; larger ones get 413 (default 1 MiB)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="the largest max_tokens a request may ask for (default: the longest served context)")
    parser.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on every route (default: ${API_KEY_ENV}, else "
                             "none); the chat page asks for it as a password")
    parser.add_argument("--collect-feedback", action="store_true",
                        help="serve the A/B routes, which write the page's choices as human-eval ratings and "
                             "preference labels under --data-dir (training data: off by default)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="where A/B choices go: <dir>/human_ratings.jsonl and <dir>/labels/ (default data)")


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from chatforge.console import log
    from chatforge.errors import ChatforgeError
    from chatforge.inference.sampling import default_sampling
    from chatforge.serving.app import create_app
    from chatforge.serving.schemas import MAX_CHOICES
    from chatforge.serving.worker import ModelRegistry, model_specs

    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, MAX_CHOICES),
                               ("--max-body-bytes", args.max_body_bytes, 1024), ("--max-tokens", args.max_tokens, 1)):
        if value is not None and value < least:
            raise ChatforgeError(f"{flag} {value}: must be at least {least}")
    specs = model_specs(args.model)
    if args.collect_feedback and len(specs) < 2:
        raise ChatforgeError("--collect-feedback compares two models blinded; serve at least two (--model NAME=DIR)")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    sampling = default_sampling()
    registry = ModelRegistry.load(specs, args.max_batch, args.max_queue)
    for spec in specs:
        log("serve", f"model {spec.name!r} from {spec.path} (context {registry.workers[spec.name].context_length})")
    log("serve", f"sampling defaults (params.yaml generate): {sampling}")
    log("serve", f"batches of up to {args.max_batch} sequences per model, {args.max_queue} more may wait")
    log("serve", f"chat page http://{args.host}:{args.port}/  ·  API http://{args.host}:{args.port}/v1")
    log("serve", "API key required on every route" if api_key else
        "no API key: anyone who reaches this address may use it (--api-key)")
    log("serve", f"A/B choices are written to {args.data_dir}" if args.collect_feedback else
        "feedback collection off: the A/B routes are not served (--collect-feedback)")
    app = create_app(registry, sampling, args.data_dir, max_body_bytes=args.max_body_bytes, api_key=api_key,
                     collect_feedback=args.collect_feedback, max_tokens=args.max_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
