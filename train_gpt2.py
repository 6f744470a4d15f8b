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

import contextlib
import dataclasses
import math
import random
import signal
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2repro.addition import AdditionLoader, exact_match, held_out_problems
from gpt2repro.autobatch import candidates, largest_that_fits, try_step
from gpt2repro.checkpoint import (
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    model_checkpoint_fields,
    model_from_checkpoint,
    newest_resumable,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from gpt2repro.config import (
    ConfigError,
    TrainConfig,
    auto_batch,
    fit_to_world,
    grad_accum_steps,
    parse_config,
    preset_batch_size,
)
from gpt2repro.data import ShardedTokenLoader, TokenLoader, split_tokens
from gpt2repro.devices import (
    Dist,
    all_mean,
    any_rank,
    autocast,
    compile_cached,
    compile_unsupported,
    convert_to_fp8,
    fp8_unsupported,
    min_over_ranks,
    peak_flops,
    pick_dtype,
    quiet_library_logs,
    setup_distributed,
    teardown_distributed,
    use_compile_cache,
)
from gpt2repro.errors import one_line_errors
from gpt2repro.models import MODEL_CONFIGS, MODEL_TYPES, ModelConfig
from gpt2repro.rundir import CONFIG_FILE, METRICS_FILE, Metrics, RunLock, write_config
from gpt2repro.tokenizer import Tokenizer, get_tokenizer, gpt2_encoding, tokenizer_from_dict
from model import LanguageModel


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`, then `min_lr`."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


# ----------------------------------------------------------------------------- data and model


def read_text(path: str) -> str:
    p = Path(path)
    if not p.exists() and path == TrainConfig.text_path:
        from prepare import ensure_shakespeare

        ensure_shakespeare(p)  # the embedded default needs no set-up step
    try:
        text = p.read_text(encoding="utf-8")
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
    cfg: TrainConfig, d: Dist, tokenizer: Tokenizer | None = None
) -> tuple[Tokenizer, TokenLoader | AdditionLoader, TokenLoader | AdditionLoader]:
    """The tokenizer and the train/val loaders this config asks for (`tokenizer` given: use that one)."""
    B, T = cfg.batch_size, cfg.block_size
    vocab = cfg.vocab_size or None
    if cfg.data == "addition":  # problems drawn on the fly; "val" serves only the held-out ones
        tokenizer = tokenizer or get_tokenizer("addition", digits=cfg.digits, ops=cfg.ops)
        return tokenizer, *(AdditionLoader(tokenizer, B, T, d.rank, d.world_size, cfg.seed, split)
                            for split in ("train", "val"))
    if cfg.data == "shards":
        tokenizer = tokenizer or get_tokenizer("gpt2")
        vocab = vocab or tokenizer.vocab_size
        train = ShardedTokenLoader(cfg.data_dir, "train", B, T, d.rank, d.world_size, cfg.shuffle, cfg.seed,
                                   vocab_size=vocab)
        val = ShardedTokenLoader(cfg.data_dir, "val", B, T, d.rank, d.world_size, False, cfg.seed, vocab_size=vocab)
        return tokenizer, train, val
    text = read_text(cfg.text_path)
    if tokenizer is None:
        tokenizer = get_tokenizer("gpt2") if cfg.data == "gpt2-text" else get_tokenizer("char", text=text)
    # tiktoken's own encoder: the text may hold "<|endoftext|>" literally, which is just text here
    ids = gpt2_encoding().encode_ordinary(text) if tokenizer.name == "gpt2" else tokenizer.encode(text)
    tokens = np.array(ids, dtype=np.uint16 if tokenizer.vocab_size <= 65536 else np.int32)
    train_tokens, val_tokens = split_tokens(tokens, cfg.val_fraction)
    loaders = [TokenLoader([part], B, T, d.rank, d.world_size, cfg.shuffle and split == "train", cfg.seed,
                           tokenizer.eot, name=f"{cfg.text_path} ({split})")
               for part, split in ((train_tokens, "train"), (val_tokens, "val"))]
    return tokenizer, *loaders


def gpt_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model the flags describe: every field of the model type's config (GPTConfig, LectureConfig) has a
    TrainConfig flag of the same name (vocab 0 = the tokenizer's)."""
    config_class = MODEL_CONFIGS[cfg.model_type]
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(config_class)}
    return config_class(**values | {"vocab_size": cfg.vocab_size or tokenizer.vocab_size})


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> LanguageModel:
    """A fresh model from the config's fields, or the `--init` model (whose tokenizer must match the data's)."""
    if not cfg.init:
        if cfg.model_type in ("gpt", "lecture") and cfg.n_embd % cfg.n_head:
            raise ConfigError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
        mc = gpt_config(cfg, tokenizer)
        if mc.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"--vocab_size {mc.vocab_size} is below the tokenizer's {tokenizer.vocab_size}; raise it")
        return MODEL_TYPES[cfg.model_type](mc)
    model, init_tokenizer = load_model(cfg.init)
    if init_tokenizer.to_dict() != tokenizer.to_dict():
        raise ConfigError(f"--init {cfg.init} was trained with the {init_tokenizer.name} tokenizer but the data is "
                          f"{tokenizer.name}; pick a matching --preset or --data")
    return model


def check_sample_prompt(cfg: TrainConfig, tokenizer: Tokenizer) -> None:
    if cfg.num_samples > 0 and cfg.sample_prompt:
        try:
            tokenizer.encode(cfg.sample_prompt)
        except ValueError as e:
            raise ConfigError(f"--sample_prompt {cfg.sample_prompt!r}: {e}") from None


# ----------------------------------------------------------------------------- resuming


def find_resume(cfg: TrainConfig, d: Dist) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from (`--resume PATH`, or with `auto` the newest readable one in out_dir) and
    its contents. Rank 0 decides, setting unreadable files aside, and tells the others which file to load."""
    if not cfg.resume:
        return None, None
    path, ckpt = None, None
    if d.master:
        if cfg.resume == "auto":
            path, ckpt = newest_resumable(Path(cfg.out_dir))
            if path is None:
                print(f"resume: no checkpoint in {cfg.out_dir}, starting fresh")
        else:
            path = Path(cfg.resume)
            if path.is_dir():
                path = latest_checkpoint(path)
                if path is None:
                    raise ConfigError(f"--resume {cfg.resume}: no ckpt_*.pt in that directory; pass a checkpoint "
                                      "file, or --resume auto to start fresh when there is none")
    if d.ddp:
        box = [str(path) if path else ""]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0]) if box[0] else None
    if path is not None and ckpt is None:
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, path)
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


def restore_model(cfg: TrainConfig, ckpt: dict, path: Path, tokenizer: Tokenizer) -> LanguageModel:
    """The checkpoint's model, after checking that it is the run the flags describe."""
    model = model_from_checkpoint(ckpt, str(path))
    if ckpt["tokenizer"] != tokenizer.to_dict():
        source = cfg.data_dir if cfg.data == "shards" else cfg.text_path
        raise ConfigError(f"--resume: {path} was trained with a different {ckpt['tokenizer'].get('name')} "
                          f"vocabulary than {source} gives; resume with the same data")
    if not cfg.init:
        want = asdict(gpt_config(cfg, tokenizer)) | {"model_type": cfg.model_type}
        have = ckpt["model_config"] | {"model_type": ckpt.get("model_type", "gpt")}
        diff = [f"{k}={have.get(k)} (flags say {want[k]})" for k in want if have.get(k) != want[k]]
        if diff:
            raise ConfigError(f"--resume: {path} holds a model with {', '.join(diff)}; use the flags it was "
                              "trained with or a new --out_dir")
    return model


def make_optimizer(model: LanguageModel, cfg: TrainConfig, device_type: str, verbose: bool = False):
    return model.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps, device_type,
                                      verbose=verbose, optimizer=cfg.optimizer, muon_lr=cfg.muon_lr,
                                      muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay)


def choose_batch_size(cfg: TrainConfig, d: Dist, model: LanguageModel, dtype: torch.dtype) -> TrainConfig:
    """`--batch_size auto` (and the presets' own micro-batch on CUDA): the largest that fits, up to the preset's,
    dividing the rows each rank needs per step so accumulation keeps the total batch; the same on every rank."""
    upper = cfg.batch_size or preset_batch_size(cfg.preset)
    rows = max(1, cfg.total_batch_size // (cfg.block_size * d.world_size))
    sizes = candidates(min(upper, rows), rows)
    if not d.device.startswith("cuda"):  # nothing to probe: the largest that keeps the total batch
        return dataclasses.replace(cfg, batch_size=sizes[0])
    device_type = d.device.split(":")[0]
    fits = lambda b: try_step(model, lambda: make_optimizer(model, cfg, device_type), b,  # noqa: E731
                              cfg.block_size, model.config.vocab_size, d.device, dtype)
    chosen = min_over_ranks(largest_that_fits(fits, sizes) or 0, d)
    if not chosen:
        raise ConfigError(f"not even 1 row of --block_size {cfg.block_size} fits in GPU memory for this model; lower "
                          "--block_size or the model size (--n_layer, --n_embd), or use --dtype bfloat16")
    if d.master:
        print(f"batch_size auto: {chosen} (the largest of {sizes} that fits a full training step)")
    return dataclasses.replace(cfg, batch_size=chosen)


def restore_training(ckpt: dict, cfg: TrainConfig, optimizer, scaler, loader: TokenLoader) -> tuple[int, float]:
    """Optimizer, scaler and loader states; returns the step to continue at and the wall time so far."""
    trained = {"optimizer": "adamw"} | ckpt.get("train_config", {})
    # the optimizer state belongs to its optimizer; the seed and shuffling decide the data order (and which
    # addition problems are held out), which the loader state continues
    for flag in ("optimizer", "seed", "shuffle"):
        was, now = trained.get(flag, getattr(cfg, flag)), getattr(cfg, flag)
        if was != now:
            show = lambda v: str(v).lower() if isinstance(v, bool) else v  # noqa: E731
            raise ConfigError(f"--resume: the checkpoint was trained with --{flag} {show(was)}, not {show(now)}; "
                              f"resume with the --{flag} it was trained with")
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt.get("elapsed", 0.0)


# ----------------------------------------------------------------------------- evaluation and samples


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
            _, loss = model(x.to(d.device), y.to(d.device), return_logits=False)
        total += loss.detach().float()
    model.train(was_training)
    return all_mean(total / iters, d).item()


def hellaswag_examples(cfg: TrainConfig, tokenizer: Tokenizer) -> list[dict] | None:
    """HellaSwag val examples when their data is on disk (never downloaded here) and the model speaks GPT-2."""
    if tokenizer.name != "gpt2" or cfg.data == "char":  # --hellaswag_jsonl with such data is refused up front
        return None
    import hellaswag

    limit = cfg.hellaswag_limit or None
    try:
        if cfg.hellaswag_jsonl:
            return hellaswag.load_examples(jsonl=cfg.hellaswag_jsonl, limit=limit)
        if cfg.hellaswag and hellaswag.cached_path("val").exists():
            return hellaswag.load_examples("val", limit=limit)
    except (OSError, ValueError) as e:
        raise ValueError(f"HellaSwag data: {e}") from None
    return None


def held_out(cfg: TrainConfig, tokenizer: Tokenizer) -> list[str] | None:
    """1,000 addition problems the loader never serves for training (None for other data)."""
    return held_out_problems(tokenizer, cfg.seed, 1000) if tokenizer.name == "addition" else None


def evaluate_hellaswag(model: LanguageModel, examples: list[dict], tokenizer: Tokenizer, cfg: TrainConfig,
                       d: Dist, dtype: torch.dtype) -> dict:
    import hellaswag

    was_training = model.training
    model.eval()
    # as many tokens per forward as one training micro-batch, which is known to fit
    result = hellaswag.evaluate(model, examples, tokenizer=tokenizer, batch_tokens=cfg.batch_size * cfg.block_size,
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
    # the CUDA-graph decode step compiles once (tens of seconds): only where the run compiles anyway
    out = model.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=gen, eot=tokenizer.eot,
                         vocab_size=tokenizer.vocab_size, decode="auto" if cfg.compile else "eager")
    model.train(was_training)
    return [tokenizer.decode(row.tolist()) for row in out]


# ----------------------------------------------------------------------------- graceful stop


class StopSignal:
    """The first SIGINT/SIGTERM asks for a checkpoint at the next step boundary; a second one stops at once,
    except inside a checkpoint write, which is finished first."""

    def __init__(self) -> None:
        self.requested = self.saving = self.urgent = False
        self.previous = {}
        for sig in (signal.SIGINT, getattr(signal, "SIGTERM", signal.SIGINT)):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        if self.requested:
            self.urgent = True
            if not self.saving:
                raise KeyboardInterrupt
            return
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: checkpointing at the next step boundary, then exiting", flush=True)

    @contextlib.contextmanager
    def saving_checkpoint(self):
        """A second signal during a checkpoint write waits for the write to finish."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.urgent:
            raise KeyboardInterrupt

    def agreed(self, d: Dist) -> bool:
        """True on every rank when any rank was asked to stop."""
        return any_rank(self.requested, d)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# ----------------------------------------------------------------------------- the trainer


class Diverged(ValueError):
    """The loss or the gradient went non-finite; the message names the step and what to do."""


@dataclass
class Trainer:
    """Everything one training run holds; each method is one stage of the lecture's loop."""

    cfg: TrainConfig
    d: Dist
    dtype: torch.dtype
    raw: LanguageModel  # evaluation, sampling and checkpoints use the plain module
    model: torch.nn.Module  # the compiled and/or DDP-wrapped module that trains
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tokenizer: Tokenizer
    train_loader: TokenLoader
    val_loader: TokenLoader
    metrics: Metrics
    accum: int
    examples: list[dict] | None = None  # HellaSwag, scored at every evaluation when present
    problems: list[str] | None = None  # held-out addition problems, scored likewise
    val_loss: float = float("nan")
    target_reached: dict | None = None
    skipped: int = 0
    dt_ema: float | None = None

    def evaluate(self, step: int) -> None:
        cfg, d = self.cfg, self.d
        self.val_loss = evaluate_loss(self.raw, self.val_loader, cfg.eval_iters, d, self.dtype)
        self.metrics.log(step, val_loss=self.val_loss)
        if d.master:
            print(f"step {step:6d} | val loss {self.val_loss:.4f}", flush=True)
        if cfg.target_val_loss > 0 and self.target_reached is None and self.val_loss <= cfg.target_val_loss:
            self.target_reached = {"step": step, "tokens": step * cfg.total_batch_size,
                                   "time": round(self.metrics.elapsed(), 3), "val_loss": self.val_loss}
            self.metrics.log(step, target_reached=self.target_reached)
            if d.master:
                print(f"step {step:6d} | val loss {self.val_loss:.4f} <= target {cfg.target_val_loss} after "
                      f"{self.target_reached['tokens']:,} tokens, {fmt_duration(self.target_reached['time'])}")
        if self.problems:
            acc = exact_match(self.raw, self.tokenizer, self.problems, d.device)
            self.metrics.log(step, addition_acc=acc)
            if d.master:
                print(f"step {step:6d} | exact match {acc:.4f} on {len(self.problems):,} held-out problems")
        if self.examples:
            hs = evaluate_hellaswag(self.raw, self.examples, self.tokenizer, cfg, d, self.dtype)
            self.metrics.log(step, hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"])
            if d.master:
                print(f"step {step:6d} | hellaswag acc {hs['acc']:.4f} acc_norm {hs['acc_norm']:.4f}")

    def sample(self, step: int) -> None:
        for text in generate_samples(self.raw, self.tokenizer, self.cfg, self.d, step):
            self.metrics.log(step, sample=text)
            print(f"sample at step {step}:\n{text}\n", flush=True)

    def save(self, step: int, stop: StopSignal) -> None:
        """Rank 0 writes the step's checkpoint (every rank waits for it)."""
        if self.d.master:
            ckpt = model_checkpoint_fields(self.raw, self.tokenizer) | {
                "step": step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "loader": self.train_loader.state_dict(), "rng": rng_state(), "train_config": asdict(self.cfg),
                "world_size": self.d.world_size, "elapsed": self.metrics.elapsed(), "val_loss": self.val_loss,
                "target_reached": self.target_reached,
            }
            with stop.saving_checkpoint():
                path = write_checkpoint(ckpt, Path(self.cfg.out_dir), step, self.cfg.keep_last)
            print(f"step {step:6d} | checkpoint {path}", flush=True)
        if self.d.ddp:
            dist.barrier()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch on the device; on CUDA copied from pinned memory without waiting for it."""
        x, y = self.train_loader.next_batch()
        if self.d.device.startswith("cuda"):
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.d.device, non_blocking=True), y.to(self.d.device, non_blocking=True)

    def forward_backward(self) -> torch.Tensor:
        """Gradients of one whole batch over `accum` micro-batches; returns the mean loss over ranks."""
        d, accum = self.d, self.accum
        loss_accum = torch.zeros((), device=d.device)
        batch = self.next_batch()
        for micro in range(accum):
            x, y = batch
            # gradients are all-reduced only by the backward of the last micro-step
            sync = not d.ddp or micro == accum - 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast(d.device, self.dtype):
                    _, loss = self.model(x, y, return_logits=False)
                if micro + 1 < accum:  # the next batch is read and copied while this one computes
                    batch = self.next_batch()
                loss = loss / accum  # the sum over micro-steps is the mean over the whole batch
                loss_accum += loss.detach()
                self.scaler.scale(loss).backward()
        return all_mean(loss_accum, d)

    def optimizer_step(self, step: int) -> dict:
        """One optimizer step over the whole batch; a non-finite loss or gradient is skipped or stops the run."""
        cfg = self.cfg
        lr = get_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        t0 = time.time()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        loss_value, norm_value = torch.stack([loss.float(), norm.float()]).tolist()  # one host sync
        # under fp16 the scaler skips inf gradients itself while it searches for its scale
        if not math.isfinite(loss_value) or (not self.scaler.is_enabled() and not math.isfinite(norm_value)):
            self.skip_nonfinite(step, loss_value, norm_value)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups follow the schedule from muon_lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.d.device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"train_loss": loss_value, "lr": lr, "grad_norm": norm_value, "dt": time.time() - t0}

    def skip_nonfinite(self, step: int, loss: float, norm: float) -> None:
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.skipped > self.cfg.nonfinite_skips:
            newest = latest_checkpoint(self.cfg.out_dir)
            kept = f"the newest checkpoint {newest} is kept" if newest else "no checkpoint was written"
            raise Diverged(f"step {step}: loss {loss}, gradient norm {norm}: the run diverged; {kept}. Lower "
                           "--max_lr, or pass --nonfinite_skips N to skip isolated bad steps")
        if self.d.master:
            print(f"step {step:6d} | loss {loss}, gradient norm {norm}: step skipped "
                  f"({self.skipped}/{self.cfg.nonfinite_skips})", flush=True)

    def log(self, step: int, stats: dict) -> None:
        cfg, dt = self.cfg, stats["dt"]
        tok_per_s = cfg.total_batch_size / dt
        peak = peak_flops(self.d.device, cfg.peak_flops, self.dtype)
        mfu = self.raw.flops_per_token(cfg.block_size) * tok_per_s / (peak * self.d.world_size) if peak else None
        mem = torch.cuda.max_memory_allocated(self.d.device) / 2**30 if self.d.device.startswith("cuda") else None
        self.metrics.log(step, train_loss=stats["train_loss"], lr=stats["lr"], grad_norm=stats["grad_norm"],
                         dt_ms=round(dt * 1000, 2), tok_per_s=round(tok_per_s, 1), mfu=mfu, peak_mem_gib=mem)
        self.dt_ema = dt if self.dt_ema is None else 0.9 * self.dt_ema + 0.1 * dt
        if self.d.master and (step % cfg.log_interval == 0 or step == cfg.max_steps - 1):
            mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
            mfu_text += f" | {mem:.1f} GiB" if mem is not None else ""
            print(f"step {step:6d}/{cfg.max_steps} | loss {stats['train_loss']:.4f} | lr {stats['lr']:.2e} | norm "
                  f"{stats['grad_norm']:.3f} | {dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s{mfu_text}"
                  f" | eta {fmt_duration(self.dt_ema * (cfg.max_steps - step - 1))}", flush=True)


# ----------------------------------------------------------------------------- set-up


def seed_everything(seed: int, device: str) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for the fp32 parts
        torch.backends.cudnn.allow_tf32 = True


def wrap_model(model: LanguageModel, cfg: TrainConfig, d: Dist) -> tuple[torch.nn.Module, bool]:
    """The module the training step calls: compiled where it can be, DDP across ranks; and whether compiled."""
    device_type = d.device.split(":")[0]
    compiled = cfg.compile and not compile_unsupported(device_type)
    if cfg.compile and not compiled and d.master:
        print(f"compile: off, {compile_unsupported(device_type)}")
    if cfg.fp8:
        layers = convert_to_fp8(model)
        if d.master:
            print(f"fp8: {len(layers)} linear layers run their matmuls in FP8 (torchao, tensorwise scaling)")
    wrapped: torch.nn.Module = compile_cached(model) if compiled else model
    if compiled and d.master:
        print(f"compile: caches in {use_compile_cache()} (a restarted run reuses them)")
    if d.ddp:
        wrapped = DDP(wrapped, device_ids=[d.local_rank] if device_type == "cuda" else None)
    return wrapped, compiled


def announce(cfg: TrainConfig, d: Dist, raw: LanguageModel, tokenizer: Tokenizer, dtype, accum: int,
             compiled: bool) -> None:
    text = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in asdict(cfg).items())
    print("config: " + "\n        ".join(textwrap.wrap(text, 112)))
    n_params = sum(p.numel() for p in raw.parameters())
    print(f"{type(raw).__name__}: {n_params:,} parameters, {tokenizer.name} tokenizer "
          f"({tokenizer.vocab_size} tokens); device {d.device} x {d.world_size}, autocast {dtype}, "
          f"compile {compiled}; {cfg.total_batch_size:,} tokens/step = {d.world_size} rank(s) x "
          f"{accum} micro-step(s) x {cfg.batch_size} x {cfg.block_size}")


def given_tokenizer(cfg: TrainConfig, ckpt: dict | None) -> Tokenizer | None:
    """The tokenizer the data must be read with, or None to build it from the data: a resumed run's, except for a
    character vocabulary made from the text (rebuilt, so a changed text is caught); and a character checkpoint's
    given as --init, whose vocabulary must then cover the text (pretrained on a larger corpus, say)."""
    if ckpt:
        keeps_vocab = cfg.data != "char" or ckpt.get("train_config", {}).get("init")
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


def restore_or_build(cfg: TrainConfig, d: Dist, ckpt: dict | None, resume_path: Path | None, dtype: torch.dtype):
    """The data and the model: the checkpoint's when resuming, else new; with the micro-batch chosen where it is
    `auto`. Returns the config with that batch, the tokenizer, both loaders and the model on its device."""
    wanted = cfg
    if auto_batch(cfg, d.device):  # loaders are built at the upper bound first, then again at the chosen size
        trained = (ckpt or {}).get("train_config", {}).get("batch_size")
        cfg = dataclasses.replace(cfg, batch_size=trained or cfg.batch_size or preset_batch_size(cfg.preset))
    tokenizer, train_loader, val_loader = build_data(cfg, d, given_tokenizer(cfg, ckpt))
    raw = restore_model(cfg, ckpt, resume_path, tokenizer) if ckpt else build_model(cfg, tokenizer)
    check_sample_prompt(cfg, tokenizer)  # after the vocabulary check: a changed text is the cause to name
    if cfg.block_size > raw.config.block_size:
        raise ConfigError(f"--block_size {cfg.block_size} is above the model's context {raw.config.block_size}; "
                          "lower it")
    check_out_dir(cfg, resume_path)
    raw.to(d.device)
    if auto_batch(wanted, d.device):
        chosen = choose_batch_size(cfg, d, raw, dtype)
        if d.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(d.device)  # the peak logged is training's, not the probe's
        if chosen.batch_size != cfg.batch_size:
            tokenizer, train_loader, val_loader = build_data(chosen, d, tokenizer)
        cfg = chosen
    return cfg, tokenizer, train_loader, val_loader, raw


def set_up(cfg: TrainConfig, d: Dist) -> tuple[Trainer, int, Path | None]:
    """Restore or build everything a run needs; returns the trainer, the first step and the resumed file."""
    if not auto_batch(cfg, d.device):
        grad_accum_steps(cfg, d.world_size)  # a batch that cannot make the total is refused before anything runs
    if cfg.fp8 and (why := fp8_unsupported(d.device)):
        raise ValueError(why)
    seed_everything(cfg.seed, d.device)
    dtype = pick_dtype(d.device, cfg.dtype)
    resume_path, ckpt = find_resume(cfg, d)
    cfg, tokenizer, train_loader, val_loader, raw = restore_or_build(cfg, d, ckpt, resume_path, dtype)
    accum = grad_accum_steps(cfg, d.world_size)
    device_type = d.device.split(":")[0]
    optimizer = make_optimizer(raw, cfg, device_type, verbose=d.master)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    start_step, elapsed, target_reached = 0, 0.0, None
    if ckpt is not None:
        start_step, elapsed = restore_training(ckpt, cfg, optimizer, scaler, train_loader)
        target_reached = ckpt.get("target_reached")
        report_resume(resume_path, ckpt, d, accum)
    del ckpt  # its tensors can be large
    model, compiled = wrap_model(raw, cfg, d)
    out_dir = Path(cfg.out_dir) if d.master else None
    if d.master:
        write_config(out_dir, asdict(cfg))
        announce(cfg, d, raw, tokenizer, dtype, accum, compiled)
    metrics = Metrics(out_dir, elapsed, cfg.tensorboard, cfg.wandb_project if cfg.wandb else "", asdict(cfg))
    trainer = Trainer(cfg, d, dtype, raw, model, optimizer, scaler, tokenizer, train_loader, val_loader, metrics,
                      accum, hellaswag_examples(cfg, tokenizer), held_out(cfg, tokenizer),
                      target_reached=target_reached)
    return trainer, start_step, resume_path


def report_resume(path: Path, ckpt: dict, d: Dist, accum: int) -> None:
    if not d.master:
        return
    if ckpt.get("world_size", d.world_size) != d.world_size:
        print(f"resume: {path.name} was written by {ckpt['world_size']} process(es), this run has "
              f"{d.world_size}; the data continues at the same global position, gradient accumulation is "
              f"now {accum}, the total batch is unchanged")
    print(f"resume: {path} at step {ckpt['step']}")


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, d: Dist) -> dict:
    """The training loop; returns the final metrics (`val_loss`, `step`, `stopped`, `target_reached`)."""
    lock = RunLock(Path(cfg.out_dir)) if d.master else None  # one trainer per run directory
    try:
        t, start_step, resume_path = set_up(cfg, d)
        return loop(t, start_step, resume_path is not None)
    finally:
        if lock is not None:
            lock.release()


def loop(t: Trainer, start_step: int, resumed: bool) -> dict:
    """evaluate, sample, checkpoint, one optimizer step, log — until max_steps or a stop signal."""
    cfg, d = t.cfg, t.d
    if start_step >= cfg.max_steps and d.master:
        print(f"resume: already trained to step {start_step} (--max_steps {cfg.max_steps}); raise --max_steps to go on")
    stop, step, stopped = StopSignal(), start_step, False
    try:
        for step in range(start_step, cfg.max_steps + 1):
            last = step == cfg.max_steps
            resumed_here = resumed and step == start_step  # its evaluation was logged before the checkpoint
            if (step % cfg.eval_interval == 0 or last) and not resumed_here:
                t.evaluate(step)
            sample_due = cfg.sample_interval > 0 and step > 0 and step % cfg.sample_interval == 0
            # a finished run resumed again still shows how it writes
            if d.master and cfg.num_samples > 0 and (last or (sample_due and not resumed_here)):
                t.sample(step)
            stopped = stop.agreed(d) or (cfg.stop_at_target and t.target_reached is not None)
            periodic = cfg.ckpt_interval > 0 and (step % cfg.ckpt_interval == 0 or last)
            if step > start_step and (periodic or stopped):
                t.save(step, stop)
            if last or stopped:
                break
            t.log(step, t.optimizer_step(step))
    finally:
        stop.restore()
        t.metrics.close()
    return {"step": step, "val_loss": t.val_loss, "stopped": stopped, "target_reached": t.target_reached}


def eval_only(cfg: TrainConfig, d: Dist) -> dict:
    """Val loss (and HellaSwag when its data is present) of `--init` on this config's data."""
    model, tokenizer = load_model(cfg.init)
    if cfg.data == "shards" and tokenizer.name != "gpt2":
        raise ConfigError(f"--eval_only: {cfg.init} uses the {tokenizer.name} tokenizer, but the shards in "
                          f"{cfg.data_dir} hold GPT-2 tokens; evaluate it on its own text with --data {tokenizer.name}"
                          " --text_path FILE")
    cfg = dataclasses.replace(cfg, block_size=min(cfg.block_size, model.config.block_size),
                              vocab_size=model.config.vocab_size)
    dtype = pick_dtype(d.device, cfg.dtype)
    model.to(d.device)
    if not cfg.batch_size:  # auto: what training would pick (a training step fits, so evaluation does)
        cfg = choose_batch_size(cfg, d, model, dtype)
    _, _, val_loader = build_data(cfg, d, tokenizer)
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


def fmt_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv: list[str] | None = None) -> dict:
    quiet_library_logs()
    with one_line_errors():
        cfg = parse_config(argv, description=__doc__)
        d = setup_distributed(cfg.device)
        try:
            fitted = fit_to_world(cfg, d.world_size)
            if fitted.batch_size != cfg.batch_size and d.master:
                print(f"batch_size lowered to {fitted.batch_size} so {d.world_size} ranks make the total batch of "
                      f"{cfg.total_batch_size:,} tokens")
            return eval_only(fitted, d) if cfg.eval_only else train(fitted, d)
        except KeyboardInterrupt:
            sys.exit(f"interrupted: stopped before the next checkpoint; continue with --resume auto --out_dir "
                     f"{cfg.out_dir}")
        finally:
            teardown_distributed()


if __name__ == "__main__":
    main()
