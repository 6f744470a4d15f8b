"""Train a GPT: tiny Shakespeare on a laptop CPU up to GPT-2 (124M-1558M) on FineWeb-EDU over many GPUs.

    python train_gpt2.py                                   # the embedded default: shakespeare-char on CPU
    python train_gpt2.py --preset shakespeare-bigram       # the lecture's bigram baseline
    python train_gpt2.py --preset finetune-shakespeare --init gpt2
    torchrun --standalone --nproc_per_node=8 train_gpt2.py # GPT-2 124M when edu_fineweb10B/ has shards
    python train_gpt2.py --out_dir out/run --resume auto   # continue from the newest valid checkpoint
    python train_gpt2.py --eval_only --init gpt2 --data_dir edu_fineweb10B

Every `TrainConfig` field is a flag `--field value`; `--preset NAME` picks a named set of values and flags
given on the command line override it. A run directory holds `config.json`, `metrics.jsonl` (one JSON
object per event) and `ckpt_{step:07d}.pt` checkpoints. SIGINT/SIGTERM writes a checkpoint at the next
step boundary and exits 0.

Several nodes (here 2 x 8 GPUs): run on every node, with HOST0 reachable from all of them,
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=gpt2 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 \\
        train_gpt2.py --resume auto
NCCL picks its transport itself; NCCL_SOCKET_IFNAME=eth0 names the network interface between nodes,
NCCL_IB_DISABLE=1 turns InfiniBand off where it is absent or broken, NCCL_DEBUG=INFO shows what it chose.
With `--resume auto` a job restarted by torchrun (`--max-restarts`) continues from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from data import ShardedTokenLoader, TokenLoader, split_tokens
from devices import autocast, pick_device, pick_dtype
from model import (
    MODEL_TYPES,
    GPTConfig,
    LanguageModel,
    load_model,
    model_checkpoint_fields,
    model_from_checkpoint,
)
from prepare import atomic_write_bytes
from tokenizer import Tokenizer, get_tokenizer, tokenizer_from_dict

FINEWEB_DIR = "edu_fineweb10B"
# dense bf16 peak of one GPU, for MFU; matched against torch.cuda.get_device_name (H200 before H100)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


@dataclass
class TrainConfig:
    """Defaults are the GPT-2 124M reproduction on FineWeb-EDU 10B tokens (build-nanogpt's settings)."""

    preset: str = ""  # a name in PRESETS; "" = gpt2-124m when FINEWEB_DIR has shards, else shakespeare-char
    # data
    data: str = "shards"  # shards (data_dir) | char | gpt2-text (the last two tokenize text_path)
    data_dir: str = FINEWEB_DIR
    text_path: str = "input.txt"
    val_fraction: float = 0.1  # text data: the last 10% is validation
    shuffle: bool = True  # seeded shuffling of shard, document and row order, new every epoch
    # model: from scratch, or --init gpt2|HF_DIR|CHECKPOINT (then the model fields below are ignored)
    init: str = ""
    model_type: str = "gpt"  # gpt | bigram
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    vocab_size: int = 50304  # 50257 padded to a multiple of 128 for faster matmuls; 0 = the tokenizer's
    block_size: int = 1024  # T, the sequence length trained on
    # optimization
    batch_size: int = 64  # B, the micro-batch of one rank
    total_batch_size: int = 524288  # tokens per optimizer step, over all ranks and accumulation steps
    max_steps: int = 19073  # 10B tokens / 524,288
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715  # 375M tokens, as GPT-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    seed: int = 1337
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20  # validation batches per evaluation (per rank)
    eval_only: bool = False
    hellaswag: bool = True  # score HellaSwag at every eval when its cached val set is there
    hellaswag_jsonl: str = ""  # score this HellaSwag .jsonl at every eval (whatever --hellaswag says)
    hellaswag_limit: int = 0  # evaluate the first N examples only; 0 = all
    sample_interval: int = 250  # 0 = only at the end
    num_samples: int = 4
    sample_tokens: int = 32
    sample_prompt: str = "Hello, I'm a language model,"
    log_interval: int = 1  # console line every N steps (metrics.jsonl gets every step)
    peak_flops: float = 0.0  # per-device peak for MFU; 0 = from the GPU table (no MFU on CPU)
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "gpt2-repro"
    # run directory and checkpoints
    out_dir: str = ""  # "" = out/PRESET
    ckpt_interval: int = 5000  # also at the last step; 0 = only when stopped by a signal
    keep_last: int = 3  # checkpoints kept in out_dir; 0 = all
    resume: str = ""  # "" (fresh) | auto (newest valid checkpoint in out_dir, or fresh) | PATH
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (autocast precision)
    compile: bool = True  # torch.compile the training forward/backward


SHAKESPEARE = dict(data="char", vocab_size=0, shuffle=True, sample_prompt="ROMEO:", hellaswag=False)
PRESETS: dict[str, dict] = {
    # nanoGPT's CPU model (4 x 128, context 64) at batch 32 and 4x its learning rate: val loss 1.859 after
    # 600 steps (1.2M tokens; the recipe needs 2000 steps, 1.5M tokens, for 1.887), 1.824 at step 700
    "shakespeare-char": SHAKESPEARE | dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, total_batch_size=2048, max_steps=700,
        max_lr=4e-3, min_lr=4e-4, warmup_steps=50, weight_decay=0.1, beta2=0.99, eval_interval=100, eval_iters=20,
        sample_interval=0, num_samples=1, sample_tokens=200, log_interval=100, ckpt_interval=1000, compile=False,
        dtype="float32",
    ),
    # the lecture's baseline: a 65x65 table of next-character logits
    "shakespeare-bigram": SHAKESPEARE | dict(
        model_type="bigram", block_size=8, batch_size=32, total_batch_size=256, max_steps=1500, max_lr=1e-2,
        min_lr=1e-3, warmup_steps=0, weight_decay=0.0, eval_interval=500, eval_iters=50, sample_interval=0,
        num_samples=1, sample_tokens=200, log_interval=250, ckpt_interval=1500, compile=False, dtype="float32",
    ),
    "shakespeare-gpt2": dict(
        data="gpt2-text", n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, total_batch_size=2048,
        max_steps=1000, max_lr=1e-3, min_lr=1e-4, warmup_steps=50, eval_interval=100, eval_iters=20,
        sample_interval=0, num_samples=1, sample_tokens=64, sample_prompt="ROMEO:", log_interval=50,
        ckpt_interval=1000, compile=False, hellaswag=False,
    ),
    # the lecture's exercise: GPT-2 (or any model) finetuned on Shakespeare, constant small LR, few steps
    "finetune-shakespeare": dict(
        data="gpt2-text", init="gpt2", block_size=256, batch_size=4, total_batch_size=4096, max_steps=50,
        max_lr=3e-5, min_lr=3e-5, warmup_steps=0, eval_interval=10, eval_iters=5, sample_interval=0,
        num_samples=1, sample_tokens=64, sample_prompt="ROMEO:", log_interval=5, ckpt_interval=50,
        compile=False, hellaswag=False,
    ),
    "gpt2-124m": {},
    # GPT-2's larger shapes with the GPT-3 paper's learning rate and batch for their size (Table 2.1);
    # warmup stays at 375M tokens
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, batch_size=32, max_lr=3e-4, min_lr=3e-5),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, batch_size=16, max_lr=2.5e-4, min_lr=2.5e-5),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, batch_size=8, max_lr=2e-4, min_lr=2e-5,
                       total_batch_size=1048576, max_steps=9537, warmup_steps=358),
}


# ----------------------------------------------------------------------------- configuration


def parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    for f in fields(TrainConfig):
        if f.type in ("bool", bool):
            # `--compile false`, or a bare `--eval_only`
            p.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True, default=None,
                           metavar="true|false", help=f"default: {f.default}")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(f"--{f.name}", type=kind, default=None, help=f"default: {f.default!r}")
    return p


def default_preset(given: dict) -> str:
    """No preset and no data flag: GPT-2 124M if FineWeb shards are there, else the CPU demo."""
    if "data" in given or "data_dir" in given:
        return "gpt2-124m"
    has_fineweb = Path(FINEWEB_DIR).is_dir() and any(Path(FINEWEB_DIR).glob("*_train_*.npy"))
    return "gpt2-124m" if has_fineweb else "shakespeare-char"


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Dataclass defaults, then the preset, then the flags given; one-line errors for unknown names."""
    args, unknown = config_parser().parse_known_args(argv)
    if unknown:
        bad = unknown[0].split("=")[0]
        close = difflib.get_close_matches(bad.lstrip("-"), [f.name for f in fields(TrainConfig)], n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the fields"
        sys.exit(f"error: unknown option {bad}{hint}")
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = given.get("preset") or default_preset(given)
    if preset not in PRESETS:
        sys.exit(f"error: unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    cfg = dataclasses.replace(TrainConfig(), **(PRESETS[preset] | given | {"preset": preset}))
    if not cfg.out_dir:
        cfg.out_dir = str(Path("out") / preset)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "batch_size" not in given and cfg.batch_size * cfg.block_size * world > cfg.total_batch_size > 0:
        # more ranks than the preset's batch was sized for: a smaller micro-batch keeps the total batch exact
        if cfg.total_batch_size % (cfg.block_size * world) == 0:
            cfg.batch_size = cfg.total_batch_size // (cfg.block_size * world)
            if os.environ.get("RANK", "0") == "0":
                print(f"batch_size lowered to {cfg.batch_size} so {world} ranks make the total batch of "
                      f"{cfg.total_batch_size:,} tokens")
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, saying what to change (rank-independent checks only)."""
    choices = {"data": ("shards", "char", "gpt2-text"), "model_type": tuple(MODEL_TYPES),
               "dtype": ("auto", "bfloat16", "float16", "float32")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            sys.exit(f"error: --{name} {getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    positive = ("block_size", "batch_size", "total_batch_size", "max_steps", "eval_iters")
    for name in positive:
        if getattr(cfg, name) <= 0:
            sys.exit(f"error: --{name} must be positive, got {getattr(cfg, name)}")
    if cfg.min_lr > cfg.max_lr:
        sys.exit(f"error: --min_lr {cfg.min_lr} is above --max_lr {cfg.max_lr}; lower it")
    if cfg.eval_only and not cfg.init:
        sys.exit("error: --eval_only needs a model: --init gpt2|HF_DIR|CHECKPOINT")


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % per_step:
        sys.exit(
            f"error: --total_batch_size {cfg.total_batch_size} is not a multiple of batch_size x block_size x "
            f"world_size = {cfg.batch_size} x {cfg.block_size} x {world_size} = {per_step}; "
            f"use e.g. --total_batch_size {max(1, round(cfg.total_batch_size / per_step)) * per_step}"
        )
    return cfg.total_batch_size // per_step


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`, then `min_lr`."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


# ----------------------------------------------------------------------------- processes and devices


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str) -> Dist:
    """One process, or one of torchrun's (RANK/LOCAL_RANK/WORLD_SIZE): NCCL on CUDA, gloo on CPU."""
    try:
        device = pick_device(device_flag)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world_size, device)


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean over ranks as SUM / world_size (gloo has no AVG)."""
    if d.ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / d.world_size
    return value


def peak_flops(cfg: TrainConfig, device: str) -> float:
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)
    return 0.0  # CPU peaks vary too much to guess; give --peak_flops


def compile_unsupported(device_type: str) -> str:
    """Why torch.compile cannot work here ("" when it can): inductor builds C++ on CPU, MPS is experimental."""
    if device_type == "cpu" and not any(shutil.which(c) for c in ("cc", "gcc", "g++", "clang")):
        return "no C/C++ compiler on PATH for inductor's CPU kernels (install gcc, or pass --compile false)"
    if device_type == "mps":
        return "torch.compile on MPS is experimental"
    return ""


# ----------------------------------------------------------------------------- data and model


def read_text(path: str) -> str:
    p = Path(path)
    if not p.exists() and p.name == "input.txt":
        from prepare import ensure_shakespeare

        ensure_shakespeare(p)  # the embedded default needs no set-up step
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        sys.exit(f"error: cannot read --text_path {path}: {e.strerror}; run `python prepare.py` or pass a file")
    except UnicodeDecodeError as e:
        sys.exit(f"error: --text_path {path} is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv")
    if not text:
        sys.exit(f"error: --text_path {path} is empty; run `python prepare.py` or pass a text file")
    return text


def build_data(
    cfg: TrainConfig, d: Dist, tokenizer: Tokenizer | None = None
) -> tuple[Tokenizer, TokenLoader, TokenLoader]:
    """The tokenizer and the train/val loaders this config asks for (`tokenizer` given: use that one)."""
    B, T = cfg.batch_size, cfg.block_size
    try:
        if cfg.data == "shards":
            tokenizer = tokenizer or get_tokenizer("gpt2")
            train = ShardedTokenLoader(cfg.data_dir, "train", B, T, d.rank, d.world_size, cfg.shuffle, cfg.seed)
            val = ShardedTokenLoader(cfg.data_dir, "val", B, T, d.rank, d.world_size, False, cfg.seed)
            return tokenizer, train, val
        text = read_text(cfg.text_path)
        if tokenizer is None:
            tokenizer = get_tokenizer("gpt2") if cfg.data == "gpt2-text" else get_tokenizer("char", text=text)
        if tokenizer.name == "gpt2":
            from tokenizer import gpt2_encoding

            ids = gpt2_encoding().encode_ordinary(text)
        else:
            ids = tokenizer.encode(text)
        tokens = np.array(ids, dtype=np.uint16 if tokenizer.vocab_size <= 65536 else np.int32)
        train_tokens, val_tokens = split_tokens(tokens, cfg.val_fraction)
        train = TokenLoader([train_tokens], B, T, d.rank, d.world_size, cfg.shuffle, cfg.seed, tokenizer.eot,
                            name=f"{cfg.text_path} (train)")
        val = TokenLoader([val_tokens], B, T, d.rank, d.world_size, False, cfg.seed, tokenizer.eot,
                          name=f"{cfg.text_path} (val)")
        return tokenizer, train, val
    except ValueError as e:
        sys.exit(f"error: {e}")


def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> GPTConfig:
    return GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size or tokenizer.vocab_size,
                     n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> LanguageModel:
    """A fresh model from the config's fields, or the `--init` model (whose tokenizer must match the data's)."""
    if not cfg.init:
        mc = model_config(cfg, tokenizer)
        if mc.vocab_size < tokenizer.vocab_size:
            sys.exit(f"error: --vocab_size {mc.vocab_size} is below the tokenizer's {tokenizer.vocab_size}; raise it")
        if cfg.model_type == "gpt" and mc.n_embd % mc.n_head:
            sys.exit(f"error: --n_embd {mc.n_embd} is not divisible by --n_head {mc.n_head}")
        return MODEL_TYPES[cfg.model_type](mc)
    try:
        model, init_tokenizer = load_model(cfg.init)
    except ValueError as e:
        sys.exit(f"error: --init {cfg.init}: {e}")
    if init_tokenizer.to_dict() != tokenizer.to_dict():
        sys.exit(f"error: --init {cfg.init} was trained with the {init_tokenizer.name} tokenizer but the data is "
                 f"{tokenizer.name}; pick a matching --preset or --data")
    return model


# ----------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    """Python, numpy, torch and CUDA generator states, as plain data and tensors (weights_only-loadable)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": np_state["has_gauss"],
                  "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": np.array(n["key"], dtype=np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_checkpoint(ckpt: dict, path: Path) -> None:
    """Atomic write; GPT2_REPRO_PAUSE_IN_SAVE=SECONDS holds the finished temp file that long before the
    rename, so tests can kill a run inside the write window."""
    pause = float(os.environ.get("GPT2_REPRO_PAUSE_IN_SAVE") or 0)
    if pause <= 0:
        save_checkpoint(ckpt, path)
        return
    tmp = save_checkpoint(ckpt, path.with_name(f".{path.name}.paused.tmp"))
    time.sleep(pause)
    os.replace(tmp, path)


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            old.unlink(missing_ok=True)


def find_resume_checkpoint(cfg: TrainConfig, d: Dist) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from: `--resume PATH`, or with `auto` the newest readable one in out_dir.

    Rank 0 decides (removing temp files of interrupted writes, setting unreadable files aside) and tells the
    other ranks, so all load the same file. Also returns the checkpoint when this rank has already read it.
    """
    if not cfg.resume:
        return None, None
    choice: Path | None = None
    loaded: dict | None = None
    if d.master:
        if cfg.resume != "auto":
            choice = Path(cfg.resume)
            if choice.is_dir():
                choice = next(reversed(list_checkpoints(choice)), None) or choice
        else:
            out = Path(cfg.out_dir)
            for tmp in out.glob(".ckpt_*.tmp"):
                print(f"resume: removing {tmp.name}, left by an interrupted checkpoint write")
                tmp.unlink(missing_ok=True)
            for path in reversed(list_checkpoints(out)):
                try:
                    loaded = load_checkpoint(path)  # kept: the caller need not read the file again
                except CheckpointError as e:
                    bad = path.with_name(path.name + ".unreadable")
                    print(f"resume: skipping {e}; moved aside to {bad.name}")
                    os.replace(path, bad)
                    continue
                choice = path
                break
            if choice is None:
                print(f"resume: no checkpoint in {out}, starting fresh")
    if d.ddp:
        box = [str(choice) if choice else ""]
        dist.broadcast_object_list(box, src=0)
        choice = Path(box[0]) if box[0] else None
    return choice, loaded


# ----------------------------------------------------------------------------- logging


class Metrics:
    """`metrics.jsonl` (appended, one JSON object per event) plus the optional TensorBoard/W&B sinks."""

    def __init__(self, cfg: TrainConfig, enabled: bool, time_offset: float = 0.0) -> None:
        self.enabled, self.t0 = enabled, time.time() - time_offset
        self.tb = self.wandb = None
        if not enabled:
            return
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        # a line cut short by a killed run must not swallow the next one
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not tail_is_newline(self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self.file.write("\n")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                sys.exit("error: --tensorboard needs the tensorboard package: pip install tensorboard")
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                sys.exit("error: --wandb needs the wandb package: pip install wandb")
            self.wandb = wandb
            wandb.init(project=cfg.wandb_project, name=out.name, config=asdict(cfg), resume="allow")

    def elapsed(self) -> float:
        return time.time() - self.t0

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        event = {"step": step, "time": round(self.elapsed(), 3), **values}
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            if "sample" in values:
                self.tb.add_text("sample", values["sample"], step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def tail_is_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def fmt_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_loss(model: LanguageModel, loader: TokenLoader, iters: int, d: Dist, dtype: torch.dtype) -> float:
    """Mean loss over the first `iters` batches of every rank (the same batches at every evaluation)."""
    was_training = model.training
    model.eval()
    loader.reset()
    total = torch.zeros((), device=d.device)
    for _ in range(iters):
        x, y = loader.next_batch()
        with autocast(d.device, dtype):
            _, loss = model(x.to(d.device), y.to(d.device))
        total += loss.detach().float()
    model.train(was_training)
    return all_mean(total / iters, d).item()


def hellaswag_examples(cfg: TrainConfig, tokenizer: Tokenizer) -> list[dict] | None:
    """HellaSwag val examples when their data is on disk (never downloaded here) and the model speaks GPT-2."""
    if tokenizer.name != "gpt2" or cfg.data == "char":
        return None
    try:
        import hellaswag
    except ImportError:
        return None
    limit = cfg.hellaswag_limit or None
    try:
        if cfg.hellaswag_jsonl:
            return hellaswag.load_examples(jsonl=cfg.hellaswag_jsonl, limit=limit)
        if cfg.hellaswag and hellaswag.cached_path("val").exists():
            return hellaswag.load_examples("val", limit=limit)
    except (OSError, ValueError) as e:
        sys.exit(f"error: HellaSwag data: {e}")
    return None


def evaluate_hellaswag(model: LanguageModel, examples: list[dict], tokenizer: Tokenizer, cfg: TrainConfig,
                       d: Dist, dtype: torch.dtype) -> dict:
    import hellaswag

    was_training = model.training
    model.eval()
    result = hellaswag.evaluate(model, examples, tokenizer=tokenizer, batch_size=max(1, cfg.batch_size // 4),
                                device=d.device, dtype=dtype, rank=d.rank, world_size=d.world_size)
    model.train(was_training)
    return result


def generate_samples(model: LanguageModel, tokenizer: Tokenizer, cfg: TrainConfig, d: Dist, step: int) -> list[str]:
    """`num_samples` continuations of the sample prompt, from a generator of their own (global RNG untouched)."""
    ids = tokenizer.encode(cfg.sample_prompt) if cfg.sample_prompt else []
    if not ids:
        ids = [tokenizer.eot if tokenizer.eot is not None else 0]
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed + step)
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=d.device)
    was_training = model.training
    model.eval()
    out = model.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=gen, eot=tokenizer.eot,
                         vocab_size=tokenizer.vocab_size)
    model.train(was_training)
    return [tokenizer.decode(row.tolist()) for row in out]


# ----------------------------------------------------------------------------- graceful stop


class StopSignal:
    """The first SIGINT/SIGTERM asks for a checkpoint at the next step boundary; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}
        if hasattr(signal, "SIGTERM"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):  # not the main thread: no handlers
                    self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: checkpointing at the next step boundary, then exiting", flush=True)

    def agreed(self, d: Dist) -> bool:
        """True on every rank when any rank was asked to stop."""
        if not d.ddp:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# ----------------------------------------------------------------------------- training


def print_config(cfg: TrainConfig) -> None:
    text = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in asdict(cfg).items())
    print("config: " + "\n        ".join(textwrap.wrap(text, 112)))


def eval_only(cfg: TrainConfig, d: Dist) -> dict:
    """Val loss (and HellaSwag when its data is present) of `--init` on this config's data."""
    try:
        model, tokenizer = load_model(cfg.init)
    except ValueError as e:
        sys.exit(f"error: --init {cfg.init}: {e}")
    cfg.block_size = min(cfg.block_size, model.config.block_size)
    _, _, val_loader = build_data(cfg, d, tokenizer)
    dtype = pick_dtype(d.device, cfg.dtype)
    model.to(d.device)
    result = {"val_loss": evaluate_loss(model, val_loader, cfg.eval_iters, d, dtype)}
    examples = hellaswag_examples(cfg, tokenizer)
    if examples:
        hs = evaluate_hellaswag(model, examples, tokenizer, cfg, d, dtype)
        result |= {"hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]}
    if d.master:
        tokens = cfg.eval_iters * cfg.batch_size * cfg.block_size * d.world_size
        print(f"{cfg.init} on {cfg.data_dir if cfg.data == 'shards' else cfg.text_path} ({tokens:,} val tokens): "
              + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def train(cfg: TrainConfig, d: Dist) -> dict:
    """The training loop; returns the final metrics (`val_loss`, `step`, `stopped`)."""
    out_dir = Path(cfg.out_dir)
    accum = grad_accum_steps(cfg, d.world_size)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if d.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for the fp32 parts
        torch.backends.cudnn.allow_tf32 = True
    dtype = pick_dtype(d.device, cfg.dtype)
    device_type = d.device.split(":")[0]

    resume_path, ckpt = find_resume_checkpoint(cfg, d)
    if resume_path is not None and ckpt is None:
        try:
            ckpt = load_checkpoint(resume_path)
        except CheckpointError as e:
            sys.exit(f"error: --resume: {e}")
        for key in ("step", "optimizer", "loader", "rng"):
            if key not in ckpt:
                sys.exit(f"error: --resume: {resume_path} has no {key!r}; it is a model-only checkpoint, "
                         f"use --init {resume_path} to start a new run from its weights")
    tokenizer_hint = tokenizer_from_dict(ckpt["tokenizer"]) if ckpt and cfg.data != "char" else None
    tokenizer, train_loader, val_loader = build_data(cfg, d, tokenizer_hint)

    if cfg.num_samples > 0 and cfg.sample_prompt:
        try:
            tokenizer.encode(cfg.sample_prompt)
        except ValueError as e:
            sys.exit(f"error: --sample_prompt {cfg.sample_prompt!r}: {e}")
    if ckpt is not None:
        try:
            model = model_from_checkpoint(ckpt, str(resume_path))
        except (ValueError, TypeError) as e:
            sys.exit(f"error: --resume: {e}")
        if ckpt["tokenizer"] != tokenizer.to_dict():
            sys.exit(f"error: --resume: {resume_path} was trained with a different {ckpt['tokenizer']['name']} "
                     f"vocabulary than {cfg.text_path} gives; resume with the same data")
        if not cfg.init:
            want = asdict(model_config(cfg, tokenizer)) | {"model_type": cfg.model_type}
            have = ckpt["model_config"] | {"model_type": ckpt.get("model_type", "gpt")}
            diff = [f"{k}={have[k]} (flags say {want[k]})" for k in want if have.get(k) != want[k]]
            if diff:
                sys.exit(f"error: --resume: {resume_path} holds a model with {', '.join(diff)}; use the flags it "
                         f"was trained with or a new --out_dir")
        if ckpt.get("world_size", d.world_size) != d.world_size and d.master:
            print(f"resume: {resume_path.name} was written by {ckpt['world_size']} process(es), this run has "
                  f"{d.world_size}; the data continues at the same global position, gradient accumulation is "
                  f"now {accum}, the total batch is unchanged")
    else:
        model = build_model(cfg, tokenizer)
    if cfg.block_size > model.config.block_size:
        sys.exit(f"error: --block_size {cfg.block_size} is above the model's context {model.config.block_size}; "
                 f"lower it")
    if not cfg.resume and list_checkpoints(out_dir):
        sys.exit(f"error: {out_dir} already has checkpoints ({list_checkpoints(out_dir)[-1].name}); continue it with "
                 f"--resume auto, or pick a new --out_dir")
    model.to(d.device)
    raw = model  # evaluation, sampling and checkpoints use the plain module

    optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps, device_type,
                                         verbose=d.master)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    start_step, time_offset = 0, 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        try:
            train_loader.load_state_dict(ckpt["loader"])
        except ValueError as e:
            sys.exit(f"error: --resume: {e}")
        start_step, time_offset = ckpt["step"], ckpt.get("elapsed", 0.0)
        if d.master:
            print(f"resume: {resume_path} at step {start_step}")

    train_model: torch.nn.Module = model
    if cfg.compile and compile_unsupported(device_type):
        if d.master:
            print(f"compile: off, {compile_unsupported(device_type)}")
        cfg.compile = False
    if cfg.compile:
        train_model = torch.compile(train_model)
    if d.ddp:
        train_model = DDP(train_model, device_ids=[d.local_rank] if device_type == "cuda" else None)

    if d.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "config.json", (json.dumps(asdict(cfg), indent=2) + "\n").encode())
        print_config(cfg)
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"{type(raw).__name__}: {n_params:,} parameters, {tokenizer.name} tokenizer "
              f"({tokenizer.vocab_size} tokens); device {d.device} x {d.world_size}, autocast {dtype}, "
              f"compile {cfg.compile}; {cfg.total_batch_size:,} tokens/step = {d.world_size} rank(s) x "
              f"{accum} micro-step(s) x {cfg.batch_size} x {cfg.block_size}")
    metrics = Metrics(cfg, d.master, time_offset)
    examples = hellaswag_examples(cfg, tokenizer)
    peak = peak_flops(cfg, d.device)
    flops_per_token = raw.flops_per_token(cfg.block_size)
    stop = StopSignal()
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
    del ckpt  # its tensors can be large

    val_loss, stopped, dt_ema = float("nan"), False, None
    if start_step >= cfg.max_steps and d.master:
        print(f"resume: already trained to step {start_step} (--max_steps {cfg.max_steps}); raise --max_steps to go on")
    step = start_step
    try:
        for step in range(start_step, cfg.max_steps + 1):
            last = step == cfg.max_steps
            resumed_here = step == start_step and resume_path is not None
            # evaluation (skipped at a resumed step: it was logged before that checkpoint was written)
            if (step % cfg.eval_interval == 0 or last) and not resumed_here:
                val_loss = evaluate_loss(raw, val_loader, cfg.eval_iters, d, dtype)
                metrics.log(step, val_loss=val_loss)
                if d.master:
                    print(f"step {step:6d} | val loss {val_loss:.4f}", flush=True)
                if examples:
                    hs = evaluate_hellaswag(raw, examples, tokenizer, cfg, d, dtype)
                    metrics.log(step, hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"])
                    if d.master:
                        print(f"step {step:6d} | hellaswag acc {hs['acc']:.4f} acc_norm {hs['acc_norm']:.4f}")
            sample_due = cfg.sample_interval > 0 and step > 0 and step % cfg.sample_interval == 0
            # a finished run resumed again still shows how it writes
            if d.master and (sample_due or last) and (last or not resumed_here) and cfg.num_samples > 0:
                for text in generate_samples(raw, tokenizer, cfg, d, step):
                    metrics.log(step, sample=text)
                    print(f"sample at step {step}:\n{text}\n", flush=True)
            stopped = stop.agreed(d)
            periodic = cfg.ckpt_interval > 0 and (step % cfg.ckpt_interval == 0 or last)
            if step > start_step and (periodic or stopped):
                if d.master:
                    ckpt_out = model_checkpoint_fields(raw, tokenizer) | {
                        "step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                        "loader": train_loader.state_dict(), "rng": rng_state(), "train_config": asdict(cfg),
                        "world_size": d.world_size, "elapsed": metrics.elapsed(), "val_loss": val_loss,
                    }
                    path = checkpoint_path(out_dir, step)
                    write_checkpoint(ckpt_out, path)
                    prune_checkpoints(out_dir, cfg.keep_last)
                    print(f"step {step:6d} | checkpoint {path}", flush=True)
                if d.ddp:
                    dist.barrier()
            if last or stopped:
                break

            # one optimizer step over `accum` micro-batches per rank
            t0 = time.time()
            train_model.train()
            optimizer.zero_grad(set_to_none=True)
            loss_accum = torch.zeros((), device=d.device)
            for micro in range(accum):
                x, y = train_loader.next_batch()
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                # gradients are all-reduced only by the backward of the last micro-step
                sync = not d.ddp or micro == accum - 1
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    with autocast(d.device, dtype):
                        _, loss = train_model(x, y)
                    loss = loss / accum  # the sum over micro-steps is the mean over the whole batch
                    loss_accum += loss.detach()
                    scaler.scale(loss).backward()
            loss_accum = all_mean(loss_accum, d)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            lr = get_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.step(optimizer)
            scaler.update()
            if device_type == "cuda":
                torch.cuda.synchronize()
            loss_value, dt = loss_accum.item(), time.time() - t0
            tok_per_s = cfg.total_batch_size / dt
            mfu = flops_per_token * tok_per_s / (peak * d.world_size) if peak else None
            metrics.log(step, train_loss=loss_value, lr=lr, grad_norm=norm.item(), dt_ms=round(dt * 1000, 2),
                        tok_per_s=round(tok_per_s, 1), mfu=mfu)
            dt_ema = dt if dt_ema is None else 0.9 * dt_ema + 0.1 * dt
            if d.master and (step % cfg.log_interval == 0 or step == cfg.max_steps - 1):
                mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
                print(f"step {step:6d}/{cfg.max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | norm {norm.item():.3f}"
                      f" | {dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s{mfu_text}"
                      f" | eta {fmt_duration(dt_ema * (cfg.max_steps - step - 1))}", flush=True)
    finally:
        stop.restore()
        metrics.close()
    return {"step": step, "val_loss": val_loss, "stopped": stopped}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    d = setup_distributed(cfg.device)
    try:
        if cfg.dtype != "auto":
            pick_dtype(d.device, cfg.dtype)
        return eval_only(cfg, d) if cfg.eval_only else train(cfg, d)
    finally:
        if d.ddp and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
