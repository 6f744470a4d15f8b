"""Sharded training (`--fsdp true`): PyTorch's FSDP2 splits parameters, gradients and optimizer state over the
ranks, and checkpoints are written by every rank with torch.distributed.checkpoint (DCP).

Wrapping: each Transformer block is one FSDP group (all-gathered just before it runs, freed after), and the root
holds the rest: the token embedding and the head it is tied to must be in the same group, or the tie breaks.

A sharded checkpoint of step N is two things in the run directory:
  ckpt_N.dcp/  every rank's shard of the weights and optimizer state, plus the training state (step, loader,
               RNG) as one entry; written into .ckpt_N.dcp.tmp/ and renamed when every rank has finished.
  ckpt_N.pt    the whole model (weights, config, tokenizer) in the usual single-file format, written last: it
               marks the checkpoint complete, and sample.py, hellaswag.py, export_hf.py and --init read it as
               they read any run, without torch.distributed. A ckpt_N.dcp/ without it is an interrupted write.

Loading never runs pickled code: DCP's `.metadata` file is unpickled with an allow-list of the classes a genuine
checkpoint holds (`SafeReader`), and its non-tensor entries are read with torch.load(weights_only=True)
(`SafePlanner`); DCP's own readers unpickle both without any restriction.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.utils import CheckpointException
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from gpt2repro.checkpoint import (
    CheckpointError,
    UnreadableCheckpoint,
    checkpoint_path,
    clean_keys,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_checkpoint_fields,
    set_aside,
    weights_finite,
    write_checkpoint,
)
from gpt2repro.devices import use_compile_cache
from gpt2repro.errors import first_line
from gpt2repro.fileio import refused_object
from gpt2repro.tokenizer import Tokenizer

MAX_METADATA_BYTES = 256 << 20  # a genuine .metadata is a few kB per tensor
SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")  # the only files a genuine .metadata points into


# ----------------------------------------------------------------------------- wrapping


def ensure_process_group(device: str) -> None:
    """FSDP needs a process group even for one process (a run resumed on fewer ranks may have only one)."""
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None = None,
                compile_blocks: bool = False) -> torch.nn.Module:
    """`fully_shard` each Transformer block, then the root (embeddings, final norm, head); the module itself is
    returned, now an FSDP module whose parameters are DTensors sharded along dim 0.

    `param_dtype` (bfloat16 on CUDA): the dtype the blocks compute in; gradients are reduced in float32 and the
    sharded master weights stay float32. `compile_blocks` compiles each block on its own: FSDP's all-gathers run
    between the compiled graphs.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    blocks = getattr(getattr(model, "transformer", None), "h", None) or []
    for i, block in enumerate(blocks):
        if compile_blocks:  # in place: the state dict keeps its keys
            use_compile_cache()
            block.compile()
        # the last block is gathered again first thing in backward: keeping it saves one all-gather
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp)
    return model


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Micro-steps before the last keep their gradients unreduced (FSDP's `no_sync`)."""
    model.set_requires_gradient_sync(sync)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` for gradients that may be sharded DTensors: the norm of the whole gradient, a plain
    tensor (the same on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):  # sum of squares over every rank's shard
        norm = norm.full_tensor()
    # as clip_grad_norm_ scales (same formula), through each rank's shard
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
    return norm


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0, on the CPU, one tensor gathered at a time (every rank must call it;
    other ranks get {})."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return clean_keys(get_model_state_dict(model, options=options))


def replica(model: torch.nn.Module, state: dict[str, torch.Tensor], device: str) -> torch.nn.Module:
    """A plain (unsharded) copy of `model` holding `state`: what sampling and HellaSwag run on, since they do not
    call the model in step on every rank."""
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # GPT under FSDPGPT
    with torch.device("meta"):
        copy = cls(model.config)
    copy.to_empty(device=device)
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables) are not in the state dict
        if name not in state:
            owner, _, attr = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(attr, buf.detach().to(device), persistent=False)
    copy.load_state_dict(state)
    return copy.eval()


def full_model_on_every_rank(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """`replica` on every rank (all-gathers every parameter once)."""
    state = clean_keys(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
    return replica(model, state, device)


# ----------------------------------------------------------------------------- safe loading


class _AllowListUnpickler(pickle.Unpickler):
    """Only the classes DCP's own metadata is made of (and torch's dtypes); anything else is refused."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
    } | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
         ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
         ("pathlib", "PurePosixPath")}

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, except that `.metadata` is unpickled through an allow-list and size-bounded, and may
    only point into this checkpoint's own shard files, untransformed."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                if size > MAX_METADATA_BYTES:
                    raise OSError(f"{size:,} bytes, more than any checkpoint's metadata")
                metadata = _AllowListUnpickler(f).load()
        except OSError as e:
            raise UnreadableCheckpoint(f"{path}: cannot read it ({e.strerror or e}); refused") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
            raise UnreadableCheckpoint(f"{path}: refused, not a checkpoint's metadata ({first_line(e, 160)})") from None
        check_metadata(metadata, path)
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_metadata(metadata: object, path: Path) -> None:
    """The unpickled objects are of the expected types and point only at this checkpoint's shard files."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import StorageMeta

    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UnreadableCheckpoint(f"{path}: not a checkpoint's metadata ({type(metadata).__name__})")
    for info in metadata.storage_data.values():
        if not isinstance(info, _StorageInfo) or not SHARD_FILE.fullmatch(str(info.relative_path)):
            raise UnreadableCheckpoint(f"{path}: names a data file other than this checkpoint's shards; refused")
        if info.transform_descriptors:
            raise UnreadableCheckpoint(f"{path}: its entries are transformed ({info.transform_descriptors}), which "
                                       "this trainer never writes; refused")
        if not all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length)):
            raise UnreadableCheckpoint(f"{path}: an entry with a negative or non-integer offset; refused")
    if not isinstance(getattr(metadata, "storage_meta", None), StorageMeta):
        metadata.storage_meta = StorageMeta()


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries read by torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnreadableCheckpoint(f"entry {read_item.dest_index.fqn} refused: it holds pickled objects other "
                                       f"than tensors and plain data ({refused_object(str(e))})") from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise UnreadableCheckpoint(f"entry {read_item.dest_index.fqn} is corrupt ({first_line(e, 120)})") from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def safe_load(state_dict: dict, path: Path) -> None:
    """`dcp.load` into `state_dict` in place, with `SafeReader` and `SafePlanner`; any refusal or corrupt shard
    is one `UnreadableCheckpoint` naming the checkpoint (on every rank)."""
    SafeReader(path).read_metadata()  # a refusal here is its own message, not wrapped in DCP's exception
    try:
        dcp.load(state_dict, storage_reader=SafeReader(path), planner=SafePlanner())
    except CheckpointException as e:
        first = first_failure(e)
        if isinstance(first, UnreadableCheckpoint):
            raise UnreadableCheckpoint(str(first)) from None
        raise UnreadableCheckpoint(f"{path}: not a readable sharded checkpoint ({first_line(first, 160)})") from None
    except UnreadableCheckpoint:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise UnreadableCheckpoint(f"{path}: not a readable sharded checkpoint ({first_line(e, 160)})") from None


# ----------------------------------------------------------------------------- checkpoints


def first_failure(e: BaseException) -> BaseException:
    """The exception a rank raised inside DCP (DCP gathers them as (exception, traceback) per rank)."""
    while isinstance(e, CheckpointException) and e.failures:
        failure = next(iter(e.failures.values()))
        e = failure[0] if isinstance(failure, tuple) else failure
    return e


def sharded_path(out_dir: str | Path, step: int) -> Path:
    """Step N's shards: OUT_DIR/ckpt_{N:07d}.dcp/, beside the model file `checkpoint_path(out_dir, N)`."""
    return checkpoint_path(out_dir, step).with_suffix(".dcp")


def training_state_bytes(state: dict) -> bytes:
    """The training state (step, loader, RNG, config: plain data and tensors) as one entry of the checkpoint,
    in torch.save's format, read back with weights_only=True."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_sharded(path: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], train_state: dict,
                 rank: int) -> Path:
    """Every rank writes its shard of the model and optimizer state into `path`'s temp dir; rank 0 adds the
    training state (its own, which every rank shares) and renames the dir once all ranks are done."""
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write of this same step
    dist.barrier()
    msd, osd = get_state_dict(model, optimizers)
    state = {"model": msd, "optim": osd}
    if rank == 0:
        state["train"] = training_state_bytes(train_state)
    dcp.save(state, storage_writer=FileSystemWriter(tmp, sync_files=True))  # returns once .metadata is written
    if rank == 0:
        if path.exists():  # a re-run of this step after a resume: the new one replaces it whole
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    dist.barrier()
    return path


def load_sharded(path: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Load the shards of `path` into the sharded `model` and its optimizers (any world size: DCP reshards),
    and return the training state saved with them."""
    msd, osd = get_state_dict(model, optimizers)
    state = {"model": msd, "optim": osd, "train": b""}
    safe_load(state, path)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if not isinstance(state["train"], bytes) or not state["train"]:
        raise UnreadableCheckpoint(f"{path}: its training state is missing or not of the trainer's format")
    try:
        train = torch.load(io.BytesIO(state["train"]), weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnreadableCheckpoint(f"{path}: its training state holds pickled objects other than tensors and plain "
                                   f"data ({refused_object(str(e))}); refused") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise UnreadableCheckpoint(f"{path}: its training state is corrupt ({first_line(e, 120)})") from None
    if not isinstance(train, dict):
        raise UnreadableCheckpoint(f"{path}: its training state is not a dict")
    return train


def read_metadata(path: Path) -> Metadata:
    """The checked metadata of a sharded checkpoint (no process group needed): whether it is complete and safe."""
    return SafeReader(path).read_metadata()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_sharded(out_dir: str | Path) -> list[Path]:
    """Finished sharded checkpoints (ckpt_N.dcp/ dirs), oldest first; temp dirs of interrupted writes are not."""
    return sorted(p for p in Path(out_dir).glob("ckpt_*.dcp") if p.is_dir())


def prune_sharded(out_dir: Path, keep_steps: set[str]) -> None:
    """Remove the shard dirs whose model file is gone (pruned with --keep_last) or never came (an interrupted
    write), and temp dirs; `keep_steps`: the model files' names that stay."""
    for path in list_sharded(out_dir):
        if path.with_suffix(".pt").name not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
    for tmp in Path(out_dir).glob(".ckpt_*.dcp.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the trainer's checkpoints


def write_sharded_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, optimizers: list, tokenizer: Tokenizer,
                             train_state: dict, keep_last: int, rank: int) -> Path | None:
    """Step `step`'s shards, then its model file (which marks it complete), then prune to the newest `keep_last`
    (0 = all). Every rank calls it; returns the model file's path on rank 0. Non-finite weights are never
    written, so pruning never leaves only diverged checkpoints."""
    full = full_state_dict(model)  # on rank 0
    box = [rank != 0 or weights_finite(full)]
    dist.broadcast_object_list(box, src=0)
    if not box[0]:
        raise CheckpointError(f"step {step}: the weights hold NaN or inf; not checkpointed, the earlier checkpoints "
                              "are kept")
    shards = save_sharded(sharded_path(out_dir, step), model, optimizers, train_state, rank)
    path = None
    if rank == 0:
        # what resuming checks before it builds anything (flags, world size) is in the model file too
        known = {k: train_state[k] for k in ("train_config", "world_size") if k in train_state}
        fields = model_checkpoint_fields(model, tokenizer, full) | known | {"step": step, "sharded": shards.name}
        path = write_checkpoint(fields, out_dir, step, keep_last)
        prune_sharded(out_dir, {p.name for p in list_checkpoints(out_dir)})
    dist.barrier()
    return path


def newest_sharded(out_dir: Path, log=print) -> tuple[Path | None, dict | None]:
    """The model file of the newest complete sharded checkpoint in `out_dir` (whose shards' metadata is safe to
    read) and its contents. Interrupted writes (temp dirs, shards without a model file) are removed; an
    unreadable checkpoint is set aside, model file and shards both, and the next older one is tried."""
    complete = {p.name for p in list_checkpoints(out_dir)}
    for path in [*list_sharded(out_dir), *Path(out_dir).glob(".ckpt_*.dcp.tmp")]:
        if path.with_suffix(".pt").name not in complete or path.name.endswith(".tmp"):
            log(f"resume: removing {path.name}, left by an interrupted checkpoint write")
    prune_sharded(out_dir, complete)
    for path in reversed(list_checkpoints(out_dir)):
        try:
            ckpt = load_checkpoint(path)
            if "sharded" not in ckpt:
                raise CheckpointError(f"--resume: {path} was written by a run without --fsdp; resume it with "
                                      "--fsdp false")
            read_metadata(path.with_suffix(".dcp"))
        except UnreadableCheckpoint as e:
            moved = [set_aside(p).name for p in (path, path.with_suffix(".dcp")) if p.exists()]
            log(f"resume: skipping {e}; moved aside to {', '.join(moved)}")
            continue
        return path, ckpt
    return None, None


def sharded_model_file(spec: Path) -> Path:
    """`--resume PATH` under --fsdp: a checkpoint's model file, its shards dir, or a run dir (its newest)."""
    path = spec.with_suffix(".pt") if spec.suffix == ".dcp" else spec
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"--resume {spec}: no ckpt_*.pt in that directory; pass a checkpoint, or --resume "
                                  "auto to start fresh when there is none")
        path = newest
    if not path.is_file():
        raise CheckpointError(f"--resume {spec}: no such checkpoint; pass a ckpt_*.pt, its .dcp dir or a run dir")
    if not path.with_suffix(".dcp").is_dir():
        raise CheckpointError(f"--resume {spec}: {path.with_suffix('.dcp').name}/ (the optimizer state of a sharded "
                              "run) is missing; resume a --fsdp false run with --fsdp false")
    return path
