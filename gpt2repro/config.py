"""The training configuration: `TrainConfig` (defaults = the GPT-2 124M reproduction), named presets, and the
command line that overrides them.

Every `TrainConfig` field is a flag `--field value`; `--preset NAME` picks a named set of values and flags given
on the command line override it. Every number is checked against `BOUNDS` in one place, so nonsense such as
`--max_lr nan` or `--dropout 1.5` is one line naming the flag, before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from gpt2repro.devices import DTYPES
from gpt2repro.models import MODEL_CONFIGS, MODEL_TYPES, ModelConfig
from model import OPTIMIZERS

FINEWEB_DIR = "edu_fineweb10B"
DATA_KINDS = ("shards", "char", "gpt2-text", "addition")
DTYPE_NAMES = ("auto", *DTYPES)


@dataclass(frozen=True)
class DataFields:
    """TrainConfig's first fields: the preset, the data, and where the model comes from."""

    preset: str = ""  # a name in PRESETS; "" = gpt2-124m when FINEWEB_DIR has shards, else shakespeare-char
    # data
    data: str = "shards"  # shards (data_dir) | char | gpt2-text (both tokenize text_path) | addition (a+b=c problems)
    data_dir: str = FINEWEB_DIR
    text_path: str = "input.txt"
    val_fraction: float = 0.1  # text data: the last 10% is validation
    shuffle: bool = True  # seeded shuffling of shard, document and row order, new every epoch
    digits: int = 3  # --data addition: operands of up to this many digits
    ops: str = "+"  # --data addition: the operators, "+" or "+-"
    # model: from scratch (its config's fields, next), or --init gpt2|HF_DIR|CHECKPOINT (then those are ignored)
    init: str = ""
    model_type: str = "gpt"  # gpt | bigram (GPTConfig) | lecture (lecture.py's LectureConfig: the lecture's stages)


# Every field of the model types' configs is also a flag of the same name, declared only there: GPTConfig's with its
# defaults (n_layer, n_head, n_embd, dropout, bias, pos, norm, mlp, qk_norm, tie_embeddings, logit_softcap,
# zero_init), then LectureConfig's own switches with theirs (ffwd, residual, layernorm); a flag the --model_type
# has no use for is refused when set. Except these two, TrainConfig's own: block_size is also the length of the
# rows the data serves, and vocab_size defaults to GPT-2's vocabulary padded for the matmuls, 0 meaning the
# tokenizer's.
OWN_MODEL_FIELDS = ("block_size", "vocab_size")


def model_fields() -> list[dataclasses.Field]:
    """Every model config's fields but OWN_MODEL_FIELDS, each once, in order; GPTConfig's default where a field is
    shared."""
    found: dict[str, dataclasses.Field] = {}
    for config_class in MODEL_CONFIGS.values():
        for f in fields(config_class):
            if f.name not in OWN_MODEL_FIELDS:
                found.setdefault(f.name, f)
    return list(found.values())


def type_name(t: object) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


ModelFields = dataclasses.make_dataclass(
    "ModelFields",
    [(f.name, type_name(f.type), dataclasses.field(default=f.default, default_factory=f.default_factory))
     for f in model_fields()],
    bases=(DataFields,),
    frozen=True,
)


@dataclass(frozen=True)
class TrainConfig(ModelFields):
    """Defaults are the GPT-2 124M reproduction on FineWeb-EDU 10B tokens (build-nanogpt's settings). The fields,
    in order: DataFields', the model configs' (ModelFields), then these."""

    vocab_size: int = 50304  # 50257 padded to a multiple of 128 for faster matmuls; 0 = the tokenizer's
    block_size: int = 1024  # T, the sequence length trained on
    # optimization
    batch_size: int = 64  # B, the micro-batch of one rank; 0 (`auto`) = the largest that fits, up to the preset's
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
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak LR; it follows the same warmup and decay as max_lr
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    nonfinite_skips: int = 0  # steps with a non-finite loss or gradient skipped before the run stops
    seed: int = 1337
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20  # validation batches per evaluation (per rank)
    eval_only: bool = False
    target_val_loss: float = 0.0  # record the step, tokens and time at which val loss first reaches it; 0 = off
    stop_at_target: bool = False  # and stop there
    hellaswag: bool = True  # score HellaSwag at every eval when its cached val set is there
    hellaswag_jsonl: str = ""  # score this HellaSwag .jsonl at every eval (whatever --hellaswag says)
    hellaswag_limit: int = 0  # evaluate the first N examples only; 0 = all
    sample_interval: int = 250  # 0 = only at the end
    num_samples: int = 4
    sample_tokens: int = 32
    sample_prompt: str = "Hello, I'm a language model,"
    log_interval: int = 1  # console line every N steps (metrics.jsonl gets every step)
    peak_flops: float = 0.0  # per-device peak for MFU; 0 = the GPU table, or on CPU the measured matmul peak
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
    fp8: bool = False  # FP8 matmuls (torchao) for the blocks' linear layers >= FP8_MIN_WIDTH wide; FP8 GPUs only
    fsdp: bool = False  # shard weights, gradients and optimizer state over the ranks (FSDP2); false = DDP

    def model_config(self, tokenizer_vocab_size: int) -> ModelConfig:
        """The model these flags describe, in its --model_type's config class (vocab_size 0 = the tokenizer's);
        the config checks its own fields."""
        config_class = MODEL_CONFIGS[self.model_type]
        values = {f.name: getattr(self, f.name) for f in fields(config_class)}
        return config_class(**values | {"vocab_size": self.vocab_size or tokenizer_vocab_size})


INF = math.inf
# the allowed range of every number, as (low, high, low included, high included); all must be finite
BOUNDS: dict[str, tuple[float, float, bool, bool]] = {
    "val_fraction": (0, 1, False, False),
    "digits": (1, 9, True, True),
    "n_layer": (1, INF, True, False),
    "n_head": (1, INF, True, False),
    "n_embd": (1, INF, True, False),
    "dropout": (0, 1, True, False),
    "vocab_size": (0, 2**31 - 1, True, True),
    "block_size": (1, INF, True, False),
    "batch_size": (0, INF, True, False),
    "total_batch_size": (1, INF, True, False),
    "max_steps": (0, INF, True, False),
    "max_lr": (0, INF, False, False),
    "min_lr": (0, INF, True, False),
    "warmup_steps": (0, INF, True, False),
    "weight_decay": (0, INF, True, False),
    "beta1": (0, 1, True, False),
    "beta2": (0, 1, True, False),
    "eps": (0, INF, False, False),
    "grad_clip": (0, INF, True, False),
    "logit_softcap": (0, INF, True, False),
    "muon_lr": (0, INF, False, False),
    "muon_momentum": (0, 1, True, False),
    "muon_weight_decay": (0, INF, True, False),
    "nonfinite_skips": (0, INF, True, False),
    "seed": (0, 2**32 - 1, True, True),  # numpy's seeds are 32-bit
    "eval_interval": (1, INF, True, False),
    "eval_iters": (1, INF, True, False),
    "target_val_loss": (0, INF, True, False),
    "hellaswag_limit": (0, INF, True, False),
    "sample_interval": (0, INF, True, False),
    "num_samples": (0, INF, True, False),
    "sample_tokens": (0, INF, True, False),
    "log_interval": (1, INF, True, False),
    "peak_flops": (0, INF, True, False),
    "ckpt_interval": (0, INF, True, False),
    "keep_last": (0, INF, True, False),
}
CHOICES = {"data": DATA_KINDS, "model_type": tuple(MODEL_TYPES), "dtype": DTYPE_NAMES, "optimizer": OPTIMIZERS}

# What `--resume` does with each flag set away from the value the checkpoint was trained with (its train_config):
#   applied: read afresh (schedule, intervals, paths, micro-batch, device, ...) or written into the restored
#            optimizer's param groups (weight decay, betas, eps, Muon's settings; load_state_dict brings back the
#            checkpoint's, resume.restore_training puts the flags' back);
#   model:   compared with the checkpoint's model, a different one refused (resume.restore_model);
#   refused: one line; the restored state depends on it (the optimizer state on its optimizer, the data order on
#            the seed and shuffling, the split and the held-out problems on val_fraction, digits and ops, the
#            checkpoint's format on fsdp: whole or sharded).
RESUME_REFUSED = ("optimizer", "seed", "shuffle", "data", "val_fraction", "digits", "ops", "init", "fsdp")
RESUME_OPTIMIZER = ("weight_decay", "beta1", "beta2", "eps", "max_lr", "muon_lr", "muon_momentum", "muon_weight_decay")
RESUME_MODEL = (*(f.name for f in model_fields()), *OWN_MODEL_FIELDS, "model_type")
RESUME_APPLIED = (
    "preset", "data_dir", "text_path", "batch_size", "total_batch_size", "max_steps", "min_lr", "warmup_steps",
    "grad_clip", "nonfinite_skips", "eval_interval", "eval_iters", "eval_only", "target_val_loss", "stop_at_target",
    "hellaswag", "hellaswag_jsonl", "hellaswag_limit", "sample_interval", "num_samples", "sample_tokens",
    "sample_prompt", "log_interval", "peak_flops", "tensorboard", "wandb", "wandb_project", "out_dir",
    "ckpt_interval", "keep_last", "resume", "device", "dtype", "compile", "fp8", *RESUME_OPTIMIZER,
)
ON_RESUME: dict[str, str] = (dict.fromkeys(RESUME_APPLIED, "applied") | dict.fromkeys(RESUME_MODEL, "model")
                             | dict.fromkeys(RESUME_REFUSED, "refused"))

SHAKESPEARE = dict(data="char", vocab_size=0, shuffle=True, sample_prompt="ROMEO:", hellaswag=False)
# Karpathy's lecture "Let's build GPT", stage by stage (docs/lecture.md): its batches, context and learning rates,
# its optimizer as far as ours goes (AdamW at PyTorch's betas and weight decay 0.01, a constant LR, no clipping),
# evaluation every 500 steps on 200 val batches, and 500 characters sampled from a newline at the end.
LECTURE_RUN = SHAKESPEARE | dict(
    block_size=8, batch_size=32, total_batch_size=256, max_steps=5000, max_lr=1e-3, min_lr=1e-3, warmup_steps=0,
    weight_decay=0.01, beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=0.0, eval_interval=500, eval_iters=200,
    sample_interval=0, num_samples=1, sample_tokens=500, sample_prompt="", log_interval=500, ckpt_interval=5000,
    compile=False, dtype="float32",
)
LECTURE = LECTURE_RUN | dict(model_type="lecture", n_embd=32, n_head=4, n_layer=1)
LECTURE_PRESETS = {
    "lecture-bigram": LECTURE_RUN | dict(model_type="bigram", max_steps=3000, max_lr=1e-2, min_lr=1e-2,
                                         eval_interval=300, ckpt_interval=3000),
    "lecture-head": LECTURE | dict(n_head=1),
    "lecture-heads": LECTURE,
    "lecture-ffwd": LECTURE | dict(ffwd=True),
    "lecture-blocks": LECTURE | dict(ffwd=True, n_layer=3),
    "lecture-residual": LECTURE | dict(ffwd=True, n_layer=3, residual=True),
    "lecture-layernorm": LECTURE | dict(ffwd=True, n_layer=3, residual=True, layernorm=True),
    "lecture-dropout": LECTURE | dict(ffwd=True, n_layer=3, residual=True, layernorm=True, dropout=0.2),
    "lecture-gpt": LECTURE | dict(ffwd=True, residual=True, layernorm=True, dropout=0.2, n_embd=384, n_head=6,
                                  n_layer=6, block_size=256, batch_size=64, total_batch_size=16384, max_lr=3e-4,
                                  min_lr=3e-4),
    # NOT the lecture's recipe: lecture-gpt's shape and context with this project's own options (rotary positions,
    # Muon for the blocks' matrices, bf16, compile, warmup and cosine decay, no dropout) aimed at the lecture's val
    # loss 1.48 in minutes on a CPU (its status: docs/lecture.md); evaluated once at the end on the whole val split
    "lecture-fast": SHAKESPEARE | dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32, total_batch_size=8192, pos="rope",
        optimizer="muon", muon_lr=0.02, max_lr=3e-3, min_lr=3e-4, warmup_steps=20, max_steps=270, weight_decay=0.1,
        beta2=0.99, eval_interval=270, eval_iters=13, target_val_loss=1.48, sample_interval=0, num_samples=1,
        sample_tokens=200, sample_prompt="", log_interval=10, ckpt_interval=270, compile=True, dtype="bfloat16",
    ),
}
PRESETS: dict[str, dict] = {
    # nanoGPT's CPU model (4 x 128, context 64) at batch 32 with the two large winners of `python -m bench ablate`:
    # rotary positions and Muon for the blocks' matrices, AdamW at a higher LR than nanoGPT's for the rest (relu²
    # and an untied head, small winners there, made this short run worse). It reaches nanoGPT's val loss in far
    # fewer tokens (README, "What the demo does"). Not GPT-2's architecture (export_hf refuses it).
    "shakespeare-char": SHAKESPEARE | dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, total_batch_size=2048, max_steps=300,
        max_lr=4e-3, min_lr=4e-4, warmup_steps=30, weight_decay=0.1, beta2=0.99, pos="rope", optimizer="muon",
        muon_lr=0.04, eval_interval=100, eval_iters=20,
        sample_interval=0, num_samples=1, sample_tokens=200, log_interval=100, ckpt_interval=1000, compile=False,
        dtype="float32",
    ),
    # the lecture's baseline: a 65x65 table of next-character logits
    "shakespeare-bigram": SHAKESPEARE | dict(
        model_type="bigram", block_size=8, batch_size=32, total_batch_size=256, max_steps=1500, max_lr=1e-2,
        min_lr=1e-3, warmup_steps=0, weight_decay=0.0, eval_interval=500, eval_iters=50, sample_interval=0,
        num_samples=1, sample_tokens=200, log_interval=250, ckpt_interval=1500, compile=False, dtype="float32",
    ),
    **LECTURE_PRESETS,
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
    # the lecture's exercise EX2: a GPT that adds 3-digit numbers, answer digits reversed, loss on the answer only;
    # 2 x 64 at batch 256 learns every held-out problem well within max_steps
    "addition": dict(
        data="addition", digits=3, ops="+", vocab_size=0, n_layer=2, n_head=4, n_embd=64, block_size=12,
        batch_size=256, total_batch_size=3072, max_steps=1500, max_lr=3e-3, min_lr=3e-4, warmup_steps=100,
        weight_decay=0.1, beta2=0.99, eval_interval=100, eval_iters=4, sample_interval=0, num_samples=0,
        log_interval=100, ckpt_interval=1500, compile=False, dtype="float32", hellaswag=False,
    ),
    "gpt2-124m": {},
    # NOT GPT-2's architecture: GPT-2 124M's shape and data with the later practice of nanochat and the
    # modded-nanogpt speedrun (rotary positions, parameter-free RMSNorm, relu², QK-norm, an untied head, logit
    # soft-cap 15, zero-initialised projections, no biases) and Muon (nanochat's 0.02) for the blocks' matrices.
    # Only embeddings and head remain for AdamW, at nanochat's head LR 0.004 with its betas (0.8, 0.95) and no
    # weight decay; a short warmup, then cosine to 0 over 5B tokens, half of gpt2-124m's (the speedrun reaches
    # GPT-2's FineWeb val loss in under 1B with more tricks than these). `bench/ablate.py` measures the pieces
    # on CPU; this schedule itself is untested at 124M. OpenAI's weights and export_hf cannot hold this model.
    "gpt2-124m-modern": dict(
        pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False, logit_softcap=15.0,
        zero_init=True, bias=False, optimizer="muon", muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0,
        max_lr=4e-3, min_lr=0.0, warmup_steps=100, max_steps=9537, weight_decay=0.0, beta1=0.8, beta2=0.95,
    ),
    # GPT-2's larger shapes with the GPT-3 paper's learning rate and batch for their size (Table 2.1);
    # warmup stays at 375M tokens
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, batch_size=32, max_lr=3e-4, min_lr=3e-5),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, batch_size=16, max_lr=2.5e-4, min_lr=2.5e-5),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, batch_size=8, max_lr=2e-4, min_lr=2e-5,
                       total_batch_size=1048576, max_steps=9537, warmup_steps=358),
}


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag and what to change."""


def parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_batch_size(s: str) -> int:
    """`--batch_size auto` is 0: probe the largest micro-batch that fits (on CUDA; elsewhere the preset's)."""
    return 0 if s.strip().lower() == "auto" else int(s)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad value is a `ConfigError` (one line) rather than the whole usage and an exit."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see --help")


def config_parser(description: str = "") -> argparse.ArgumentParser:
    p = OneLineParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    for f in fields(TrainConfig):
        if f.type in ("bool", bool):
            # `--compile false`, or a bare `--eval_only`
            p.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True, default=None,
                           metavar="true|false", help=f"default: {f.default}")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            if f.name == "batch_size":
                kind = parse_batch_size
            p.add_argument(f"--{f.name}", type=kind, default=None, help=f"default: {f.default!r}")
    return p


def default_preset(given: dict) -> str:
    """No preset and no data flag: GPT-2 124M if FineWeb shards are there, else the CPU demo."""
    if "data" in given or "data_dir" in given:
        return "gpt2-124m"
    has_fineweb = Path(FINEWEB_DIR).is_dir() and any(Path(FINEWEB_DIR).glob("*_train_*.npy"))
    return "gpt2-124m" if has_fineweb else "shakespeare-char"


def parse_config(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    """Dataclass defaults, then the preset, then the flags given; `ConfigError` for anything that cannot work."""
    args, unknown = config_parser(description).parse_known_args(argv)
    if unknown:
        bad = unknown[0].split("=")[0]
        close = difflib.get_close_matches(bad.lstrip("-"), [f.name for f in fields(TrainConfig)], n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the fields"
        raise ConfigError(f"unknown option {bad}{hint}")
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = given.get("preset") or default_preset(given)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    values = PRESETS[preset] | given | {"preset": preset}
    if not values.get("out_dir"):
        values["out_dir"] = str(Path("out") / preset)
    cfg = dataclasses.replace(TrainConfig(), **values)
    check_config(cfg)
    return cfg


def out_of_bounds(name: str, value: float) -> str:
    """Why `value` is not allowed for `name` ("" when it is)."""
    lo, hi, lo_in, hi_in = BOUNDS[name]
    if not math.isfinite(value):
        return "must be a finite number"
    if value < lo or (value == lo and not lo_in) or value > hi or (value == hi and not hi_in):
        left, right = "[" if lo_in else "(", "]" if hi_in else ")"
        return f"must be in {left}{lo:g}, {hi:g}{right}"
    return ""


def check_config(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, saying what to change (rank-independent checks only)."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name} {getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    for name in BOUNDS:
        why = out_of_bounds(name, getattr(cfg, name))
        if why:
            raise ConfigError(f"--{name} {getattr(cfg, name)} {why}")
    check_model_fields(cfg)
    if cfg.min_lr > cfg.max_lr:
        raise ConfigError(f"--min_lr {cfg.min_lr} is above --max_lr {cfg.max_lr}; lower it")
    if cfg.eval_only and not cfg.init:
        raise ConfigError("--eval_only needs a model: --init gpt2|HF_DIR|CHECKPOINT")
    if cfg.stop_at_target and cfg.target_val_loss <= 0:
        raise ConfigError("--stop_at_target needs --target_val_loss X (the val loss to stop at)")
    if cfg.fsdp and cfg.eval_only:
        raise ConfigError("--fsdp shards training; --eval_only evaluates a whole model on each rank: drop --fsdp")
    if cfg.fsdp and cfg.dtype == "float16":
        raise ConfigError("--fsdp true runs in bfloat16 or float32 (float16 would need a sharded gradient scaler); "
                          "use --dtype bfloat16")
    if cfg.hellaswag_jsonl and cfg.data in ("char", "addition"):
        raise ConfigError(f"--hellaswag_jsonl: HellaSwag is scored in GPT-2 tokens and --data {cfg.data} has its own "
                          "vocabulary; drop the flag")


def check_model_fields(cfg: TrainConfig) -> None:
    """The model config's own checks, the heads' split of n_embd, and no flag the --model_type has no use for, as
    one line naming the flag."""
    if cfg.init:  # the model comes from --init; these fields are documented as ignored
        return
    if cfg.model_type in ("gpt", "lecture") and cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    try:
        cfg.model_config(tokenizer_vocab_size=1)
    except ValueError as e:
        raise ConfigError(re.sub(r"\b(?:GPTConfig|LectureConfig)\.(\w+)", r"--\1", str(e))) from None
    own = {f.name for f in fields(MODEL_CONFIGS[cfg.model_type])}
    for f in model_fields():
        if f.name not in own and getattr(cfg, f.name) != f.default:
            users = [t for t, c in MODEL_CONFIGS.items() if f.name in {g.name for g in fields(c)}]
            raise ConfigError(f"--{f.name} is for --model_type {' or '.join(users)}, not {cfg.model_type}; drop it")
