"""Tokenizers: GPT-2 ids offline, the char vocabulary round trip, checkpoint serialisation."""

import socket
from pathlib import Path

import pytest
from conftest import shakespeare

from gpt2repro.tokenizer import CharTokenizer, get_tokenizer, gpt2_ranks_path, tokenizer_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_gpt2_known_ids_without_network(no_network):
    from gpt2repro.tokenizer import gpt2_encoding

    gpt2_encoding.cache_clear()
    assert gpt2_ranks_path().exists(), "run `python prepare.py` first"
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert tok.vocab_size == 50257 and tok.eot == 50256
    assert tok.decode([15496, 11, 314, 1101, 257, 3303, 2746, 11]) == "Hello, I'm a language model,"
    assert tok.enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_gpt2_tokenizer_roundtrips_shakespeare():
    text = shakespeare().read_text()[:50_000]
    tok = get_tokenizer("gpt2")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 3  # BPE compresses English roughly 4 characters per token


def test_char_tokenizer_roundtrips_input_txt():
    text = shakespeare().read_text()
    tok = get_tokenizer("char", text=text)
    assert tok.vocab_size == 65
    assert tok.decode(tok.encode(text)) == text
    assert tok.chars[0] == "\n" and tok.chars[1] == " "


def test_char_tokenizer_serialises():
    tok = get_tokenizer("char", text="hello world")
    again = tokenizer_from_dict(tok.to_dict())
    assert isinstance(again, CharTokenizer)
    assert again.encode("low") == tok.encode("low") and again.vocab_size == tok.vocab_size
    assert tokenizer_from_dict(get_tokenizer("gpt2").to_dict()).encode("hi") == get_tokenizer("gpt2").encode("hi")


def test_unknown_character_is_named():
    tok = get_tokenizer("char", text="abc")
    with pytest.raises(ValueError, match="character 'z' is not in"):
        tok.encode("abz")


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """GPT2_REPRO_CACHE set to an empty directory; yields the real ranks file. The encoding cached by earlier
    tests is dropped before and after, so later tests rebuild it from the real file."""
    from gpt2repro.tokenizer import gpt2_encoding

    real = gpt2_ranks_path()
    monkeypatch.setenv("GPT2_REPRO_CACHE", str(tmp_path))
    gpt2_encoding.cache_clear()
    yield real
    gpt2_encoding.cache_clear()


def test_damaged_ranks_file_is_named_with_the_fix(empty_cache, tmp_path):
    """tiktoken's own check would say "hash mismatch ... please try again", which never helps."""
    from gpt2repro.tokenizer import gpt2_encoding

    damaged = tmp_path / "gpt2.tiktoken"
    damaged.write_bytes(empty_cache.read_bytes()[:100_000])  # a download cut short
    with pytest.raises(ValueError) as e:
        gpt2_encoding()
    msg = str(e.value)
    assert msg.startswith(f"{damaged}: not GPT-2's BPE ranks file") and "python prepare.py" in msg
    assert "\n" not in msg and "try again" not in msg.lower()


def test_missing_ranks_file_offline_is_a_value_error_naming_the_fix(empty_cache, tmp_path, monkeypatch):
    """A ValueError, so every stage's one_line_errors shows it as one line."""
    from gpt2repro import tokenizer

    def offline(name):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", offline)
    with pytest.raises(ValueError, match=f"not found at {tmp_path / 'gpt2.tiktoken'}.*python prepare.py"):
        tokenizer.gpt2_encoding()
