"""Sample text from OpenAI's GPT-2, a Hugging Face GPT-2 directory, or one of our checkpoints.

    python sample.py --init gpt2 --prompt "Hello, I'm a language model," --num_samples 4 --max_new_tokens 64
    python sample.py --init out/shakespeare-char --prompt "ROMEO:"      # newest checkpoint of a run

Text is printed as it is generated.
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
from collections.abc import Callable, Iterator

import torch

from addition import answer_problems
from checkpoint import load_model
from devices import autocast, pick_device, pick_dtype
from model import LanguageModel
from tokenizer import Tokenizer


def token_bytes(tokenizer: Tokenizer) -> Callable[[int], bytes]:
    """The UTF-8 bytes of one token: tiktoken's table for BPE (a token may hold part of a character), else its text."""
    enc = getattr(tokenizer, "enc", None)
    if enc is not None:
        return enc.decode_single_token_bytes
    return lambda t: tokenizer.decode([t]).encode("utf-8")


def stream_text(tokenizer: Tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """Turn a stream of token ids into a stream of text pieces, holding back incomplete UTF-8 characters.

    Each token's bytes go through an incremental UTF-8 decoder once (linear time), which yields exactly what
    decoding all the tokens at the end would: invalid bytes become U+FFFD either way.
    """
    to_bytes = token_bytes(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in tokens:
        piece = decoder.decode(to_bytes(t))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def sample(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    generator: torch.Generator,
    device: str,
    dtype: torch.dtype = torch.float32,
    **sampling,
) -> Iterator[str]:
    """Yield the text of one sample piece by piece, starting with the prompt."""
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        if tokenizer.eot is None:
            raise ValueError("an empty prompt needs a tokenizer with an end-of-text token; give --prompt")
        ids = [tokenizer.eot]  # GPT-2 starts unconditioned text after <|endoftext|>
    else:
        yield prompt
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    with autocast(device, dtype):
        stream = model.generate_stream(
            idx, max_new_tokens, generator=generator, eot=tokenizer.eot, vocab_size=tokenizer.vocab_size, **sampling
        )
        yield from stream_text(tokenizer, (int(t[0]) for t in stream if tokenizer.eot is None or t[0] != tokenizer.eot))


def check_flags(args: argparse.Namespace) -> None:
    """Refuse sampling settings that mean nothing (or silently sample from nothing) in one line naming the flag."""
    rules = [
        ("--num_samples", args.num_samples, args.num_samples >= 1, "at least 1"),
        ("--max_new_tokens", args.max_new_tokens, args.max_new_tokens >= 0, "0 or more"),
        ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
         "a finite number >= 0 (0 is greedy)"),
        ("--top_k", args.top_k, args.top_k >= 1, "at least 1 (a value >= the vocabulary size keeps every token)"),
        ("--top_p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1] (1 keeps every token)"),
    ]
    for flag, value, ok, need in rules:
        if not ok:
            sys.exit(f"error: {flag} {value} is out of range; it must be {need}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="gpt2",
                   help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a HF dir, a checkpoint or a run dir")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context every token")
    args = p.parse_args(argv)
    check_flags(args)
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(device, args.dtype)
        model, tokenizer = load_model(args.init)
        model.to(device).eval()
        if tokenizer.name == "addition":  # a problem has one answer: greedy, in normal digit order
            print(answer_problems(model, tokenizer, [args.prompt], device)[0], flush=True)
            return
        generator = torch.Generator(device=device).manual_seed(args.seed)
        for i in range(args.num_samples):
            print(f"--- sample {i} ---", flush=True)
            pieces = sample(model, tokenizer, args.prompt, args.max_new_tokens, generator, device, dtype,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            use_cache=not args.no_cache)
            for piece in pieces:
                print(piece, end="", flush=True)
            print(flush=True)
    except ValueError as e:  # includes CheckpointError and unknown prompt characters
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
