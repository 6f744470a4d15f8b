"""addition.py and the addition tokenizer: layout and reversal, masking, held-out split, exact resume, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gpt2repro.addition import AdditionLoader, exact_match, held_out_problems
from gpt2repro.checkpoint import load_checkpoint
from gpt2repro.tokenizer import AdditionTokenizer, get_tokenizer, tokenizer_from_dict
from model import GPT, GPTConfig, LanguageModel


def naive_layout(a: int, b: int, op: str, digits: int) -> str:
    """The training text of one problem, written out by hand: padded operands, reversed padded answer, '.'."""
    c = a + b if op == "+" else a - b
    return f"{a:0{digits}d}{op}{b:0{digits}d}=" + f"{c:0{digits + 1}d}"[::-1] + "."


def problems_of(tok: AdditionTokenizer, x: torch.Tensor) -> set[tuple[int, int, str]]:
    """(a, b, op) of every row of a batch, read back from its prompt text."""
    out = set()
    for row in x[:, : tok.prompt_len].tolist():
        a, b, op = tok.parse_problem(tok.decode(row))
        out.add((a, b, tok.ops[op]))
    return out


def as_tuples(tok: AdditionTokenizer, problems: list[str]) -> set[tuple[int, int, str]]:
    return {(a, b, tok.ops[op]) for a, b, op in map(tok.parse_problem, problems)}


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("digits,ops", [(3, "+"), (2, "+-"), (5, "-+")])
def test_layout_and_reversal_round_trip(digits, ops):
    tok = AdditionTokenizer(digits, ops)
    rng = np.random.default_rng(0)
    top = 10**digits - 1
    pairs = [(0, 0), (top, top), (top, 1), (1, 0)] + [tuple(rng.integers(0, top + 1, 2)) for _ in range(50)]
    for op in ops:
        a, b = np.array([max(p) if op == "-" else p[0] for p in pairs]), np.array([min(p) if op == "-" else p[1]
                                                                                    for p in pairs])
        seq = tok.sequences(a, b, np.full(len(a), ops.index(op)))
        assert seq.shape == (len(a), tok.seq_len)
        for row, ai, bi in zip(seq.tolist(), a.tolist(), b.tolist(), strict=True):
            assert tok.decode(row) == naive_layout(ai, bi, op, digits)
            assert tok.encode(tok.decode(row)) == row
            answer = ai + bi if op == "+" else ai - bi
            assert tok.decode_answer(row[tok.prompt_len :]) == str(answer)
            assert tok.encode_problem(f"{ai}{op}{bi}=") == row[: tok.prompt_len]


def test_prompt_padding_and_answer_decoding():
    tok = AdditionTokenizer(3)
    assert tok.decode(tok.encode_problem("7+45=")) == "007+045="
    assert tok.decode(tok.encode_problem(" 123+456=\n")) == "123+456="
    assert tok.decode_answer(tok.encode("9750.")) == "579"
    assert tok.decode_answer(tok.encode("9750")) == "579"  # no '.' generated yet
    assert tok.decode_answer(tok.encode("0000.")) == "0"
    assert tok.decode_answer(tok.encode("1.23")) == "1"  # what follows '.' is not part of the answer
    assert tok.eot == tok.encode(".")[0] and tok.vocab_size == 13


@pytest.mark.parametrize("prompt", ["1234+1=", "12+3", "12*3=", "", "+1=", "1+=", "a+b=", "1-2=", "12+3==",
                                    "1 + 2=", "١٢+3="])
def test_malformed_prompts_raise_one_line(prompt):
    tok = AdditionTokenizer(3, "+")
    with pytest.raises(ValueError, match="not a problem of this 3-digit model") as e:
        tok.encode_problem(prompt)
    assert "\n" not in str(e.value) and "like '999+11='" in str(e.value)


def test_negative_subtraction_and_bad_settings_raise():
    with pytest.raises(ValueError, match="write it as '2-1='"):
        AdditionTokenizer(3, "+-").encode_problem("1-2=")
    for digits, ops, match in [(0, "+", "--digits 0"), (10, "+", "--digits 10"), (3, "*", "--ops"),
                               (3, "++", "--ops"), (3, "", "--ops")]:
        with pytest.raises(ValueError, match=match):
            AdditionTokenizer(digits, ops)
    with pytest.raises(ValueError, match="character 'x' is not in"):
        AdditionTokenizer(3).encode("1x")


def test_tokenizer_serialises():
    tok = get_tokenizer("addition", digits=4, ops="+-")
    again = tokenizer_from_dict(tok.to_dict())
    assert isinstance(again, AdditionTokenizer)
    assert tok.to_dict() == {"name": "addition", "digits": 4, "ops": "+-"} == again.to_dict()
    assert again.encode_problem("12-3=") == tok.encode_problem("12-3=")


# ----------------------------------------------------------------------------- loader


def test_targets_are_the_answer_only():
    tok = AdditionTokenizer(3, "+-")
    x, y = AdditionLoader(tok, 32, tok.seq_len + 2).next_batch()  # 3 positions of padding
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (32, tok.seq_len + 2)
    n, p = tok.seq_len - 1, tok.prompt_len
    assert (y[:, : p - 1] == -1).all() and (y[:, n:] == -1).all()
    assert torch.equal(y[:, p - 1 : n - 1], x[:, p:n])  # next-token targets over the answer
    assert (y[:, n - 1] == tok.eot).all()
    for row in torch.cat([x[:, :n], y[:, n - 1 :n]], dim=1).tolist():
        a, b, op = tok.parse_problem(tok.decode(row[:p]))
        assert tok.decode(row) == naive_layout(a, b, tok.ops[op], 3)


def test_loss_is_masked_to_the_answer():
    torch.manual_seed(0)
    tok = AdditionTokenizer(2)
    T = tok.seq_len - 1
    model = GPT(GPTConfig(block_size=T, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    x, y = AdditionLoader(tok, 8, T).next_batch()
    logits, _ = model(x)  # every position's logits, computed apart from the (chunked) loss
    _, loss = model(x, y)
    logits = logits.detach().double()
    # naive reference: one cross-entropy per answer token, read from the text of the problem itself
    terms = []
    for r in range(len(x)):
        a, b, op = tok.parse_problem(tok.decode(x[r, : tok.prompt_len].tolist()))
        full = tok.encode(naive_layout(a, b, tok.ops[op], 2))
        for i in range(tok.prompt_len - 1, len(full) - 1):
            terms.append(F.cross_entropy(logits[r, i][None], torch.tensor([full[i + 1]])))
    assert len(terms) == 8 * tok.answer_len
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    # the problem's own positions are ignored: any targets there leave the loss as it is
    y2 = y.clone()
    y2[:, : tok.prompt_len - 1] = -1
    assert (y[:, : tok.prompt_len - 1] == -1).all() and model(x, y2)[1].item() == loss.item()
    # with the problem positions unmasked the loss is another number, so the mask is what made it equal
    _, unmasked = model(x, torch.cat([x[:, 1:], y[:, -1:]], dim=1))
    assert abs(unmasked.item() - loss.item()) > 1e-3


@pytest.mark.parametrize("digits,ops", [(2, "+-"), (3, "+")])
def test_held_out_problems_are_never_served_for_training(digits, ops):
    tok = AdditionTokenizer(digits, ops)
    held = held_out_problems(tok, seed=7, n=10**9)
    held_set = as_tuples(tok, held)
    space = len(ops) * 10 ** (2 * digits)
    assert len(held_set) == len(held) and 0.005 * space < len(held) < 0.015 * space  # about 1%, no repeats
    loader = AdditionLoader(tok, 256, tok.seq_len - 1, seed=7)
    served = set().union(*(problems_of(tok, loader.next_batch()[0]) for _ in range(200)))
    assert len(served) > 0.3 * min(space, 200 * 256)  # many distinct problems were drawn
    assert not served & held_set
    val = AdditionLoader(tok, 256, tok.seq_len - 1, seed=7, split="val")
    assert problems_of(tok, val.next_batch()[0]) <= held_set
    other = as_tuples(tok, held_out_problems(tok, seed=8, n=10**9))
    assert other != held_set and other & held_set != other  # the seed picks the split


def test_held_out_problems_are_fixed_by_the_seed():
    tok = AdditionTokenizer(3, "+-")
    first = held_out_problems(tok, seed=1, n=1000)
    assert first == held_out_problems(tok, seed=1, n=1000) and len(set(first)) == 1000
    assert held_out_problems(tok, seed=1, n=10) == first[:10]
    assert {op for _, _, op in as_tuples(tok, first)} == {"+", "-"}
    big = AdditionTokenizer(6)  # too many problems to list: drawn instead
    drawn = held_out_problems(big, seed=1, n=300)
    assert drawn == held_out_problems(big, seed=1, n=300) and len(set(drawn)) == 300
    served = set().union(*(problems_of(big, AdditionLoader(big, 512, big.seq_len - 1, seed=1).next_batch()[0])
                           for _ in range(5)))
    assert not served & as_tuples(big, drawn)


def test_exact_resume():
    tok = AdditionTokenizer(3, "+-")
    loader = AdditionLoader(tok, 16, tok.seq_len - 1, seed=3)
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(3)]
    again = AdditionLoader(tok, 16, tok.seq_len - 1, seed=99)
    again.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, (again.next_batch() for _ in range(3)), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    again.reset()
    first = AdditionLoader(tok, 16, tok.seq_len - 1, seed=3).next_batch()
    assert torch.equal(again.next_batch()[0], first[0])
    with pytest.raises(ValueError, match="--digits 3 --ops \\+-, this run has --digits 2"):
        AdditionLoader(AdditionTokenizer(2, "+-"), 16, 9).load_state_dict(state)
    with pytest.raises(ValueError, match="not from an addition run"):
        loader.load_state_dict({"epoch": 0, "shard": 0, "position": 0})


def test_ranks_draw_distinct_rows_of_one_step():
    tok = AdditionTokenizer(3)
    T = tok.seq_len - 1
    whole = AdditionLoader(tok, 12, T, seed=5)
    ranks = [AdditionLoader(tok, 4, T, rank=r, world_size=3, seed=5) for r in range(3)]
    for _ in range(2):
        x, y = whole.next_batch()
        parts = [ld.next_batch() for ld in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_block_size_too_short_and_bad_split():
    tok = AdditionTokenizer(3)
    with pytest.raises(ValueError, match="--block_size 11 is shorter .* use --block_size 12"):
        AdditionLoader(tok, 4, 11)
    with pytest.raises(ValueError, match="split must be"):
        AdditionLoader(tok, 4, 12, split="test")


# ----------------------------------------------------------------------------- evaluation and learning


class Oracle(LanguageModel):
    """Answers by arithmetic on the prompt text (wrong on problems whose a is in `wrong_for`)."""

    def __init__(self, tok: AdditionTokenizer, wrong_for: frozenset = frozenset()) -> None:
        super().__init__()
        self.tok, self.wrong_for = tok, wrong_for

    def next_logits(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(idx.size(0), self.tok.vocab_size)
        for r, row in enumerate(idx.tolist()):
            a, b, op = self.tok.parse_problem(self.tok.decode(row[: self.tok.prompt_len]))
            text = naive_layout(a + (a in self.wrong_for), b, self.tok.ops[op], self.tok.digits)
            logits[r, self.tok.stoi[text[len(row)]]] = 1.0
        return logits


def test_exact_match_scores_whole_answers():
    tok = AdditionTokenizer(3, "+-")
    problems = held_out_problems(tok, seed=0, n=40)
    assert exact_match(Oracle(tok), tok, problems, "cpu", batch_size=16) == 1.0
    a_of = [tok.parse_problem(p)[0] for p in problems]
    wrong = frozenset(a_of[:3])
    expected = sum(a not in wrong for a in a_of) / len(a_of)
    assert exact_match(Oracle(tok, wrong), tok, problems, "cpu", batch_size=7) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least one problem"):
        exact_match(Oracle(tok), tok, [], "cpu")


@pytest.fixture
def one_thread():
    """A model this small gains nothing from intra-op threads, and on a busy shared CPU they only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_two_digit_run_learns_above_chance(one_thread):
    torch.manual_seed(0)
    tok = AdditionTokenizer(2)
    T = tok.seq_len - 1
    model = GPT(GPTConfig(block_size=T, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64))
    opt = model.configure_optimizers(0.0, 3e-3, betas=(0.9, 0.99), verbose=False)
    loader = AdditionLoader(tok, 64, T, seed=0)
    problems = held_out_problems(tok, seed=0)
    before = exact_match(model, tok, problems, "cpu")
    for _ in range(300):  # enough steps to clear the bar below by a wide margin for seeds 0-2
        x, y = loader.next_batch()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = exact_match(model, tok, problems, "cpu")
    # guessing an answer among 199 sums is right 0.5% of the time
    assert before < 0.05 and after > 0.2, (before, after, loss.item())


def test_trainer_and_sample_speak_addition(tmp_path, capsys):
    """`--preset addition` through the trainer: held-out exact match logged at every eval, exact resume, and
    sample.py answering in normal digit order (a one-line error for a malformed problem)."""
    import json

    import sample
    import train_gpt2

    flags = ["--preset", "addition", "--digits", "2", "--block_size", "9", "--n_layer", "1", "--n_embd", "32",
             "--batch_size", "16", "--total_batch_size", "144", "--eval_interval", "2", "--device", "cpu",
             "--ckpt_interval", "2", "--keep_last", "0"]
    train_gpt2.main(flags + ["--max_steps", "4", "--out_dir", str(tmp_path / "a")])
    events = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(e["step"] for e in events if "addition_acc" in e) == [0, 2, 4]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ckpt_0000002.pt").write_bytes((tmp_path / "a" / "ckpt_0000002.pt").read_bytes())
    train_gpt2.main(flags + ["--max_steps", "4", "--out_dir", str(tmp_path / "b"), "--resume", "auto"])
    a = load_checkpoint(tmp_path / "a" / "ckpt_0000004.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "ckpt_0000004.pt")["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    capsys.readouterr()
    sample.main(["--init", str(tmp_path / "a"), "--prompt", "12+34=", "--temperature", "0", "--device", "cpu"])
    answer = capsys.readouterr().out.strip()
    assert 1 <= len(answer) <= 3, answer  # at most the answer's 3 digits, whatever an untrained model says
    with pytest.raises(SystemExit, match="not a problem of this 2-digit model"):
        sample.main(["--init", str(tmp_path / "a"), "--prompt", "123+4=", "--device", "cpu"])


def test_prompt_file_of_problems_answers_each_line(tmp_path, capsys):
    import sample

    tok = AdditionTokenizer(2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=tok.seq_len - 1, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    from gpt2repro.checkpoint import model_checkpoint_fields, save_checkpoint

    save_checkpoint(model_checkpoint_fields(model, tok), tmp_path / "c.pt")
    (tmp_path / "p.txt").write_text("12+34=\n9+9=\n99+99=\n")
    sample.main(["--init", str(tmp_path / "c.pt"), "--prompt_file", str(tmp_path / "p.txt"), "--device", "cpu"])
    answers = capsys.readouterr().out.splitlines()
    from gpt2repro.addition import answer_problems

    assert answers == answer_problems(model, tok, ["12+34=", "9+9=", "99+99="], "cpu")
    (tmp_path / "bad.txt").write_text("12+34=\n12*3=\n")
    with pytest.raises(SystemExit, match="line 2"):
        sample.main(["--init", str(tmp_path / "c.pt"), "--prompt_file", str(tmp_path / "bad.txt"), "--device", "cpu"])
