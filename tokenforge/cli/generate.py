"""`tokenforge generate PROMPT...`: run prompts through the local engine and print the outputs."""

import argparse
import json
import sys
import time

from tokenforge.cli.engine_args import add_engine_args, engine_config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="generate text offline with the local engine",
                                   description=__doc__)
    parser.add_argument("prompts", nargs="*", help="prompts (default: read one per line from stdin)")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template (as a user message)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_args(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from tokenforge.engine.factory import build_engine_core
    from tokenforge.engine.llm import LLM
    from tokenforge.sampling_params import SamplingParams

    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    llm = LLM(engine=build_engine_core(engine_config_from_args(args)))
    started = time.monotonic()
    if args.chat:
        results = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        results = llm.generate(prompts, params)
    elapsed = time.monotonic() - started
    num_tokens = 0
    for prompt, result in zip(prompts, results):
        out = result.outputs[0]
        num_tokens += len(out.token_ids)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "finish_reason": out.finish_reason.value,
                              "completion_tokens": len(out.token_ids)}))
        else:
            print(f"--- {prompt!r}\n{out.text}\n[{out.finish_reason.value}, {len(out.token_ids)} tokens]")
    print(f"{num_tokens} tokens in {elapsed:.2f} s ({num_tokens / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0
