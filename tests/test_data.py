"""data.py: every token once per epoch over ranks, shuffled or not; exact resume of the loader; clear errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from gpt2repro.data import ShardedTokenLoader, TokenLoader, split_tokens
from gpt2repro.tokenizer import GPT2_EOT as EOT

B, T, W = 2, 8, 2  # rows per rank, tokens per row, ranks


def write_shards(tmp_path, steps_per_shard=(3, 2, 4), doc_len=5, seed=0):
    """Train shards of exactly `steps` steps of all ranks (+1 target token); documents start with EOT.

    Every token other than EOT has a value of its own, so a value seen twice was served twice.
    """
    rng = np.random.default_rng(seed)
    next_value, shards = 0, []
    for i, steps in enumerate(steps_per_shard):
        n = steps * B * T * W + 1
        tokens = np.arange(next_value, next_value + n, dtype=np.int64)
        next_value += n
        starts = np.arange(0, n, doc_len) + rng.integers(0, 2, size=len(range(0, n, doc_len)))
        tokens[starts[starts < n]] = EOT
        assert tokens.max() < 65536
        np.save(tmp_path / f"toy_train_{i + 1:06d}.npy", tokens.astype(np.uint16))
        shards.append(tokens)
    np.save(tmp_path / "toy_val_000000.npy", np.arange(B * T * W + 1, dtype=np.uint16))
    return shards


def serve_epoch(tmp_path, shuffle: bool, seed: int = 1337, epoch_steps: int = 9):
    """All (x, y) of one epoch, per rank."""
    loaders = [ShardedTokenLoader(tmp_path, "train", B, T, r, W, shuffle=shuffle, seed=seed) for r in range(W)]
    return [[ld.next_batch() for _ in range(epoch_steps)] for ld in loaders], loaders


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_token_once_per_epoch_across_ranks(tmp_path, shuffle):
    shards = write_shards(tmp_path)
    batches, loaders = serve_epoch(tmp_path, shuffle)
    xs = torch.cat([x.flatten() for rank in batches for x, _ in rank]).numpy()
    ys = torch.cat([y.flatten() for rank in batches for _, y in rank]).numpy()
    everything = Counter(np.concatenate(shards).tolist())
    served = Counter(xs.tolist())
    # each shard's last token can only be a target: inputs are all tokens but one per shard
    assert sum(served.values()) == sum(everything.values()) - len(shards)
    assert all(c == 1 for v, c in served.items() if v != EOT), "a token was served twice"
    assert set(xs.tolist()) | set(ys.tolist()) == set(everything)
    assert served[EOT] <= everything[EOT]
    assert all(ld.epoch == 0 for ld in loaders)
    loaders[0].next_batch()
    assert loaders[0].epoch == 1


def test_unshuffled_order_matches_a_naive_reading(tmp_path):
    shards = write_shards(tmp_path)
    batches, _ = serve_epoch(tmp_path, shuffle=False)
    for r in range(W):
        expected = []
        for tokens in shards:  # build-nanogpt's walk, with the exact end-of-shard bound
            pos = B * T * r
            while pos + B * T + 1 <= len(tokens):
                buf = tokens[pos : pos + B * T + 1]
                expected.append((buf[:-1].reshape(B, T), buf[1:].reshape(B, T)))
                pos += B * T * W
        assert len(expected) == len(batches[r])
        for (x, y), (ex, ey) in zip(batches[r], expected, strict=True):
            np.testing.assert_array_equal(x.numpy(), ex)
            np.testing.assert_array_equal(y.numpy(), ey)
            assert x.dtype == torch.int64 and y.dtype == torch.int64


def test_shuffle_is_seeded_and_changes_every_epoch(tmp_path):
    write_shards(tmp_path)
    a, _ = serve_epoch(tmp_path, shuffle=True, seed=1)
    b, _ = serve_epoch(tmp_path, shuffle=True, seed=1)
    c, _ = serve_epoch(tmp_path, shuffle=True, seed=2)
    plain, _ = serve_epoch(tmp_path, shuffle=False)
    flat = [torch.cat([x.flatten() for x, _ in rank]) for rank in (a[0], b[0], c[0], plain[0])]
    assert torch.equal(flat[0], flat[1])
    assert not torch.equal(flat[0], flat[2])
    assert not torch.equal(flat[0], flat[3])
    ld = ShardedTokenLoader(tmp_path, "train", B, T, shuffle=True, seed=1)  # one rank: 18 steps an epoch
    epoch0 = torch.cat([ld.next_batch()[0].flatten() for _ in range(18)])
    epoch1 = torch.cat([ld.next_batch()[0].flatten() for _ in range(18)])
    assert ld.epoch == 1
    assert not torch.equal(epoch0, epoch1)
    # the same tokens in another order, but for the one token per shard that only a target can be
    assert len(Counter(epoch0.tolist()) - Counter(epoch1.tolist())) <= 3


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_dict_resumes_exactly(tmp_path, shuffle):
    write_shards(tmp_path)
    ref = ShardedTokenLoader(tmp_path, "train", B, T, 1, W, shuffle=shuffle, seed=3)
    for _ in range(7):  # into the third shard
        ref.next_batch()
    state = ref.state_dict()
    expected = [ref.next_batch() for _ in range(12)]  # crosses into the next epoch
    resumed = ShardedTokenLoader(tmp_path, "train", B, T, 1, W, shuffle=shuffle, seed=999)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip([resumed.next_batch() for _ in range(12)], expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_shards_are_memory_mapped_not_copied(tmp_path):
    write_shards(tmp_path)
    ld = ShardedTokenLoader(tmp_path, "train", B, T)
    assert isinstance(ld.tokens, np.memmap) and ld.tokens.dtype == np.uint16


def test_in_memory_source_has_the_same_interface():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1)
    assert len(train) == 900 and val[0] == 900
    ld = TokenLoader([train], B, T, rank=1, world_size=W, eot=None)
    x, y = ld.next_batch()
    np.testing.assert_array_equal(x.numpy(), np.arange(B * T, 2 * B * T).reshape(B, T))
    np.testing.assert_array_equal(y.numpy(), x.numpy() + 1)
    shuffled = TokenLoader([train], B, T, shuffle=True, eot=None)
    seen = torch.cat([shuffled.next_batch()[0].flatten() for _ in range((899 // T) // B)])
    assert len(set(seen.tolist())) == len(seen)  # rows in random order, none twice


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such data directory"):
        ShardedTokenLoader(tmp_path / "missing", "train", B, T)
    with pytest.raises(ValueError, match="no \\*_train_\\*.npy shards"):
        ShardedTokenLoader(tmp_path, "train", B, T)
    np.save(tmp_path / "x_train_000001.npy", np.zeros(100, dtype=np.int32))
    with pytest.raises(ValueError, match="uint16"):
        ShardedTokenLoader(tmp_path, "train", B, T)
    np.save(tmp_path / "x_train_000001.npy", np.zeros(B * T * W, dtype=np.uint16))  # one token short
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ShardedTokenLoader(tmp_path, "train", B, T, 0, W)
    np.save(tmp_path / "x_train_000001.npy", np.zeros(B * T * W + 1, dtype=np.uint16))
    ShardedTokenLoader(tmp_path, "train", B, T, 0, W)  # exactly one step fits
