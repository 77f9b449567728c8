"""`dynlm generate`: text from any checkpoint (ours, Hugging Face, GGUF, code form)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynlm.errors import ConfigError, ContextLengthError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a model")
    p.add_argument("--model", required=True,
                   help="checkpoint directory, Hugging Face directory, .gguf file, or the name of a known checkpoint "
                        "fetched once into the cache (smollm2-135m-instruct)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", type=Path, help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search with this many beams (deterministic; 1 = off, the default)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: score = sum log p / length ** this (> 0 favours longer answers)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the tokenizer's chat template (default: when it has one)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="feed the prompt as is")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weight dtype (default: as stored; GGUF tensors are dequantized to float32)")
    p.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    p.add_argument("--no-graphs", action="store_true",
                   help="decode eagerly (the reference path); by default CUDA decodes with captured graph steps")
    p.add_argument("--engine", choices=["default", "layered"], default="default",
                   help="layered: weights in host memory, streamed to --device layer by layer")
    p.add_argument("--max-gpu-memory", help="layered engine: cap on the weights held on the device, e.g. 300MB")
    p.add_argument("--int8", action="store_true",
                   help="int8 weight-only linear layers (per-row scales; the layered engine streams them as int8)")
    p.add_argument("--compile", action="store_true",
                   help="decode on the static KV cache with the step compiled by torch.compile (on CUDA the "
                        "compiled step is captured in the graph); the first call compiles for a while")
    p.set_defaults(handler=run)


DTYPES = ("float32", "bfloat16", "float16")


def check_context(model: object, tokenizer: object, prompts: list[str], max_new_tokens: int, chat: bool) -> None:
    """Refuse a prompt plus continuation longer than the model's positions (rather than run a
    model past what it was built for): say by how much and what fits."""
    from dynlm.infer.generate import encode_prompt

    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not positions:
        return
    longest = max(len(encode_prompt(tokenizer, p, chat)) for p in prompts)
    if longest + max_new_tokens > positions:
        room = positions - longest
        raise ContextLengthError(
            f"the prompt ({longest} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
            f"{positions} positions", f"use --max-new-tokens {room} or less" if room > 0 else "shorten the prompt")


def run(args: argparse.Namespace) -> int:
    import torch

    import dynlm
    from dynlm.distributed import resolve_device
    from dynlm.infer.generate import beam_generate, generate, stream_generate
    from dynlm.interop import resolve_named_source
    from dynlm.nn.quant import quantize_linears_int8

    prompts = list(args.prompt)
    if args.prompt_file:
        if not args.prompt_file.is_file():
            raise ConfigError(f"--prompt-file '{args.prompt_file}' not found")
        prompts += [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt given", "use --prompt TEXT or --prompt-file FILE")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise ConfigError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.num_beams > 1:
        sampling = {"--temperature": args.temperature != 0.0, "--top-k": args.top_k != 0, "--top-p": args.top_p != 1.0,
                    "--min-p": args.min_p != 0.0, "--repetition-penalty": args.repetition_penalty != 1.0,
                    "--engine layered": args.engine == "layered"}
        given = [name for name, on in sampling.items() if on]
        if given:
            raise ConfigError(f"--num-beams {args.num_beams} does not combine with {given[0]}",
                              "beam search is deterministic: drop the sampling options")
    elif args.length_penalty != 1.0:
        raise ConfigError("--length-penalty applies to beam search", "add --num-beams 2 or more")
    if args.engine == "layered":
        if args.compile:
            raise ConfigError("--compile applies to the default engine", "drop --compile or --engine layered")
        return run_layered(args, prompts)
    if args.max_gpu_memory:
        raise ConfigError("--max-gpu-memory applies to the layered engine", "add --engine layered")
    device = resolve_device(args.device, what="--device")
    if args.compile and args.no_graphs:
        raise ConfigError("--compile compiles the static-cache step; --no-graphs asks for the eager path",
                          "drop one of them")
    source = resolve_named_source(args.model, lambda message: sys.stderr.write(message + "\n"))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = dynlm.load_pretrained(source, device=device, dtype=dtype)
    if args.int8:
        quantize_linears_int8(model)
    tokenizer = dynlm.load_tokenizer(source)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if args.chat is None else args.chat
    check_context(model, tokenizer, prompts, args.max_new_tokens, chat)
    options = dict(max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed, chat=chat,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty, graphs=False if args.no_graphs else None,
                   compile=args.compile)
    if args.num_beams > 1:
        answers = [beam_generate(model, tokenizer, prompt, args.num_beams, args.max_new_tokens, args.length_penalty,
                                 args.stop, chat) for prompt in prompts]
        for prompt, answer in zip(prompts, answers):
            print(answer if len(prompts) == 1 else f"### {prompt}\n{answer}\n")
    elif len(prompts) == 1 and not args.no_stream:
        answers = [""]
        for piece in stream_generate(model, tokenizer, prompts[0], **options):
            answers[0] += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        answers = generate(model, tokenizer, prompts, **options)
        for prompt, answer in zip(prompts, answers):
            print(f"### {prompt}\n{answer}\n")
    if has_template and not chat and any(not answer.strip() for answer in answers):
        sys.stderr.write("note: an answer is empty: this is a chat model and --raw fed the prompt without its chat "
                         "template, so it may end its turn at once; drop --raw to use the template\n")
    return 0


def run_layered(args: argparse.Namespace, prompts: list[str]) -> int:
    """--engine layered: the model stays in host memory and is streamed to --device."""
    import dynlm
    from dynlm.infer.layered import LayeredEngine, generate_texts, parse_bytes

    cap = parse_bytes(args.max_gpu_memory) if args.max_gpu_memory else None
    model = dynlm.load_pretrained(args.model, device="cpu")
    tokenizer = dynlm.load_tokenizer(args.model)
    engine = LayeredEngine(model, device=args.device, max_gpu_memory=cap, int8=args.int8)
    answers = generate_texts(engine, tokenizer, prompts, args.max_new_tokens, stop=args.stop, seed=args.seed,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty)
    for prompt, answer in zip(prompts, answers):
        print(answer if len(prompts) == 1 else f"### {prompt}\n{answer}\n")
    return 0
