"""forkllm command line: generate | chat | solve | eval | serve | bench (nothing imports this module)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from forkllm.bench.eval import add_eval_parsers
from forkllm.bench.run import add_bench_parser
from forkllm.engine.args import add_engine_args, engine_kwargs
from forkllm.engine.sampling_params import SamplingParams
from forkllm.server.serve import add_serve_parser


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    g.add_argument("--temperature", "-t", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    g.add_argument(
        "--sample-seed", type=int, default=None, help="seed of this generation (same seed, same text)"
    )
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--n", type=int, default=1, help="independent samples per prompt")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def sampling_params(args: argparse.Namespace, **overrides: Any) -> SamplingParams:
    kw = dict(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.sample_seed,
        stop=args.stop,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
    )
    kw.update(overrides)
    return SamplingParams(**kw)


# ---- generate / chat ---------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from forkllm.api import LLM

    llm = LLM(**engine_kwargs(args))
    tok = llm.get_tokenizer()
    prompts = list(args.prompt) or [sys.stdin.read()]
    use_chat = not args.raw and tok.chat_template is not None
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if use_chat else p for p in prompts]
    if len(texts) == 1 and args.n == 1:
        _stream(llm, texts[0], sampling_params(args), add_special=not use_chat)
        return 0
    batch = [{"prompt": t, "prompt_token_ids": tok.encode(t, add_special_tokens=not use_chat)} for t in texts]
    outs = llm.generate(batch, sampling_params(args), use_tqdm=not args.quiet)
    for prompt, out in zip(prompts, outs):
        for c in out.outputs:
            tag = f"[{prompt[:40]!r}" + (f" #{c.index}" if args.n > 1 else "") + f", {c.finish_reason}]"
            print(f"{tag}\n{c.text}\n")
    return 0


def _stream(llm: Any, text: str, params: Any, add_special: bool) -> list[int]:
    """Run one request on the engine, printing text as it is produced; returns the output ids."""
    from forkllm.engine.sampling_params import RequestOutputKind

    engine = llm.engine
    ids = llm.get_tokenizer().encode(text, add_special_tokens=add_special)
    rid = engine.add_request(
        {"prompt": text, "prompt_token_ids": ids}, params.clone(output_kind=RequestOutputKind.DELTA)
    )
    out_ids: list[int] = []
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid:
                    c = out.outputs[0]
                    out_ids += c.token_ids
                    sys.stdout.write(c.text)
                    sys.stdout.flush()
    except KeyboardInterrupt:
        engine.abort_request(rid)
        sys.stdout.write(" [interrupted]")
    sys.stdout.write("\n")
    return out_ids


def cmd_chat(args: argparse.Namespace) -> int:
    from forkllm.api import LLM

    llm = LLM(**engine_kwargs(args))
    tok = llm.get_tokenizer()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    print(
        "forkllm chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr
    )
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = list(system)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        text = tok.apply_chat_template(history)
        try:
            ids = _stream(llm, text, sampling_params(args), add_special=False)
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": tok.decode(ids)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forkllm",
        description="forkllm: LLM inference for parallel generation (paged KV, continuous batching).",
    )
    p.add_argument("--log-level", default="WARNING", help="DEBUG | INFO | WARNING (default) | ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="generate text for one or more prompts (streams a single prompt)",
        description="Generate a completion. With one prompt the text streams to the terminal; "
        "with several they run as one batch. Prompts are wrapped in the model's chat "
        "template unless --raw is given. With no prompt, reads stdin.",
    )
    g.add_argument("prompt", nargs="*", help="prompt text(s)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar for batches")
    add_engine_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "chat",
        help="interactive chat in the terminal (streamed, keeps history)",
        description="Chat with the model. Commands: /reset clears the history, /exit quits.",
    )
    c.add_argument("--system", default=None, help="system prompt")
    add_engine_args(c)
    add_sampling_args(c, max_tokens=512)
    c.set_defaults(func=cmd_chat)

    add_eval_parsers(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"forkllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
