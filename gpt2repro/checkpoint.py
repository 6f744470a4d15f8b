"""Checkpoints: the file format, the models they hold, and the policy for resuming from them.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, saved with `torch.save`
and loaded with `torch.load(weights_only=True)`, so a file carrying pickled code is refused.
It holds at least `model`, `model_config`, `model_type` and `tokenizer` (`model_checkpoint_fields`);
training adds `TRAINING_KEYS` (optimizer, step, loader and RNG states). A run directory keeps them as
`ckpt_{step:07d}.pt`; only checkpoints of finite weights are ever written, and pruning keeps the newest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gpt2repro.errors import first_line
from gpt2repro.fileio import MAX_JSON_FILE, atomic_write, parse_json, read_json, read_limited, refused_object
from gpt2repro.gpt2_sizes import HF_MODELS
from gpt2repro.models import MODEL_CONFIGS, MODEL_TYPES, ModelConfig
from gpt2repro.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_dict
from model import GPT, GPTConfig, LanguageModel

if TYPE_CHECKING:  # imported where used: transformers is slow to import
    from transformers import GPT2Config

REQUIRED_KEYS = ("model", "model_config", "tokenizer")
TRAINING_KEYS = ("step", "optimizer", "loader", "rng")
MAX_PARAMS = 100e9  # a model_config claiming more is refused before anything is allocated


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class UnreadableCheckpoint(CheckpointError):
    """A file whose bytes do not load as one of our checkpoints (corrupt, truncated, pickled code, another
    format), as opposed to one that loads but does not fit this version or run, or one that cannot be opened."""


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """`torch.save` to a temp file in the same directory, fsync, then rename over `path`."""
    return atomic_write(Path(path), lambda f: torch.save(obj, f))


def weights_finite(state_dict: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state_dict.values() if v.is_floating_point())


def check_crc(path: Path) -> None:
    """`torch.load` ignores the CRC-32 that `torch.save` records per entry, so a flipped bit would load as
    silently wrong weights; check them first (zip-format files only)."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
    if bad is not None:
        raise UnreadableCheckpoint(f"{path}: corrupt, its entry {bad} fails its CRC check; use an earlier checkpoint")


def is_memory_error(e: BaseException) -> bool:
    """Running out of memory while loading says nothing about the file: it is never set aside for that."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load one of our checkpoints; any other file is a `CheckpointError` saying what is wrong.

    Whatever reading its bytes raises (zipfile and zlib errors, NotImplementedError for a flipped compression
    method or version, RuntimeError from torch's reader, pickle errors) is an `UnreadableCheckpoint` naming the
    file, which `--resume auto` sets aside; only a file that cannot be opened, or too little memory, is not.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:  # a file that cannot be opened may be fine: not a reason to set it aside
        open(path, "rb").close()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open it ({e.strerror or e}); check its permissions") from None
    try:
        check_crc(path)
        with warnings.catch_warnings():  # torch warns about some damaged archives before failing on them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except UnreadableCheckpoint:
        raise
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UnreadableCheckpoint(
                f"{path}: refused, it contains pickled objects other than tensors and plain data "
                f"({refused_object(str(e))}); only load checkpoints you trust, and re-save them as plain state dicts"
            ) from None
        raise UnreadableCheckpoint(f"{path}: not a readable checkpoint ({first_line(e, 120)}); the file may be "
                                   "corrupt") from None
    except Exception as e:
        if is_memory_error(e):
            raise CheckpointError(f"{path}: not enough memory to load it ({first_line(e, 120)}); free memory or "
                                  "load it on a larger machine") from None
        raise UnreadableCheckpoint(f"{path}: not a readable checkpoint ({type(e).__name__}: {first_line(e, 120)}); "
                                   "the file is corrupt or truncated") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise UnreadableCheckpoint(
            f"{path}: not a gpt2-repro checkpoint (needs keys {', '.join(REQUIRED_KEYS)}); "
            "for Hugging Face weights pass the model directory instead"
        )
    check_model_fields(ckpt, path)
    return ckpt


def check_model_fields(ckpt: dict, path: str | Path) -> None:
    """The model part of a checkpoint is what it claims, before anything is allocated for it."""
    if ckpt.get("model_type", "gpt") not in MODEL_TYPES:
        raise CheckpointError(f"{path}: unknown model_type {ckpt.get('model_type')!r} (this version knows "
                              f"{', '.join(MODEL_TYPES)}); it was written by another program or version")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CheckpointError(f"{path}: its 'model' entry is not a state dict of tensors; not a model checkpoint")
    if not isinstance(ckpt["tokenizer"], dict):
        raise CheckpointError(f"{path}: its 'tokenizer' entry is not a dict; not a gpt2-repro checkpoint")
    model_config(ckpt["model_config"], path, ckpt.get("model_type", "gpt"))


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    """Checkpoints are `OUT_DIR/ckpt_{step:07d}.pt`, so names sort by step."""
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoints in `out_dir`, oldest first (temp files of interrupted writes are not listed)."""
    return sorted(Path(out_dir).glob("ckpt_*.pt"))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------- models in checkpoints


def model_config(fields: object, source: str | Path = "checkpoint", model_type: str = "gpt") -> ModelConfig:
    """The config (`GPTConfig`, or `model_type`'s own) from a checkpoint's `model_config`, every value type- and
    size-checked first."""
    if not isinstance(fields, dict):
        raise CheckpointError(f"{source}: model_config is not a dict; not a gpt2-repro checkpoint")
    config_class = MODEL_CONFIGS[model_type]
    known = {f.name: f for f in dataclasses.fields(config_class)}
    for k, v in fields.items():
        if k not in known:
            raise CheckpointError(f"{source}: model_config has unknown field {k!r}; written by a newer version?")
        want = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(str(known[k].type), object)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise CheckpointError(f"{source}: model_config {k}={v!r} is not of type {known[k].type}")
    try:
        config = config_class(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: model_config is not valid ({e})") from None
    sizes = (config.n_layer, config.n_embd, config.n_head, config.vocab_size, config.block_size)
    if min(sizes) < 1:
        raise CheckpointError(f"{source}: model_config sizes must be positive, got {sizes}")
    if 12 * config.n_layer * config.n_embd**2 + config.vocab_size * config.n_embd > MAX_PARAMS:
        raise CheckpointError(f"{source}: model_config describes a model of over {MAX_PARAMS:.0e} parameters; "
                              "refused as implausible")
    return config


def clean_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same state dict without the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes."""
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in sd.items()}


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> LanguageModel:
    """Build the model a checkpoint dict describes and load its weights, with a clear error on mismatch.

    The shapes are compared on the meta device first, so a file whose config disagrees with its own
    tensors is refused without allocating the model it claims.
    """
    model_type = ckpt.get("model_type", "gpt")
    config = model_config(ckpt["model_config"], source, model_type)
    cls = MODEL_TYPES[model_type]
    sd = clean_keys(ckpt["model"])
    with torch.device("meta"):
        expected = cls(config).state_dict()
    for k, v in expected.items():
        if k not in sd:
            raise CheckpointError(f"{source}: weights lack {k}; the file does not match its own model config")
        if sd[k].shape != v.shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(sd[k].shape)}, config says {tuple(v.shape)}")
    model = cls(config)
    model.load_state_dict(sd, strict=False)
    return model


def model_checkpoint_fields(model: LanguageModel, tokenizer: Tokenizer, state: dict | None = None) -> dict:
    """The part of a checkpoint that says what the model is: weights, config, type and tokenizer (`state`: the
    weights gathered from a sharded model, else the model's own)."""
    return {
        "model": clean_keys(model.state_dict() if state is None else state),
        "model_config": dataclasses.asdict(model.config),
        "model_type": next(k for k, v in MODEL_TYPES.items() if isinstance(model, v)),
        "tokenizer": tokenizer.to_dict(),
    }


def from_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[LanguageModel, Tokenizer]:
    """The model saved in a checkpoint file and the tokenizer it was trained with."""
    ckpt = load_checkpoint(path, map_location=map_location)
    return model_from_checkpoint(ckpt, str(path)), tokenizer_from_dict(ckpt["tokenizer"])


# ----------------------------------------------------------------------------- Hugging Face GPT-2 directories


HF_CONFIG_SIZES = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")  # the fields GPTConfig takes
# GPTConfig.mlp as GPT2Config.activation_function: export_hf.py writes the first name, any of them loads
HF_ACTIVATIONS = {"gelu": ("gelu_new", "gelu_pytorch_tanh"), "relu2": ("relu2",)}
# GPT2Config fields every GPT of ours has these values of: another value computes something this GPT cannot
HF_FIXED = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}


def load_pretrained(name_or_dir: str) -> GPT:
    """OpenAI's GPT-2 weights (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) or a local Hugging Face directory,
    its config checked first: only GPT-2's architecture loads, and what fails is one line naming the file."""
    from transformers import GPT2LMHeadModel

    if Path(name_or_dir).is_dir():
        check_hf_config(Path(name_or_dir) / "config.json")
    try:
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
    except Exception as e:
        raise hf_load_error(name_or_dir, e) from None
    model = GPT(config_from_hf(hf.config, name_or_dir))
    model.load_hf_state_dict(hf.state_dict(), source=name_or_dir)
    return model


def hf_config_fields(config: GPTConfig) -> dict:
    """The GPT2Config fields that describe `config`'s shape and options (vocab, dropout and token ids aside)."""
    return dict(n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                activation_function=HF_ACTIVATIONS[config.mlp][0], tie_word_embeddings=config.tie_embeddings,
                **HF_FIXED)


def config_from_hf(c: GPT2Config, source: str) -> GPTConfig:
    """The GPTConfig of a `transformers` GPT2Config; a field this GPT cannot reproduce is a ValueError naming
    `source` (reorder_and_upcast_attn only changes rounding, so it is accepted)."""
    mlp = next((ours for ours, names in HF_ACTIVATIONS.items() if c.activation_function in names), None)
    need = {k: (getattr(c, k, v) == v, json.dumps(v)) for k, v in HF_FIXED.items()}  # field: (ok, what it needs)
    need["activation_function"] = (mlp is not None, " or ".join(n for ns in HF_ACTIVATIONS.values() for n in ns))
    need["n_inner"] = (getattr(c, "n_inner", None) in (None, 4 * c.n_embd), f"null or {4 * c.n_embd}")
    for field, (ok, want) in need.items():
        if not ok:
            raise ValueError(f"{source}: config.json sets {field} to {getattr(c, field)!r}, which this GPT cannot "
                             f"compute (it needs {want}); only GPT-2's architecture loads")
    return GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                     n_embd=c.n_embd, bias=True, mlp=mlp, tie_embeddings=bool(c.tie_word_embeddings))


def check_hf_config(path: Path) -> None:
    """A Hugging Face config.json that is JSON with positive integer sizes, before `transformers` trips on it."""
    try:
        config = parse_json(read_limited(path, MAX_JSON_FILE).decode("utf-8"))
    except FileNotFoundError:
        return  # transformers says what is missing
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise ValueError(f"{path}: not a readable JSON config ({str(e).splitlines()[0]}); fix or re-download it") \
            from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a {type(config).__name__}, not a JSON object; fix or re-download it")
    for key in HF_CONFIG_SIZES:
        value = config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{path}: {key} is {value!r}, expected a positive integer; fix or re-download it")


def hf_load_error(name_or_dir: str, e: Exception) -> ValueError:
    """One line for what `GPT2LMHeadModel.from_pretrained` raised, naming the file at fault where known."""
    from safetensors import SafetensorError

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, pickle.UnpicklingError):  # a pytorch_model.bin refused by weights_only loading
        return ValueError(f"{name_or_dir}: refused, its weights file holds pickled objects other than tensors "
                          f"({refused_object(str(e))}); use safetensors weights from a source you trust")
    if isinstance(e, SafetensorError):
        weights = Path(name_or_dir) / "model.safetensors"
        where = weights if weights.is_file() else name_or_dir
        return ValueError(f"{where}: not a readable safetensors file ({first}); it is corrupt or truncated, "
                          "download or export it again")
    if isinstance(e, OSError):
        return ValueError(f"could not load Hugging Face GPT-2 {name_or_dir!r}: {first}")
    detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])  # strict-dataclass errors: 2 lines
    return ValueError(f"{name_or_dir}: transformers cannot load it ({type(e).__name__}: {detail}); check its "
                      "config.json and weights, or re-download it")


TRAINING_CONFIG_KEYS = ("max_steps", "preset")  # in train_gpt2.py's config.json, never in a Hugging Face one


def is_training_config(path: Path) -> bool:
    """Whether `path` is the config.json train_gpt2.py writes into a run dir (not a Hugging Face model config)."""
    try:
        config = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and any(k in config for k in TRAINING_CONFIG_KEYS)


OUR_TOKENIZER_FILE = "gpt2_repro_tokenizer.json"  # our tokenizer's to_dict(), written by export_hf.py into an export


def hf_dir_tokenizer(spec: str, model: LanguageModel) -> Tokenizer:
    """The tokenizer export_hf.py recorded in a Hugging Face dir (char and addition runs need it), else GPT-2's."""
    path = Path(spec) / OUR_TOKENIZER_FILE
    if not path.is_file():
        tokenizer = get_tokenizer("gpt2")
    else:
        try:
            tokenizer = tokenizer_from_dict(read_json(path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a tokenizer export_hf.py wrote ({type(e).__name__}: {first_line(e)}); "
                             "export the checkpoint again") from None
    if tokenizer.vocab_size > model.config.vocab_size:  # its ids would index past the embedding
        raise ValueError(f"{spec}: its {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}; this model needs the tokenizer it was trained with")
    return tokenizer


def load_model(spec: str, map_location: str = "cpu") -> tuple[LanguageModel, Tokenizer]:
    """`gpt2`-family name, a local Hugging Face directory, a run directory (its newest checkpoint) or a file."""
    path = Path(spec)
    # a run dir has a config.json too (the training config): its checkpoints decide
    is_run_dir = path.is_dir() and latest_checkpoint(path) is not None
    if path.is_dir() and not is_run_dir and is_training_config(path / "config.json"):
        raise ValueError(f"{spec}: no checkpoints in {spec} yet (it is a train_gpt2.py run dir with no ckpt_*.pt); "
                         "wait for its first checkpoint (--ckpt_interval) or pass a checkpoint file")
    if spec in HF_MODELS or (path.is_dir() and (path / "config.json").exists() and not is_run_dir):
        model = load_pretrained(spec)
        return model, hf_dir_tokenizer(spec, model)
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise ValueError(f"{spec}: neither a HF model dir (config.json) nor a run dir with ckpt_*.pt files")
        path = newest
    if path.exists():
        return from_checkpoint(path, map_location=map_location)
    raise ValueError(f"{spec}: no such file; use one of {', '.join(HF_MODELS)}, a HF model dir or a checkpoint")


# ----------------------------------------------------------------------------- training state


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


def check_resumable(ckpt: dict, path: Path) -> None:
    """A model-only checkpoint starts a new run (`--init`), it cannot continue one."""
    if "sharded" in ckpt:  # the model file of a sharded checkpoint: its training state is in the shards
        raise CheckpointError(f"{path} belongs to a sharded run (its optimizer state is in {ckpt['sharded']}/); "
                              "resume it with --fsdp true")
    for key in TRAINING_KEYS:
        if key not in ckpt:
            raise CheckpointError(f"{path} has no {key!r}; it is a model-only checkpoint, use --init {path} to "
                                  "start a new run from its weights")


def newest_resumable(out_dir: Path, log=print) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of `out_dir` that loads, with its contents; unreadable ones are set aside.

    Temp files of interrupted writes are removed. A readable but model-only newest checkpoint is an error
    (the same one `--resume PATH` gives), not a reason to fall back to an older one.
    """
    for tmp in out_dir.glob(".ckpt_*.tmp"):
        log(f"resume: removing {tmp.name}, left by an interrupted checkpoint write")
        tmp.unlink(missing_ok=True)
    for path in reversed(list_checkpoints(out_dir)):
        try:
            ckpt = load_checkpoint(path)
        except UnreadableCheckpoint as e:  # anything else (another version, a read error) stops the run
            bad = set_aside(path)
            log(f"resume: skipping {e}; moved aside to {bad.name}")
            continue
        check_resumable(ckpt, path)
        return path, ckpt
    return None, None


def set_aside(path: Path) -> Path:
    """Rename `path` to PATH.unreadable (PATH.unreadable.N when that is taken: earlier ones are kept)."""
    bad, n = path.with_name(path.name + ".unreadable"), 0
    while bad.exists():
        n += 1
        bad = path.with_name(f"{path.name}.unreadable.{n}")
    os.replace(path, bad)
    return bad


def write_checkpoint(ckpt: dict, out_dir: Path, step: int, keep_last: int) -> Path:
    """Save the step's checkpoint, then prune to the newest `keep_last` (0 = keep all).

    Non-finite weights are never written, so pruning can never leave only diverged checkpoints behind.
    """
    if not weights_finite(ckpt["model"]):
        raise CheckpointError(f"step {step}: the weights hold NaN or inf; not checkpointed, the earlier "
                              "checkpoints are kept")
    path = save_checkpoint(ckpt, checkpoint_path(out_dir, step))
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path
