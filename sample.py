r"""Sample text from OpenAI's GPT-2, a Hugging Face GPT-2 directory, or one of our checkpoints.

    python sample.py --init gpt2 --prompt "Hello, I'm a language model," --num_samples 4 --max_new_tokens 64
    python sample.py --init out/shakespeare-char --prompt "ROMEO:"      # newest checkpoint of a run
    python sample.py --init gpt2 --prompt_file prompts.txt --temperature 0 --max_new_tokens 32

Text is printed as it is generated. With --prompt_file every line of the file is a prompt; they are generated in
batches of --batch_size, and output line i is the completion of input line i alone (no prompt, no header), with
backslash, newline, carriage return and the other line breaks written as Python escapes (\\, \n, \r, \x0b,
\u2028, ...) so that every completion stays on its line. An empty line is a prompt of <|endoftext|> alone.
An addition run answers each problem (--prompt, or every line of --prompt_file) greedily: flags it would not use
are refused (--temperature 0, greedy, is accepted).
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
from collections.abc import Callable, Iterator

import torch

from gpt2repro.addition import answer_problems
from gpt2repro.checkpoint import load_model
from gpt2repro.devices import autocast, pick_device, pick_dtype, quiet_library_logs
from gpt2repro.errors import STDOUT, describe_os_error, one_line_errors
from gpt2repro.fileio import read_limited
from gpt2repro.generate import DECODE_PATHS, generate_batch
from gpt2repro.tokenizer import Tokenizer
from model import LanguageModel

DEFAULT_PROMPT = "Hello, I'm a language model,"
DEFAULT_NUM_SAMPLES = 4
DEFAULT_BATCH_SIZE = 32
MAX_PROMPT_FILE = 64 << 20  # bytes of --prompt_file: far more prompts than a run generates for
# what an addition run never reads: it answers every problem greedily, in the answer's fixed length, in fp32
ADDITION_IGNORES = ("num_samples", "batch_size", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "dtype",
                    "no_cache", "decode")
# what str.splitlines breaks a line at; the backslash too, so that the escapes read back unambiguously
LINE_ESCAPES = {ord(c): c.encode("unicode_escape").decode("ascii")
                for c in "\\\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


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


def escape_line(text: str) -> str:
    """`text` on one line: backslash and every line break (as str.splitlines sees them) as Python escapes."""
    return text.translate(LINE_ESCAPES)


def read_lines(path: str, what: str) -> list[bytes]:
    """The lines of --prompt_file (at most MAX_PROMPT_FILE bytes), split at \\n only, a trailing \\r dropped: not
    str.splitlines, which also splits at \\x0b, \\x0c, \\x1c-\\x1e, \\x85 and U+2028/9 inside a line."""
    try:
        data = read_limited(path, MAX_PROMPT_FILE, "--prompt_file")
    except OSError as e:
        raise ValueError(describe_os_error(e, "--prompt_file")) from None
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line starts no prompt
        lines.pop()
    if not lines:
        raise ValueError(f"--prompt_file {path}: the file is empty; write one {what} per line")
    return [line.removesuffix(b"\r") for line in lines]


def decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None


def read_prompts(path: str, tokenizer: Tokenizer) -> list[list[int]]:
    """The tokens of every line of `path` (`read_lines`); an empty line starts from <|endoftext|>. A missing or
    empty file, or a line that does not encode, is a ValueError naming the line."""
    prompts = []
    for number, raw in enumerate(read_lines(path, "prompt"), start=1):
        where = f"--prompt_file {path} line {number}"
        line = decode_line(raw, where)
        try:
            ids = tokenizer.encode(line)
        except ValueError as e:  # a character outside a char-level vocabulary
            raise ValueError(f"{where}: {e}") from None
        if not ids and tokenizer.eot is None:
            raise ValueError(f"{where}: the line is empty and this tokenizer has no end-of-text token to start "
                             "from; remove the line")
        prompts.append(ids or [tokenizer.eot])
    return prompts


def problem_lines(path: str, tokenizer: Tokenizer) -> list[str]:
    """The problems of an addition run's --prompt_file, one per line (`read_lines`), each checked (a ValueError
    naming the line), so that output line i answers input line i."""
    lines = []
    for number, raw in enumerate(read_lines(path, "problem"), start=1):
        where = f"--prompt_file {path} line {number}"
        line = decode_line(raw, where)
        try:
            tokenizer.parse_problem(line)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        lines.append(line)
    return lines


def complete_lines(model: LanguageModel, tokenizer: Tokenizer, prompts: list[list[int]], batch_size: int,
                   max_new_tokens: int, device: str, dtype: torch.dtype, **sampling) -> Iterator[str]:
    """The completion of every prompt, in order, one escaped line each, generated `batch_size` prompts at a time."""
    for start in range(0, len(prompts), batch_size):
        with autocast(device, dtype):
            rows = generate_batch(model, prompts[start : start + batch_size], max_new_tokens, eot=tokenizer.eot,
                                  vocab_size=tokenizer.vocab_size, **sampling)
        for new in rows:
            yield escape_line(tokenizer.decode(new))


def check_flags(args: argparse.Namespace) -> None:
    """Refuse sampling settings that mean nothing (or silently sample from nothing) in one line naming the flag."""
    if args.prompt_file is not None:
        for flag, value in (("--prompt", args.prompt), ("--num_samples", args.num_samples)):
            if value is not None:
                sys.exit(f"error: {flag} does not go with --prompt_file (one completion per line of the file); "
                         f"drop {flag}")
    elif args.batch_size is not None:
        sys.exit("error: --batch_size only sets how many lines of --prompt_file are generated at once; drop it or "
                 "give --prompt_file")
    rules = [
        ("--num_samples", args.num_samples, args.num_samples is None or args.num_samples >= 1, "at least 1"),
        ("--batch_size", args.batch_size, args.batch_size is None or args.batch_size >= 1, "at least 1"),
        ("--max_new_tokens", args.max_new_tokens, args.max_new_tokens >= 0, "0 or more"),
        ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
         "a finite number >= 0 (0 is greedy)"),
        ("--top_k", args.top_k, args.top_k >= 1, "at least 1 (a value >= the vocabulary size keeps every token)"),
        ("--top_p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1] (1 keeps every token)"),
    ]
    for flag, value, ok, need in rules:
        if not ok:
            sys.exit(f"error: {flag} {value} is out of range; it must be {need}")


def check_addition_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, in one line, a flag an addition run would silently ignore (--temperature 0, greedy, is what it does)."""
    for dest in ADDITION_IGNORES:
        value = getattr(args, dest)
        if value != parser.get_default(dest) and not (dest == "temperature" and value == 0):
            flag = f"--{dest}" + ("" if isinstance(value, bool) else f" {value}")
            sys.exit(f"error: {flag} does not apply to an addition run, which answers each problem greedily; drop "
                     f"--{dest}")


def main(argv: list[str] | None = None) -> None:
    quiet_library_logs()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="gpt2",
                   help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a HF dir, a checkpoint or a run dir")
    p.add_argument("--prompt", default=None, help=f"default: {DEFAULT_PROMPT!r}")
    p.add_argument("--num_samples", type=int, default=None, help=f"default: {DEFAULT_NUM_SAMPLES}")
    p.add_argument("--prompt_file", default=None,
                   help="a prompt per line; prints a completion per line, in order (see above)")
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"prompts generated at once with --prompt_file (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context every token")
    p.add_argument("--decode", default="auto", choices=DECODE_PATHS,
                   help="auto: CUDA graphs on CUDA, eager elsewhere (see generate.py)")
    args = p.parse_args(argv)
    check_flags(args)
    with one_line_errors(path=STDOUT):  # ValueError (CheckpointError, unknown prompt characters), OSError, OOM
        device = pick_device(args.device)
        dtype = pick_dtype(device, args.dtype)
        model, tokenizer = load_model(args.init)
        model.to(device).eval()
        if tokenizer.name == "addition":  # a problem has one answer: greedy, in normal digit order
            check_addition_flags(args, p)
            problems = problem_lines(args.prompt_file, tokenizer) if args.prompt_file else [args.prompt or ""]
            print("\n".join(answer_problems(model, tokenizer, problems, device)), flush=True)
            return
        generator = torch.Generator(device=device).manual_seed(args.seed)
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                        use_cache=not args.no_cache, decode=args.decode)
        if args.prompt_file is not None:
            prompts = read_prompts(args.prompt_file, tokenizer)
            for line in complete_lines(model, tokenizer, prompts, args.batch_size or DEFAULT_BATCH_SIZE,
                                       args.max_new_tokens, device, dtype, **sampling):
                print(line, flush=True)
            return
        for i in range(args.num_samples or DEFAULT_NUM_SAMPLES):
            print(f"--- sample {i} ---", flush=True)
            prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
            for piece in sample(model, tokenizer, prompt, args.max_new_tokens, device=device, dtype=dtype,
                                **sampling):
                print(piece, end="", flush=True)
            print(flush=True)


if __name__ == "__main__":
    main()
