"""sample.py: streams text from checkpoints and HF dirs, seeded, with clear errors."""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shakespeare

from gpt2repro.checkpoint import from_checkpoint, load_pretrained, model_checkpoint_fields, save_checkpoint
from gpt2repro.tokenizer import get_tokenizer
from model import GPT, GPTConfig
from sample import escape_line, main, stream_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def char_ckpt(tmp_path):
    tok = get_tokenizer("char", text="abcdefgh ROMEO:\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    path = tmp_path / "run" / "ckpt_0000010.pt"
    save_checkpoint({**model_checkpoint_fields(model, tok), "step": 10}, path)
    return path


def test_stream_text_holds_back_split_characters():
    tok = get_tokenizer("gpt2")
    text = "naïve café 日本語 🙂 done"
    ids = tok.encode(text)
    pieces = list(stream_text(tok, iter(ids)))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def random_streams(vocab_size: int, n: int, seed: int) -> list[list[int]]:
    """Random token streams, half of them from GPT-2's byte-fragment tokens (ids < 256 and merges of partial
    characters) so that multi-byte characters are split across tokens and invalid UTF-8 appears."""
    rng = random.Random(seed)
    streams = []
    for i in range(n):
        hi = 256 if i % 2 == 0 else vocab_size
        streams.append([rng.randrange(hi) for _ in range(rng.randint(0, 60))])
    return streams


def test_stream_text_equals_the_full_decode_on_random_tokens():
    tok = get_tokenizer("gpt2")
    # text whose characters are split across tokens, then random ids (invalid UTF-8 included)
    cases = [tok.encode("naïve café 日本語 🙂 done ¿qué? 𝔘𝔫𝔦𝔠𝔬𝔡𝔢")] + random_streams(tok.vocab_size, 300, seed=0)
    for ids in cases:
        assert "".join(stream_text(tok, iter(ids))) == tok.decode(ids), ids
    char = get_tokenizer("char", text="abc ROMEO:\néü🙂")
    for ids in random_streams(char.vocab_size, 50, seed=1):
        ids = [i % char.vocab_size for i in ids]
        assert "".join(stream_text(char, iter(ids))) == char.decode(ids)


class CountingTokenizer:
    """A GPT-2 tokenizer that counts the token ids and bytes every decode call is given."""

    def __init__(self, tok) -> None:
        self.tok, self.name, self.eot, self.vocab_size = tok, tok.name, tok.eot, tok.vocab_size
        self.ids_decoded = 0
        outer = self

        class Enc:  # tiktoken's per-token byte lookup, counted
            def decode_single_token_bytes(self, t: int) -> bytes:
                outer.ids_decoded += 1
                return tok.enc.decode_single_token_bytes(t)

            def decode_bytes(self, ids: list[int]) -> bytes:
                outer.ids_decoded += len(ids)
                return tok.enc.decode_bytes(ids)

            def decode(self, ids: list[int], errors: str = "replace") -> str:
                outer.ids_decoded += len(ids)
                return tok.enc.decode(ids, errors=errors)

        self.enc = Enc()

    def decode(self, ids: list[int]) -> str:
        self.ids_decoded += len(ids)
        return self.tok.decode(ids)


def test_stream_text_decodes_each_token_once():
    """Linear time, counted rather than timed: decoding n tokens looks at O(n) ids, not the O(n^2) of re-decoding
    the whole text at every token."""
    tok = get_tokenizer("gpt2")
    ids = tok.encode(shakespeare().read_text(encoding="utf-8")[:20_000])
    for n in (500, 2000):
        counting = CountingTokenizer(tok)
        assert "".join(stream_text(counting, iter(ids[:n]))) == tok.decode(ids[:n])
        assert counting.ids_decoded <= 2 * n, (n, counting.ids_decoded)


def test_sample_cli_from_run_dir_is_seeded(char_ckpt, capsys):
    args = ["--init", str(char_ckpt.parent), "--prompt", "ROMEO:", "--num_samples", "2", "--max_new_tokens", "20",
            "--seed", "3", "--device", "cpu"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first
    samples = first.split("--- sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("ROMEO:") for s in samples)
    assert all(len(s.split("\n", 1)[1].rstrip("\n")) == len("ROMEO:") + 20 for s in samples)


def test_sample_cli_greedy_matches_model_generate(char_ckpt, capsys):
    main(["--init", str(char_ckpt), "--prompt", "abc", "--num_samples", "1", "--max_new_tokens", "15",
          "--temperature", "0", "--device", "cpu"])
    out = capsys.readouterr().out.split("\n", 1)[1].rstrip("\n")
    model, tok = from_checkpoint(char_ckpt)
    ref = model.eval().generate(torch.tensor([tok.encode("abc")]), 15, temperature=0, use_cache=False)
    assert out == tok.decode(ref[0].tolist())


def test_sample_cli_hf_dir(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path)
    main(["--init", str(tmp_path), "--num_samples", "1", "--max_new_tokens", "5", "--device", "cpu"])
    assert "Hello, I'm a language model," in capsys.readouterr().out


def test_sample_cli_errors_are_one_line(char_ckpt, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = [
        (["--init", str(char_ckpt), "--prompt", "xyz"], "character 'x' is not in"),
        (["--init", str(tmp_path / "missing.pt")], "no such file"),
    ]
    for args, message in cases:
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                           cwd=ROOT, env=env)
        assert r.returncode != 0
        assert message in r.stderr and "Traceback" not in r.stderr


def greedy_completion(model, tok, line: str, n: int) -> str:
    """Reference: one line alone, recomputed from scratch at every token."""
    ids = tok.encode(line)
    out = model.generate(torch.tensor([ids]), n, temperature=0, use_cache=False)[0, len(ids) :].tolist()
    return tok.decode(out)


def test_prompt_file_prints_one_completion_per_line_in_order(char_ckpt, tmp_path, capsys):
    lines = ["abc", "ROMEO:", "h", "dead beef face", "ab\r", "gg ROMEO: ab cd ef"]  # 1 to 18 characters
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\n".join(lines).encode())  # no newline after the last line
    main(["--init", str(char_ckpt), "--prompt_file", str(prompts), "--batch_size", "4", "--max_new_tokens", "12",
          "--temperature", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    model, tok = from_checkpoint(char_ckpt)
    model.eval()
    want = [escape_line(greedy_completion(model, tok, line.removesuffix("\r"), 12)) for line in lines]
    assert out.split("\n") == want + [""]  # one line each, in order, and nothing else


def test_prompt_file_completions_with_newlines_stay_on_their_line(tmp_path, capsys):
    tok = get_tokenizer("char", text="abc\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():  # the final norm outputs a constant that points at "\n"'s embedding: always "\n"
        nl = tok.encode("\n")[0]
        model.transformer.wte.weight[nl] *= 10
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[nl])
    path = tmp_path / "nl.pt"
    save_checkpoint({**model_checkpoint_fields(model, tok), "step": 1}, path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nbb\nc\n", encoding="utf-8")
    main(["--init", str(path), "--prompt_file", str(prompts), "--max_new_tokens", "3", "--temperature", "0",
          "--device", "cpu"])
    assert capsys.readouterr().out == "\\n\\n\\n\n" * 3


def test_escape_line_keeps_every_completion_on_one_line():
    text = "a\\b\nc\r\nd\x0be\x0cf\x1cg\x85h\u2028i\u2029j\tk é 🙂"
    escaped = escape_line(text)
    assert escaped.splitlines() == [escaped]
    assert escaped == "a\\\\b\\nc\\r\\nd\\x0be\\x0cf\\x1cg\\x85h\\u2028i\\u2029j\tk é 🙂"
    simple = {"\\": "\\", "n": "\n", "r": "\r"}
    unescape = lambda m: simple.get(m.group(1)) or chr(int(m.group(1)[1:], 16))
    assert re.sub(r"\\(\\|n|r|x[0-9a-f]{2}|u[0-9a-f]{4})", unescape, escaped) == text  # reads back


def test_prompt_file_errors_name_the_file_and_line(char_ckpt, tmp_path, capsys):
    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(["--init", str(char_ckpt), "--device", "cpu", "--max_new_tokens", "2", *args])
        return str(e.value.code)

    bad = tmp_path / "bad.txt"
    bad.write_text("abc\nROMEO:\nab xyz\n", encoding="utf-8")
    assert error("--prompt_file", str(bad)).startswith(f"error: --prompt_file {bad} line 3: character 'x'")
    bad.write_bytes(b"abc\n\xff\xfe\n")
    assert error("--prompt_file", str(bad)).startswith(f"error: --prompt_file {bad} line 2: not UTF-8")
    # the char tokenizer has no <|endoftext|> to start an empty line from
    bad.write_text("abc\n\nab\n", encoding="utf-8")
    assert error("--prompt_file", str(bad)).startswith(f"error: --prompt_file {bad} line 2: the line is empty")
    bad.write_text("", encoding="utf-8")
    assert "the file is empty" in error("--prompt_file", str(bad))
    assert str(tmp_path / "missing.txt") in error("--prompt_file", str(tmp_path / "missing.txt"))
    bad.write_text("abc\n", encoding="utf-8")
    assert "--prompt does not go with --prompt_file" in error("--prompt_file", str(bad), "--prompt", "ab")
    assert "--num_samples does not go with" in error("--prompt_file", str(bad), "--num_samples", "2")
    assert "--batch_size 0 is out of range" in error("--prompt_file", str(bad), "--batch_size", "0")
    assert capsys.readouterr().out == ""


def test_prompt_file_empty_line_starts_from_endoftext(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path / "hf")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\nworld, again\n", encoding="utf-8")
    main(["--init", str(tmp_path / "hf"), "--prompt_file", str(prompts), "--max_new_tokens", "6", "--temperature",
          "0", "--device", "cpu"])
    out = capsys.readouterr().out.split("\n")
    model, tok = load_pretrained(str(tmp_path / "hf")).eval(), get_tokenizer("gpt2")
    want = [model.generate(torch.tensor([ids]), 6, temperature=0, use_cache=False, eot=tok.eot)[0, len(ids) :]
            for ids in (tok.encode("Hello"), [tok.eot], tok.encode("world, again"))]
    assert out == [escape_line(tok.decode([t for t in w.tolist() if t != tok.eot])) for w in want] + [""]


def test_sample_from_an_export_uses_the_runs_own_tokenizer(char_ckpt, tmp_path, capsys):
    """A char run's export samples what its checkpoint samples (its vocabulary is in gpt2_repro_tokenizer.json)."""
    import export_hf

    export_hf.export(char_ckpt, tmp_path / "hf", verify=False)
    args = ["--prompt", "abc", "--num_samples", "1", "--max_new_tokens", "15", "--temperature", "0", "--device", "cpu"]
    main(["--init", str(char_ckpt), *args])
    want = capsys.readouterr().out
    main(["--init", str(tmp_path / "hf"), *args])
    assert capsys.readouterr().out == want


def test_sample_from_an_addition_export_answers_as_its_checkpoint(tmp_path, capsys):
    import export_hf
    from gpt2repro.tokenizer import AdditionTokenizer

    tok = AdditionTokenizer(2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=tok.seq_len - 1, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(model_checkpoint_fields(model, tok), tmp_path / "c.pt")
    export_hf.export(tmp_path / "c.pt", tmp_path / "hf", verify=False)
    for init in ("c.pt", "hf"):
        main(["--init", str(tmp_path / init), "--prompt", "12+34=", "--device", "cpu"])
    want, got = capsys.readouterr().out.splitlines()
    assert got == want and want  # an untrained model answers anything, but the same from both


@pytest.mark.parametrize("case", ["no_tokenizer_file", "broken_tokenizer_file"])
def test_hf_dir_whose_tokenizer_does_not_fit_is_one_line(tmp_path, case):
    """A small-vocabulary HF dir with no tokenizer of ours would get GPT-2's 50257 ids: refused, not an IndexError."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_layer=1, n_head=2, n_embd=16, n_positions=32)).save_pretrained(tmp_path)
    if case == "broken_tokenizer_file":
        (tmp_path / "gpt2_repro_tokenizer.json").write_text('{"name": "char"}', encoding="utf-8")
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--init", str(tmp_path), "--device", "cpu",
                        "--max_new_tokens", "2"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and str(tmp_path) in error[0], r.stderr
    assert ("50257 ids but the model only 40" if case == "no_tokenizer_file" else "export the checkpoint again") \
        in error[0]


@pytest.mark.parametrize("flags", ["--temperature 0.5", "--top_k 5", "--top_p 0.9", "--num_samples 2",
                                   "--max_new_tokens 3", "--seed 1", "--dtype bfloat16", "--no_cache",
                                   "--decode eager", "--batch_size 4"])
def test_addition_run_refuses_the_sampling_flags_it_would_ignore(tmp_path, flags):
    """Each would change nothing (answers are greedy, of a fixed length): one line naming it, not silence."""
    from gpt2repro.tokenizer import AdditionTokenizer

    tok = AdditionTokenizer(2)
    model = GPT(GPTConfig(block_size=tok.seq_len - 1, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(model_checkpoint_fields(model, tok), tmp_path / "c.pt")
    (tmp_path / "p.txt").write_text("12+34=\n", encoding="utf-8")
    problems = ["--prompt_file", str(tmp_path / "p.txt")] if "batch_size" in flags else ["--prompt", "12+34="]
    with pytest.raises(SystemExit) as e:
        main(["--init", str(tmp_path / "c.pt"), "--device", "cpu", *problems, *flags.split()])
    assert str(e.value.code).startswith(f"error: {flags} does not apply to an addition run"), e.value.code


@pytest.mark.parametrize("value", ["4", "32"])
def test_batch_size_without_prompt_file_is_refused(char_ckpt, value):
    with pytest.raises(SystemExit, match="^error: --batch_size only sets .* --prompt_file"):
        main(["--init", str(char_ckpt), "--prompt", "abc", "--batch_size", value, "--device", "cpu"])


def test_addition_prompt_file_gives_one_answer_per_line(tmp_path, capsys):
    """Lines are split at \\n only: a form feed, U+2028 or \\x85 inside or ending a line is no line break, so output
    line i answers input line i, and a line holding two problems is refused by its own number."""
    from gpt2repro.tokenizer import AdditionTokenizer

    tok = AdditionTokenizer(2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=tok.seq_len - 1, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(model_checkpoint_fields(model, tok), tmp_path / "c.pt")
    lines = ["12+34=", "5+6=\u2028", "7+8=\x85", "9+10=\x0c", "11+1=\x1e", "3+4=\r"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    main(["--init", str(tmp_path / "c.pt"), "--prompt_file", str(tmp_path / "p.txt"), "--device", "cpu"])
    assert len(capsys.readouterr().out.splitlines()) == len(lines)
    (tmp_path / "p.txt").write_text("12+34=\n1+2=\x0b3+4=\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["--init", str(tmp_path / "c.pt"), "--prompt_file", str(tmp_path / "p.txt"), "--device", "cpu"])
    assert str(e.value.code).startswith(f"error: --prompt_file {tmp_path / 'p.txt'} line 2: "), e.value.code


@pytest.mark.parametrize("flags", [["--prompt_file", "/dev/zero"], ["--prompt", "ab"]])
def test_endless_prompt_file_and_full_stdout_are_one_line(char_ckpt, flags):
    """`--prompt_file /dev/zero` is refused by size (not read until memory runs out); a print to a full stdout
    (`> /dev/full`) is one line naming stdout, not a traceback."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--init", str(char_ckpt), "--device", "cpu",
                               "--max_new_tokens", "4", *flags], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert ("/dev/zero" in lines[0] and "bytes" in lines[0]) if "/dev/zero" in flags else "stdout" in lines[0], lines
