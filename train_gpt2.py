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
`--fsdp true` shards weights, gradients and optimizer state over the ranks (docs/sharding.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gpt2repro.addition import exact_match, held_out_problems
from gpt2repro.autobatch import check_batch, choose_batch_size, fit_to_world, grad_accum_steps
from gpt2repro.build import build_data, make_optimizer, seed_everything, wrap_model
from gpt2repro.checkpoint import latest_checkpoint, load_model, model_checkpoint_fields, rng_state, write_checkpoint
from gpt2repro.config import ConfigError, TrainConfig, parse_config
from gpt2repro.data import TokenLoader
from gpt2repro.devices import (
    Dist,
    all_mean,
    autocast,
    fp8_unsupported,
    peak_flops,
    pick_dtype,
    quiet_library_logs,
    setup_distributed,
    teardown_distributed,
)
from gpt2repro.errors import one_line_errors
from gpt2repro.eval_mode import eval_mode
from gpt2repro.resume import find_resume, report_resume, restore_or_build, restore_training
from gpt2repro.rundir import Metrics, RunLock, write_config
from gpt2repro.sharding import (
    clip_grad_norm,
    full_model_on_every_rank,
    load_sharded,
    set_gradient_sync,
    write_sharded_checkpoint,
)
from gpt2repro.stopping import StopSignal
from gpt2repro.tokenizer import Tokenizer
from model import LanguageModel


def main(argv: list[str] | None = None) -> dict:
    quiet_library_logs()
    with one_line_errors():
        cfg = parse_config(argv, description=__doc__)
        dist = setup_distributed(cfg.device)
        try:
            fitted = fit_to_world(cfg, dist.world_size)
            if fitted.batch_size != cfg.batch_size and dist.master:
                print(f"batch_size lowered to {fitted.batch_size} so {dist.world_size} ranks make the total batch of "
                      f"{cfg.total_batch_size:,} tokens")
            fetch_default_text(fitted)
            return eval_only(fitted, dist) if cfg.eval_only else train(fitted, dist)
        except KeyboardInterrupt:
            sys.exit(f"interrupted: stopped before the next checkpoint; continue with --resume auto --out_dir "
                     f"{cfg.out_dir}")
        finally:
            teardown_distributed()


def fetch_default_text(cfg: TrainConfig) -> None:
    """The embedded default needs no set-up step: tiny Shakespeare is put at the default --text_path if absent."""
    path = Path(cfg.text_path)
    if cfg.data in ("char", "gpt2-text") and cfg.text_path == TrainConfig.text_path and not path.exists():
        from prepare import ensure_shakespeare

        ensure_shakespeare(path)


def train(cfg: TrainConfig, dist: Dist) -> dict:
    """The training loop; returns the final metrics (`val_loss`, `step`, `stopped`, `target_reached`)."""
    lock = RunLock(Path(cfg.out_dir)) if dist.master else None  # one trainer per run directory
    try:
        trainer, start_step, resume_path = set_up(cfg, dist)
        return loop(trainer, start_step, resume_path is not None)
    finally:
        if lock is not None:
            lock.release()


def set_up(cfg: TrainConfig, dist: Dist) -> tuple[Trainer, int, Path | None]:
    """Restore or build everything a run needs; returns the trainer, the first step and the resumed file."""
    check_batch(cfg, dist)
    if cfg.fp8 and (why := fp8_unsupported(dist.device)):
        raise ValueError(why)
    seed_everything(cfg.seed, dist.device)
    dtype = pick_dtype(dist.device, cfg.dtype)
    resume_path, ckpt = find_resume(cfg, dist)
    cfg, tokenizer, train_loader, val_loader, raw = restore_or_build(cfg, dist, ckpt, resume_path, dtype)
    accum = grad_accum_steps(cfg, dist.world_size)
    device_type = dist.device.split(":")[0]
    if cfg.fsdp:  # sharded first: the optimizer holds the shards, and a checkpoint's shards load into both
        if dtype == torch.float16:
            raise ConfigError("--fsdp true runs in bfloat16 or float32, and --dtype auto picked float16 on this GPU; "
                              "pass --dtype float32")
        model, compiled = wrap_model(raw, cfg, dist, dtype)
    optimizer = make_optimizer(raw, cfg, device_type, verbose=dist.master, dtype=dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    start_step, elapsed, target_reached = 0, 0.0, None
    if ckpt is not None:
        optimizers = getattr(optimizer, "optimizers", [optimizer])
        shards = (lambda: load_sharded(resume_path.with_suffix(".dcp"), raw, optimizers)) if cfg.fsdp else None
        start_step, elapsed = restore_training(ckpt, cfg, optimizer, scaler, train_loader, verbose=dist.master,
                                               shards=shards)
        target_reached = target_still_reached(ckpt.get("target_reached"), cfg.target_val_loss)
        report_resume(resume_path, ckpt, dist, accum)
    del ckpt  # its tensors can be large
    if not cfg.fsdp:
        model, compiled = wrap_model(raw, cfg, dist, dtype)
    out_dir = Path(cfg.out_dir) if dist.master else None
    if dist.master:
        write_config(out_dir, asdict(cfg))
        announce(cfg, dist, raw, tokenizer, dtype, accum, compiled)
    metrics = Metrics(out_dir, elapsed, cfg.tensorboard, cfg.wandb_project if cfg.wandb else "", asdict(cfg))
    trainer = Trainer(cfg, dist, dtype, raw, model, optimizer, scaler, tokenizer, train_loader, val_loader, metrics,
                      accum, hellaswag_examples(cfg, tokenizer), held_out(cfg, tokenizer),
                      target_reached=target_reached)
    return trainer, start_step, resume_path


def target_still_reached(reached: dict | None, target: float) -> dict | None:
    """The checkpoint's record of reaching the target, if it reached this run's `--target_val_loss` too."""
    return reached if reached and 0 < target and reached["val_loss"] <= target else None


def loop(trainer: Trainer, start_step: int, resumed: bool) -> dict:
    """evaluate, checkpoint, sample, one optimizer step, log — until max_steps or a stop signal."""
    cfg, dist = trainer.cfg, trainer.dist
    if dist.master and (done := already_done(cfg, start_step, trainer.target_reached)):
        print(done)
    stop, step, stopped = StopSignal(), start_step, False
    try:
        for step in range(start_step, cfg.max_steps + 1):
            last = step == cfg.max_steps
            resumed_here = resumed and step == start_step  # its evaluation was logged before the checkpoint
            if (step % cfg.eval_interval == 0 or last) and not resumed_here:
                trainer.evaluate(step)
            stopped = stop.agreed(dist) or (cfg.stop_at_target and trainer.target_reached is not None)
            periodic = cfg.ckpt_interval > 0 and (step % cfg.ckpt_interval == 0 or last)
            # the checkpoint comes before the samples: a sampling that fails or never ends loses no training
            if step > start_step and (periodic or stopped):
                trainer.save(step, stop)
            sample_due = cfg.sample_interval > 0 and step > 0 and step % cfg.sample_interval == 0
            # a finished run resumed again still shows how it writes
            if cfg.num_samples > 0 and (last or (sample_due and not resumed_here)):
                trainer.sample(step)
            if last or stopped:
                break
            trainer.log(step, trainer.optimizer_step(step))
    finally:
        stop.restore()
        trainer.metrics.close()
    return {"step": step, "val_loss": trainer.val_loss, "stopped": stopped, "target_reached": trainer.target_reached}


def already_done(cfg: TrainConfig, start_step: int, target_reached: dict | None) -> str:
    """Why a resumed run has nothing to train ("" when it has): the run then ends at once, with exit status 0."""
    if start_step >= cfg.max_steps:
        return f"resume: already trained to step {start_step} (--max_steps {cfg.max_steps}); raise --max_steps to go on"
    if cfg.stop_at_target and target_reached is not None:
        return (f"resume: --target_val_loss {cfg.target_val_loss} was reached at step {target_reached['step']} (val "
                f"loss {target_reached['val_loss']:.4f}) and --stop_at_target stops there; nothing to train, drop "
                "--stop_at_target (or lower --target_val_loss) to go on")
    return ""


# ----------------------------------------------------------------------------- the trainer


@dataclass
class Trainer:
    """Everything one training run holds; each method is one stage of the lecture's loop."""

    cfg: TrainConfig
    dist: Dist
    dtype: torch.dtype
    raw: LanguageModel  # evaluation, sampling and checkpoints use the plain module
    model: torch.nn.Module  # the compiled and/or DDP-wrapped module that trains (under FSDP: raw itself, sharded)
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
        cfg, dist = self.cfg, self.dist
        self.val_loss = evaluate_loss(self.raw, self.val_loader, cfg.eval_iters, dist, self.dtype)
        self.metrics.log(step, val_loss=self.val_loss)
        if dist.master:
            print(f"step {step:6d} | val loss {self.val_loss:.4f}", flush=True)
        if cfg.target_val_loss > 0 and self.target_reached is None and self.val_loss <= cfg.target_val_loss:
            self.target_reached = {"step": step, "tokens": step * cfg.total_batch_size,
                                   "time": round(self.metrics.elapsed(), 3), "val_loss": self.val_loss}
            self.metrics.log(step, target_reached=self.target_reached)
            if dist.master:
                print(f"step {step:6d} | val loss {self.val_loss:.4f} <= target {cfg.target_val_loss} after "
                      f"{self.target_reached['tokens']:,} tokens, {fmt_duration(self.target_reached['time'])}")
        plain = self.plain() if self.problems or self.examples else None
        if self.problems:
            acc = exact_match(plain, self.tokenizer, self.problems, dist.device)
            self.metrics.log(step, addition_acc=acc)
            if dist.master:
                print(f"step {step:6d} | exact match {acc:.4f} on {len(self.problems):,} held-out problems")
        if self.examples:
            hs = evaluate_hellaswag(plain, self.examples, self.tokenizer, cfg, dist, self.dtype)
            self.metrics.log(step, hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"])
            if dist.master:
                print(f"step {step:6d} | hellaswag acc {hs['acc']:.4f} acc_norm {hs['acc_norm']:.4f}")

    def plain(self) -> LanguageModel:
        """The model as one plain module on this rank: under FSDP a whole copy gathered from the shards (every rank
        calls this), for what does not run the model in step on every rank: sampling, HellaSwag, addition."""
        return full_model_on_every_rank(self.raw, self.dist.device) if self.cfg.fsdp else self.raw

    def sample(self, step: int) -> None:
        """Rank 0 samples (every rank calls this: under FSDP each gathers the whole model)."""
        model = self.plain()
        if not self.dist.master:
            return
        for text in generate_samples(model, self.tokenizer, self.cfg, self.dist, step):
            self.metrics.log(step, sample=text)
            print(f"sample at step {step}:\n{text}\n", flush=True)

    def training_state(self, step: int) -> dict:
        """Where the run is, beside its weights and optimizer state (the same on every rank: rank 0's is saved)."""
        return {"step": step, "scaler": self.scaler.state_dict(), "loader": self.train_loader.state_dict(),
                "rng": rng_state(), "train_config": asdict(self.cfg), "world_size": self.dist.world_size,
                "elapsed": self.metrics.elapsed(), "val_loss": self.val_loss, "target_reached": self.target_reached}

    def save(self, step: int, stop: StopSignal) -> None:
        """Rank 0 writes the step's checkpoint (every rank waits for it); under FSDP every rank writes its shards
        and rank 0 the whole model beside them."""
        if self.cfg.fsdp:
            optimizers = getattr(self.optimizer, "optimizers", [self.optimizer])
            with stop.saving_checkpoint():
                path = write_sharded_checkpoint(Path(self.cfg.out_dir), step, self.raw, optimizers, self.tokenizer,
                                                self.training_state(step), self.cfg.keep_last, self.dist.rank)
            if self.dist.master:
                print(f"step {step:6d} | checkpoint {path} (shards in {path.with_suffix('.dcp').name}/)", flush=True)
            return
        if self.dist.master:
            ckpt = model_checkpoint_fields(self.raw, self.tokenizer) | self.training_state(step) | {
                "optimizer": self.optimizer.state_dict()}
            with stop.saving_checkpoint():
                path = write_checkpoint(ckpt, Path(self.cfg.out_dir), step, self.cfg.keep_last)
            print(f"step {step:6d} | checkpoint {path}", flush=True)
        if self.dist.ddp:
            torch.distributed.barrier()

    def optimizer_step(self, step: int) -> dict:
        """One optimizer step over the whole batch; a non-finite loss or gradient is skipped or stops the run."""
        cfg = self.cfg
        lr = get_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        t0 = time.time()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward()
        self.scaler.unscale_(self.optimizer)
        clip = clip_grad_norm if cfg.fsdp else torch.nn.utils.clip_grad_norm_  # FSDP: the norm over every shard
        norm = clip(self.raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        loss_value, norm_value = torch.stack([loss.float(), norm.float()]).tolist()  # one host sync
        # under fp16 the scaler skips inf gradients itself while it searches for its scale
        if not math.isfinite(loss_value) or (not self.scaler.is_enabled() and not math.isfinite(norm_value)):
            self.skip_nonfinite(step, loss_value, norm_value)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups follow the schedule from muon_lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.dist.device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"train_loss": loss_value, "lr": lr, "grad_norm": norm_value, "dt": time.time() - t0}

    def forward_backward(self) -> torch.Tensor:
        """Gradients of one whole batch over `accum` micro-batches; returns the mean loss over ranks."""
        dist, accum = self.dist, self.accum
        loss_accum = torch.zeros((), device=dist.device)
        batch = self.next_batch()
        for micro in range(accum):
            x, y = batch
            # gradients are all-reduced (FSDP: reduce-scattered) only by the backward of the last micro-step
            last = micro == accum - 1
            if self.cfg.fsdp:
                set_gradient_sync(self.model, last)
            sync = not dist.ddp or last or self.cfg.fsdp
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast(dist.device, self.dtype):
                    _, loss = self.model(x, y, return_logits=False)
                if micro + 1 < accum:  # the next batch is read and copied while this one computes
                    batch = self.next_batch()
                loss = loss / accum  # the sum over micro-steps is the mean over the whole batch
                loss_accum += loss.detach()
                self.scaler.scale(loss).backward()
        return all_mean(loss_accum, dist)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch on the device; on CUDA copied from pinned memory without waiting for it."""
        x, y = self.train_loader.next_batch()
        if self.dist.device.startswith("cuda"):
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)

    def skip_nonfinite(self, step: int, loss: float, norm: float) -> None:
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.skipped > self.cfg.nonfinite_skips:
            newest = latest_checkpoint(self.cfg.out_dir)
            kept = f"the newest checkpoint {newest} is kept" if newest else "no checkpoint was written"
            raise Diverged(f"step {step}: loss {loss}, gradient norm {norm}: the run diverged; {kept}. Lower "
                           "--max_lr, or pass --nonfinite_skips N to skip isolated bad steps")
        if self.dist.master:
            print(f"step {step:6d} | loss {loss}, gradient norm {norm}: step skipped "
                  f"({self.skipped}/{self.cfg.nonfinite_skips})", flush=True)

    def log(self, step: int, stats: dict) -> None:
        cfg, dt = self.cfg, stats["dt"]
        tok_per_s = cfg.total_batch_size / dt
        peak = peak_flops(self.dist.device, cfg.peak_flops, self.dtype)
        mfu = self.raw.flops_per_token(cfg.block_size) * tok_per_s / (peak * self.dist.world_size) if peak else None
        mem = torch.cuda.max_memory_allocated(self.dist.device) / 2**30 if self.dist.device.startswith("cuda") else None
        self.metrics.log(step, train_loss=stats["train_loss"], lr=stats["lr"], grad_norm=stats["grad_norm"],
                         dt_ms=round(dt * 1000, 2), tok_per_s=round(tok_per_s, 1), mfu=mfu, peak_mem_gib=mem)
        self.dt_ema = dt if self.dt_ema is None else 0.9 * self.dt_ema + 0.1 * dt
        if self.dist.master and (step % cfg.log_interval == 0 or step == cfg.max_steps - 1):
            mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
            mfu_text += f" | {mem:.1f} GiB" if mem is not None else ""
            print(f"step {step:6d}/{cfg.max_steps} | loss {stats['train_loss']:.4f} | lr {stats['lr']:.2e} | norm "
                  f"{stats['grad_norm']:.3f} | {dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s{mfu_text}"
                  f" | eta {fmt_duration(self.dt_ema * (cfg.max_steps - step - 1))}", flush=True)




class Diverged(ValueError):
    """The loss or the gradient went non-finite; the message names the step and what to do."""


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`, then `min_lr`."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


# ----------------------------------------------------------------------------- evaluation and samples


@torch.no_grad()
def evaluate_loss(model: LanguageModel, loader: TokenLoader, iters: int, dist: Dist, dtype: torch.dtype) -> float:
    """Mean loss over the first `iters` batches of every rank (the same batches at every evaluation)."""
    loader.reset()
    total = torch.zeros((), device=dist.device)
    with eval_mode(model):
        for _ in range(iters):
            x, y = loader.next_batch()
            with autocast(dist.device, dtype):
                _, loss = model(x.to(dist.device), y.to(dist.device), return_logits=False)
            total += loss.detach().float()
    return all_mean(total / iters, dist).item()


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


def evaluate_hellaswag(model: LanguageModel, examples: list[dict], tokenizer: Tokenizer, cfg: TrainConfig,
                       dist: Dist, dtype: torch.dtype) -> dict:
    import hellaswag

    # as many tokens per forward as one training micro-batch, which is known to fit
    return hellaswag.evaluate(model, examples, tokenizer=tokenizer, batch_tokens=cfg.batch_size * cfg.block_size,
                              device=dist.device, dtype=dtype, rank=dist.rank, world_size=dist.world_size)


def held_out(cfg: TrainConfig, tokenizer: Tokenizer) -> list[str] | None:
    """1,000 addition problems the loader never serves for training (None for other data)."""
    return held_out_problems(tokenizer, cfg.seed, 1000) if tokenizer.name == "addition" else None


def generate_samples(model: LanguageModel, tokenizer: Tokenizer, cfg: TrainConfig, dist: Dist,
                     step: int) -> list[str]:
    """`num_samples` continuations of the sample prompt, from a generator of their own (global RNG untouched)."""
    ids = tokenizer.encode(cfg.sample_prompt) if cfg.sample_prompt else []
    if not ids:
        ids = [tokenizer.eot if tokenizer.eot is not None else 0]
    gen = torch.Generator(device=dist.device).manual_seed(cfg.seed + step)
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=dist.device)
    # the CUDA-graph decode step compiles once, which takes long: only where the run compiles anyway
    with eval_mode(model):
        out = model.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=gen, eot=tokenizer.eot,
                             vocab_size=tokenizer.vocab_size, decode="auto" if cfg.compile else "eager")
    return [tokenizer.decode(row.tolist()) for row in out]


def eval_only(cfg: TrainConfig, dist: Dist) -> dict:
    """Val loss (and HellaSwag when its data is present) of `--init` on this config's data."""
    model, tokenizer = load_model(cfg.init)
    if cfg.data == "shards" and tokenizer.name != "gpt2":
        raise ConfigError(f"--eval_only: {cfg.init} uses the {tokenizer.name} tokenizer, but the shards in "
                          f"{cfg.data_dir} hold GPT-2 tokens; evaluate it on its own text with --data {tokenizer.name}"
                          " --text_path FILE")
    cfg = dataclasses.replace(cfg, block_size=min(cfg.block_size, model.config.block_size),
                              vocab_size=model.config.vocab_size)
    dtype = pick_dtype(dist.device, cfg.dtype)
    model.to(dist.device)
    if not cfg.batch_size:  # auto: what training would pick (a training step fits, so evaluation does)
        cfg = choose_batch_size(cfg, dist, model, dtype)
    _, _, val_loader = build_data(cfg, dist, tokenizer)
    result = {"val_loss": evaluate_loss(model, val_loader, cfg.eval_iters, dist, dtype)}
    examples = hellaswag_examples(cfg, tokenizer)
    if examples:
        hs = evaluate_hellaswag(model, examples, tokenizer, cfg, dist, dtype)
        result |= {"hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]}
    if dist.master:
        tokens = cfg.eval_iters * cfg.batch_size * cfg.block_size * dist.world_size
        print(f"{cfg.init} on {cfg.data_dir if cfg.data == 'shards' else cfg.text_path} ({tokens:,} val tokens): "
              + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


# ----------------------------------------------------------------------------- console


def announce(cfg: TrainConfig, dist: Dist, raw: LanguageModel, tokenizer: Tokenizer, dtype: torch.dtype, accum: int,
             compiled: bool) -> None:
    text = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in asdict(cfg).items())
    print("config: " + "\n        ".join(textwrap.wrap(text, 112)))
    n_params = sum(p.numel() for p in raw.parameters())
    kind = f"{type(raw).__name__.removeprefix('FSDP')}, sharded (FSDP)" if cfg.fsdp else type(raw).__name__
    print(f"{kind}: {n_params:,} parameters, {tokenizer.name} tokenizer "
          f"({tokenizer.vocab_size} tokens); device {dist.device} x {dist.world_size}, autocast {dtype}, "
          f"compile {compiled}; {cfg.total_batch_size:,} tokens/step = {dist.world_size} rank(s) x "
          f"{accum} micro-step(s) x {cfg.batch_size} x {cfg.block_size}")


def fmt_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


if __name__ == "__main__":
    main()
