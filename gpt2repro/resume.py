"""Resuming a run: which checkpoint to continue from, whether `--out_dir` allows it, and the run's data, model and
training state restored from it (or, for a fresh run, built new)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from gpt2repro.addition import AdditionLoader
from gpt2repro.autobatch import auto_batch, choose_batch_size, upper_batch_size
from gpt2repro.build import build_data, build_model, check_sample_prompt, read_text
from gpt2repro.checkpoint import (
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    newest_resumable,
    set_rng_state,
)
from gpt2repro.config import RESUME_OPTIMIZER, RESUME_REFUSED, ConfigError, TrainConfig
from gpt2repro.data import TokenLoader
from gpt2repro.devices import Dist
from gpt2repro.rundir import CONFIG_FILE, METRICS_FILE
from gpt2repro.sharding import newest_sharded, sharded_model_file
from gpt2repro.tokenizer import Tokenizer, tokenizer_from_dict
from model import LanguageModel


def find_resume(cfg: TrainConfig, dist: Dist) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from (`--resume PATH`, or with `auto` the newest readable one in out_dir) and
    its contents. Rank 0 decides, setting unreadable files aside, and tells the others which file to load.
    With --fsdp it is the model file of a sharded checkpoint, whose shards are read once the model is sharded."""
    if not cfg.resume:
        return None, None
    path, ckpt = None, None
    if dist.master:
        if cfg.resume == "auto":
            path, ckpt = (newest_sharded if cfg.fsdp else newest_resumable)(Path(cfg.out_dir))
            if path is None:
                print(f"resume: no checkpoint in {cfg.out_dir}, starting fresh")
        elif cfg.fsdp:
            path = sharded_model_file(Path(cfg.resume))
        else:
            path = Path(cfg.resume)
            if path.is_dir():
                path = latest_checkpoint(path)
                if path is None:
                    raise ConfigError(f"--resume {cfg.resume}: no ckpt_*.pt in that directory; pass a checkpoint "
                                      "file, or --resume auto to start fresh when there is none")
    if dist.ddp:
        box = [str(path) if path else ""]
        torch.distributed.broadcast_object_list(box, src=0)
        path = Path(box[0]) if box[0] else None
    if path is not None and ckpt is None:
        ckpt = load_checkpoint(path)
        if not cfg.fsdp:
            check_resumable(ckpt, path)
    if cfg.fsdp and ckpt is not None and "sharded" not in ckpt:
        raise ConfigError(f"--resume: {path} was written by a run without --fsdp; resume it with --fsdp false")
    return path, ckpt


def check_out_dir(cfg: TrainConfig, resume_path: Path | None) -> None:
    """Never mix two runs in one --out_dir: a fresh run needs one without a run in it, and a resumed run goes on
    from the newest checkpoint there (resuming an older one would prune the newer ones, and `auto` pick them)."""
    out = Path(cfg.out_dir)
    newest = latest_checkpoint(out)
    if not cfg.resume:
        record = newest or next((out / f for f in (CONFIG_FILE, METRICS_FILE) if (out / f).exists()), None)
        if record is not None:
            raise ConfigError(f"{out} already holds a run ({record.name}); continue it with --resume auto, or pick a "
                              "new --out_dir")
    elif resume_path is not None and newest is not None and resume_path.resolve() != newest.resolve():
        raise ConfigError(f"--resume {resume_path}: {out} already holds {newest.name}, a later checkpoint or another "
                          "run's; going on here would mix the two runs; resume into a new --out_dir")


def given_tokenizer(cfg: TrainConfig, ckpt: dict | None) -> Tokenizer | None:
    """The tokenizer the data must be read with, or None to build it from the data: a resumed run's, except for a
    character vocabulary made from the text (rebuilt, so a changed text is caught); and a character checkpoint's
    given as --init, whose vocabulary must then cover the text (pretrained on a larger corpus, say)."""
    if ckpt:
        keeps_vocab = cfg.data != "char" or trained_with(ckpt).get("init")
        return tokenizer_from_dict(ckpt["tokenizer"]) if keeps_vocab else None
    if cfg.init and cfg.data == "char" and Path(cfg.init).is_file():
        tokenizer = tokenizer_from_dict(load_checkpoint(cfg.init)["tokenizer"])
        if tokenizer.name != "char":
            return None  # build_model names the mismatch
        unseen = sorted(set(read_text(cfg.text_path)) - set(tokenizer.chars))
        if unseen:
            raise ConfigError(f"--text_path {cfg.text_path} has characters that --init {cfg.init}'s vocabulary "
                              f"lacks ({''.join(unseen)!r}); pretrain on a text that holds them")
        return tokenizer
    return None


def restore_or_build(cfg: TrainConfig, dist: Dist, ckpt: dict | None, resume_path: Path | None,
                     dtype: torch.dtype) -> tuple[TrainConfig, Tokenizer, TokenLoader | AdditionLoader,
                                                  TokenLoader | AdditionLoader, LanguageModel]:
    """The data and the model: the checkpoint's when resuming, else new; with the micro-batch chosen where it is
    `auto`. Returns the config with that batch, the tokenizer, both loaders and the model on its device."""
    if ckpt is not None:
        check_resume_flags(cfg, ckpt)
    probe = auto_batch(cfg, dist.device)
    if probe:  # loaders are built at the upper bound first, then again at the chosen size
        trained = (ckpt or {}).get("train_config", {}).get("batch_size")
        cfg = dataclasses.replace(cfg, batch_size=upper_batch_size(cfg, trained))
    tokenizer, train_loader, val_loader = build_data(cfg, dist, given_tokenizer(cfg, ckpt))
    raw = restore_model(cfg, ckpt, resume_path, tokenizer) if ckpt else build_model(cfg, tokenizer, dist.device)
    check_sample_prompt(cfg, tokenizer)  # after the vocabulary check: a changed text is the cause to name
    if cfg.block_size > raw.config.block_size:
        raise ConfigError(f"--block_size {cfg.block_size} is above the model's context {raw.config.block_size}; "
                          "lower it")
    check_out_dir(cfg, resume_path)
    raw.to(dist.device)
    if probe:
        chosen = choose_batch_size(cfg, dist, raw, dtype)
        if dist.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(dist.device)  # the peak logged is training's, not the probe's
        if chosen.batch_size != cfg.batch_size:
            tokenizer, train_loader, val_loader = build_data(chosen, dist, tokenizer)
        cfg = chosen
    return cfg, tokenizer, train_loader, val_loader, raw


def restore_model(cfg: TrainConfig, ckpt: dict, path: Path, tokenizer: Tokenizer) -> LanguageModel:
    """The checkpoint's model, after checking that it is the run the flags describe."""
    model = model_from_checkpoint(ckpt, str(path))
    if ckpt["tokenizer"] != tokenizer.to_dict():
        source = cfg.data_dir if cfg.data == "shards" else cfg.text_path
        raise ConfigError(f"--resume: {path} was trained with a different {ckpt['tokenizer'].get('name')} "
                          f"vocabulary than {source} gives; resume with the same data")
    if not cfg.init:
        want = asdict(cfg.model_config(tokenizer.vocab_size)) | {"model_type": cfg.model_type}
        have = ckpt["model_config"] | {"model_type": ckpt.get("model_type", "gpt")}
        diff = [f"{k}={have.get(k)} (flags say {want[k]})" for k in want if have.get(k) != want[k]]
        if diff:
            raise ConfigError(f"--resume: {path} holds a model with {', '.join(diff)}; use the flags it was "
                              "trained with or a new --out_dir")
    return model


def trained_with(ckpt: dict) -> dict:
    """The flags the checkpoint was trained with; a flag older checkpoints lack counts as unchanged."""
    return {"optimizer": "adamw"} | ckpt.get("train_config", {})


def show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_resume_flags(cfg: TrainConfig, ckpt: dict) -> None:
    """Refuse, before anything is built, a flag the restored state depends on (config.ON_RESUME) set away from
    the checkpoint's value."""
    trained = trained_with(ckpt)
    for flag in RESUME_REFUSED:
        was, now = trained.get(flag, getattr(cfg, flag)), getattr(cfg, flag)
        if was != now:
            raise ConfigError(f"--resume: the checkpoint was trained with --{flag} {show(was)}, not {show(now)}; "
                              f"resume with the --{flag} it was trained with, or start a new --out_dir")


def restore_training(ckpt: dict, cfg: TrainConfig, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     loader: TokenLoader | AdditionLoader, verbose: bool = False,
                     shards: Callable[[], dict] | None = None) -> tuple[int, float]:
    """Optimizer, scaler and loader states; returns the step to continue at and the wall time so far.

    The optimizer's state (moments, step counts) is the checkpoint's; its hyper-parameters are the flags'.
    `shards` (a sharded run) loads the optimizer state into the sharded model's optimizer and returns the training
    state saved with it, which is added to `ckpt`."""
    flags_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if shards is not None:
        ckpt.update(shards())
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    for group, hyper in zip(optimizer.param_groups, flags_groups, strict=True):
        group.update(hyper)
    trained = trained_with(ckpt)
    changed = [f"--{f} {show(trained[f])} -> {show(getattr(cfg, f))}" for f in RESUME_OPTIMIZER
               if f in trained and trained[f] != getattr(cfg, f)]
    if changed and verbose:
        print(f"resume: the restored optimizer now uses {', '.join(changed)}")
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt.get("elapsed", 0.0)


def report_resume(path: Path, ckpt: dict, dist: Dist, accum: int) -> None:
    if not dist.master:
        return
    if ckpt.get("world_size", dist.world_size) != dist.world_size:
        print(f"resume: {path.name} was written by {ckpt['world_size']} process(es), this run has "
              f"{dist.world_size}; the data continues at the same global position, gradient accumulation is "
              f"now {accum}, the total batch is unchanged")
    print(f"resume: {path} at step {ckpt['step']}")
