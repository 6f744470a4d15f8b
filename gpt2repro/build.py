"""What a run is made of, built from its config: the tokenizer and data loaders, the model, its optimizer, and the
module that trains (compiled, DDP-wrapped or sharded)."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2repro.addition import AdditionLoader
from gpt2repro.checkpoint import load_model
from gpt2repro.config import ConfigError, TrainConfig
from gpt2repro.data import ShardedTokenLoader, TokenLoader, split_tokens
from gpt2repro.devices import Dist, compile_cached, compile_unsupported, convert_to_fp8, use_compile_cache
from gpt2repro.fileio import read_limited
from gpt2repro.models import MODEL_TYPES, ModelConfig
from gpt2repro.sharding import ensure_process_group, shard_model
from gpt2repro.tokenizer import Tokenizer, get_tokenizer, gpt2_encoding
from model import LanguageModel


def seed_everything(seed: int, device: str) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for the fp32 parts
        torch.backends.cudnn.allow_tf32 = True


MAX_TEXT_BYTES = 256 << 20  # --text_path is tokenized in memory; a larger corpus goes through fineweb.py's shards


def read_text(path: str) -> str:
    try:
        text = read_limited(Path(path), MAX_TEXT_BYTES, "--text_path").decode("utf-8")
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # as a text-mode read gives it
    except OSError as e:
        raise ValueError(f"cannot read --text_path {path}: {e.strerror}; run `python prepare.py` or pass a "
                         "file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--text_path {path} is not UTF-8 text (byte {e.start}); convert it, e.g. with "
                         "iconv") from None
    if not text:
        raise ValueError(f"--text_path {path} is empty; run `python prepare.py` or pass a text file")
    return text


def build_data(
    cfg: TrainConfig, dist: Dist, tokenizer: Tokenizer | None = None
) -> tuple[Tokenizer, TokenLoader | AdditionLoader, TokenLoader | AdditionLoader]:
    """The tokenizer and the train/val loaders this config asks for (`tokenizer` given: use that one)."""
    B, T = cfg.batch_size, cfg.block_size
    vocab = cfg.vocab_size or None
    if cfg.data == "addition":  # problems drawn on the fly; "val" serves only the held-out ones
        tokenizer = tokenizer or get_tokenizer("addition", digits=cfg.digits, ops=cfg.ops)
        return tokenizer, *(AdditionLoader(tokenizer, B, T, dist.rank, dist.world_size, cfg.seed, split)
                            for split in ("train", "val"))
    if cfg.data == "shards":
        tokenizer = tokenizer or get_tokenizer("gpt2")
        vocab = vocab or tokenizer.vocab_size
        train = ShardedTokenLoader(cfg.data_dir, "train", B, T, dist.rank, dist.world_size, cfg.shuffle, cfg.seed,
                                   vocab_size=vocab)
        val = ShardedTokenLoader(cfg.data_dir, "val", B, T, dist.rank, dist.world_size, False, cfg.seed,
                                 vocab_size=vocab)
        return tokenizer, train, val
    text = read_text(cfg.text_path)
    if tokenizer is None:
        tokenizer = get_tokenizer("gpt2") if cfg.data == "gpt2-text" else get_tokenizer("char", text=text)
    # tiktoken's own encoder: the text may hold "<|endoftext|>" literally, which is just text here
    ids = gpt2_encoding().encode_ordinary(text) if tokenizer.name == "gpt2" else tokenizer.encode(text)
    tokens = np.array(ids, dtype=np.uint16 if tokenizer.vocab_size <= 65536 else np.int32)
    train_tokens, val_tokens = split_tokens(tokens, cfg.val_fraction)
    loaders = [TokenLoader([part], B, T, dist.rank, dist.world_size, cfg.shuffle and split == "train", cfg.seed,
                           tokenizer.eot, name=f"{cfg.text_path} ({split})")
               for part, split in ((train_tokens, "train"), (val_tokens, "val"))]
    return tokenizer, *loaders


def build_model(cfg: TrainConfig, tokenizer: Tokenizer, device: str | None = None) -> LanguageModel:
    """A fresh model from the config's fields (refused when it cannot be trained on `device`, if given), or the
    `--init` model (whose tokenizer must match the data's)."""
    if not cfg.init:
        config = cfg.model_config(tokenizer.vocab_size)
        if config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"--vocab_size {config.vocab_size} is below the tokenizer's {tokenizer.vocab_size}; "
                              "raise it")
        if device is not None:
            check_fits(config, cfg.model_type, device)
        return MODEL_TYPES[cfg.model_type](config)
    model, init_tokenizer = load_model(cfg.init)
    if init_tokenizer.to_dict() != tokenizer.to_dict():
        raise ConfigError(f"--init {cfg.init} was trained with the {init_tokenizer.name} tokenizer but the data is "
                          f"{tokenizer.name}; pick a matching --preset or --data")
    return model


def min_parameters(config: ModelConfig, model_type: str) -> int:
    """A lower bound on the model's parameter count: its matrices and embeddings, not counting biases and gains."""
    n, V = config.n_embd, config.vocab_size
    if model_type == "bigram":
        return V * V
    if model_type == "lecture":  # at least the queries, keys and values; an untied head and learned positions
        return 3 * config.n_layer * n * n + 2 * V * n + config.block_size * n
    embeddings = V * n * (1 if config.tie_embeddings else 2)
    positions = config.block_size * n if config.pos == "learned" else 0
    return 12 * config.n_layer * n * n + embeddings + positions


def available_memory(device: str) -> int | None:
    """Bytes free for a new model on `device` (None where that is unknown)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if device != "cpu":
        return None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_fits(config: ModelConfig, model_type: str, device: str) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and one optimizer state (fp32, 12 bytes
    per parameter, a lower bound on training's needs) exceed the memory free on the device, or whose weights alone
    exceed the host's (the model is built there)."""
    params = min_parameters(config, model_type)
    needs = [(device, 12 * params)] + ([("cpu", 4 * params)] if device != "cpu" else [])
    for where, need in needs:
        free = available_memory(where)
        if free is not None and need > free:
            shape, fix = f"--n_layer {config.n_layer} --n_embd {config.n_embd}, ", "--n_layer or --n_embd"
            if model_type == "bigram":
                shape, fix = "", "--vocab_size"
            raise ConfigError(f"the model ({shape}vocabulary {config.vocab_size}) has at least {params:.3g} "
                              f"parameters; training them needs at least {need / 2**30:.3g} GiB but {where} has "
                              f"{free / 2**30:.3g} GiB free; lower {fix}")


def check_sample_prompt(cfg: TrainConfig, tokenizer: Tokenizer) -> None:
    if cfg.num_samples > 0 and cfg.sample_prompt:
        try:
            tokenizer.encode(cfg.sample_prompt)
        except ValueError as e:
            raise ConfigError(f"--sample_prompt {cfg.sample_prompt!r}: {e}") from None


def make_optimizer(model: LanguageModel, cfg: TrainConfig, device_type: str, verbose: bool = False,
                   dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    """The run's optimizer; a run that computes in bf16 also orthogonalises Muon's updates in bf16."""
    ns_dtype = torch.bfloat16 if dtype == torch.bfloat16 else None
    return model.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps, device_type,
                                      verbose=verbose, optimizer=cfg.optimizer, muon_lr=cfg.muon_lr,
                                      muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay,
                                      muon_ns_dtype=ns_dtype)


def wrap_model(model: LanguageModel, cfg: TrainConfig, dist: Dist,
               dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, bool]:
    """The module the training step calls: compiled where it can be, DDP across ranks (with --fsdp, the model
    itself sharded in place, each block compiled on its own); and whether compiled."""
    device_type = dist.device.split(":")[0]
    compiled = cfg.compile and not compile_unsupported(device_type)
    if cfg.compile and not compiled and dist.master:
        print(f"compile: off, {compile_unsupported(device_type)}")
    if cfg.fp8:
        layers = convert_to_fp8(model)
        if dist.master:
            print(f"fp8: {len(layers)} linear layers run their matmuls in FP8 (torchao, tensorwise scaling)")
    if compiled and dist.master:
        print(f"compile: caches in {use_compile_cache()} (a restarted run reuses them)")
    if cfg.fsdp:  # on CUDA the blocks compute in bf16 from fp32 shards; gradients are reduced in fp32
        ensure_process_group(dist.device)
        bf16 = device_type == "cuda" and dtype == torch.bfloat16
        return shard_model(model, torch.bfloat16 if bf16 else None, compile_blocks=compiled), compiled
    wrapped: torch.nn.Module = compile_cached(model) if compiled else model
    if dist.ddp:
        # gradients as views into DDP's all-reduce buckets: one copy of them instead of two
        wrapped = DDP(wrapped, device_ids=[dist.local_rank] if device_type == "cuda" else None,
                      gradient_as_bucket_view=True)
    return wrapped, compiled
