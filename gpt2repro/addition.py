"""The addition task: a GPT that learns a+b=c from problems drawn on the fly, scored on problems it never saw.

A problem is one row of the batch, in the fixed-width layout of `AdditionTokenizer` ("123+456=9750.": the answer's
digits least significant first, then '.'). The loss is only on the answer and its '.': the targets of the
positions that state the problem are -1, which `F.cross_entropy(ignore_index=-1)` skips.

Which problems are held out is decided by a hash of (seed, op, a, b), so the test set is disjoint from training
by construction: the training sampler rejects every held-out problem and the validation sampler keeps only them.
Batch i is drawn from `np.random.default_rng([seed, split, i])`, so the loader's whole state is the counter i.
"""

from __future__ import annotations

import numpy as np
import torch

from gpt2repro.eval_mode import eval_mode
from gpt2repro.tokenizer import AdditionTokenizer

HELD_OUT_PERCENT = 1  # of all (op, a, b) problems: 10,000 of the million 3-digit additions
SPLITS = {"train": 0, "val": 1, "test": 2}  # keys of the random streams, so the splits never share draws
ENUMERATE_LIMIT = 1 << 22  # problem spaces up to this size are listed whole to pick the test set
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each uint64 (SplitMix64's finaliser): stable across machines and runs."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def is_held_out(a: np.ndarray, b: np.ndarray, op: np.ndarray, digits: int, seed: int) -> np.ndarray:
    """Whether each problem belongs to the held-out set of this seed (about HELD_OUT_PERCENT of all problems)."""
    base = 10**digits
    key = (np.asarray(op, dtype=np.uint64) * np.uint64(base) + np.asarray(a, dtype=np.uint64)) * np.uint64(base)
    key = key + np.asarray(b, dtype=np.uint64)
    salt = splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    return splitmix64(key ^ salt) % np.uint64(100) < np.uint64(HELD_OUT_PERCENT)


def order_subtractions(tok: AdditionTokenizer, a: np.ndarray, b: np.ndarray, op: np.ndarray) -> tuple:
    """Swap the operands of subtractions with a < b, so every answer is non-negative (the tokenizer's rule)."""
    minus = np.array([o == "-" for o in tok.ops])[op]
    swap = minus & (a < b)
    return np.where(swap, b, a), np.where(swap, a, b), op


def draw_problems(tok: AdditionTokenizer, rng: np.random.Generator, n: int, seed: int, held_out: bool) -> tuple:
    """n problems (a, b, op) drawn uniformly from the held-out set or from the rest, by rejection."""
    keep_fraction = HELD_OUT_PERCENT / 100 if held_out else 1 - HELD_OUT_PERCENT / 100
    parts, have = [], 0
    while have < n:
        m = int((n - have) / keep_fraction * 1.1) + 16  # enough that one round almost always suffices
        a, b = rng.integers(0, 10**tok.digits, size=(2, m))
        a, b, op = order_subtractions(tok, a, b, rng.integers(0, len(tok.ops), size=m))
        keep = is_held_out(a, b, op, tok.digits, seed) == held_out
        parts.append(np.stack([a[keep], b[keep], op[keep]]))
        have += int(keep.sum())
    a, b, op = np.concatenate(parts, axis=1)[:, :n]
    return a, b, op


def all_held_out(tok: AdditionTokenizer, seed: int) -> np.ndarray:
    """Every held-out problem as rows (a, b, op), for problem spaces small enough to list."""
    base = 10**tok.digits
    op, a, b = (g.ravel() for g in np.meshgrid(np.arange(len(tok.ops)), np.arange(base), np.arange(base),
                                               indexing="ij"))
    valid = order_subtractions(tok, a, b, op)[0] == a  # each subtraction once, as a >= b
    keep = valid & is_held_out(a, b, op, tok.digits, seed)
    return np.stack([a[keep], b[keep], op[keep]], axis=1)


def held_out_problems(tok: AdditionTokenizer, seed: int, n: int = 1000) -> list[str]:
    """n distinct held-out problems like "123+456=" (fewer if the task has fewer), the same for the same seed."""
    rng = np.random.default_rng([seed, SPLITS["test"]])
    if len(tok.ops) * 100**tok.digits <= ENUMERATE_LIMIT:
        rows = rng.permutation(all_held_out(tok, seed))[:n]
    else:  # millions of held-out problems: draw until n distinct ones
        rows = np.empty((0, 3), dtype=np.int64)
        while len(rows) < n:
            more = np.stack(draw_problems(tok, rng, n, seed, held_out=True), axis=1)
            _, first = np.unique(np.concatenate([rows, more]), axis=0, return_index=True)
            rows = np.concatenate([rows, more])[np.sort(first)]
        rows = rows[:n]
    return [f"{a}{tok.ops[op]}{b}=" for a, b, op in rows.tolist()]


def problem_sequences(tok: AdditionTokenizer, problems: list[str]) -> np.ndarray:
    """Token ids (n, seq_len) of problem strings with their correct answers."""
    a, b, op = np.array([tok.parse_problem(p) for p in problems], dtype=np.int64).reshape(-1, 3).T
    return tok.sequences(a, b, op)


class AdditionLoader:
    """Batches (x, y) of shape (B, T), one problem per row, with data.TokenLoader's contract.

    All ranks draw the same B * world_size problems for a step and rank r takes the r-th group of B rows, so the
    ranks never train on the same row. T may exceed a problem's seq_len - 1 tokens: the rest is padding that
    the loss ignores. split "train" never serves a held-out problem; "val" serves only held-out ones.
    """

    def __init__(
        self,
        tokenizer: AdditionTokenizer,
        B: int,
        T: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        split: str = "train",
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if T < tokenizer.seq_len - 1:
            raise ValueError(f"--block_size {T} is shorter than one {tokenizer.digits}-digit problem "
                             f"({tokenizer.seq_len - 1} tokens); use --block_size {tokenizer.seq_len - 1}")
        self.tok, self.B, self.T = tokenizer, B, T
        self.rank, self.world_size, self.seed, self.split = rank, world_size, seed, split
        self.reset()

    def reset(self) -> None:
        """Back to the first batch."""
        self.step = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), int64 tensors of shape (B, T); y is -1 where there is nothing to learn."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], self.step])
        a, b, op = draw_problems(self.tok, rng, self.B * self.world_size, self.seed, self.split == "val")
        rows = slice(self.rank * self.B, (self.rank + 1) * self.B)
        seq = self.tok.sequences(a[rows], b[rows], op[rows])
        x = np.full((self.B, self.T), self.tok.eot, dtype=np.int64)
        y = np.full((self.B, self.T), -1, dtype=np.int64)
        n = seq.shape[1] - 1
        x[:, :n] = seq[:, :-1]
        # the prompt's own tokens are given, not predicted: learn only from '=' onwards (the answer and its '.')
        y[:, self.tok.prompt_len - 1 : n] = seq[:, self.tok.prompt_len :]
        self.step += 1
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self) -> dict:
        return {"data": "addition", "step": self.step, "seed": self.seed, "split": self.split,
                "digits": self.tok.digits, "ops": self.tok.ops, "B": self.B, "T": self.T,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data") != "addition":
            raise ValueError("saved loader state is not from an addition run; resume with the data it was trained on")
        if (state["digits"], state["ops"]) != (self.tok.digits, self.tok.ops):
            raise ValueError(f"saved loader state is for --digits {state['digits']} --ops {state['ops']}, this run "
                             f"has --digits {self.tok.digits} --ops {self.tok.ops}; resume with the same values")
        self.seed, self.step = state["seed"], state["step"]


def greedy_answers(model: torch.nn.Module, tok: AdditionTokenizer, prompts: np.ndarray, device: str,
                   batch_size: int = 500) -> np.ndarray:
    """The model's greedy answer tokens (n, answer_len) to prompt ids (n, prompt_len), in batches."""
    out = []
    with eval_mode(model):
        for i in range(0, len(prompts), batch_size):
            idx = torch.from_numpy(prompts[i : i + batch_size]).to(device)
            # every prompt has the same length, so a batch is one plain tensor; no eot: answers have a fixed length
            new = model.generate(idx, tok.answer_len, temperature=0.0, vocab_size=tok.vocab_size)[:, tok.prompt_len :]
            out.append(new.cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, tok.answer_len), dtype=np.int64)


def exact_match(model: torch.nn.Module, tokenizer: AdditionTokenizer, problems: list[str], device: str,
                batch_size: int = 500) -> float:
    """Fraction of problems whose whole answer (every digit and the closing '.') the model gets right greedily."""
    if not problems:
        raise ValueError("exact_match needs at least one problem")
    seq = problem_sequences(tokenizer, problems)
    got = greedy_answers(model, tokenizer, seq[:, : tokenizer.prompt_len], device, batch_size)
    return float((got == seq[:, tokenizer.prompt_len :]).all(axis=1).mean())


def answer_problems(model: torch.nn.Module, tok: AdditionTokenizer, problems: list[str], device: str) -> list[str]:
    """The model's greedy answers to problem strings like "123+456=", in normal digit order ("579")."""
    prompts = np.array([tok.encode_problem(p) for p in problems], dtype=np.int64).reshape(-1, tok.prompt_len)
    return [tok.decode_answer(row) for row in greedy_answers(model, tok, prompts, device).tolist()]
