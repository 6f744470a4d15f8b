"""Export one of our checkpoints as a Hugging Face GPT-2 directory, for `transformers` and the LM Evaluation Harness.

    python export_hf.py out/gpt2-124M hf/gpt2-repro-124M      # a run dir (its newest checkpoint) or a ckpt file
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf/gpt2-repro-124M')('Hi,'))"
    lm_eval --model hf --model_args pretrained=hf/gpt2-repro-124M --tasks hellaswag

The directory holds `config.json`, `model.safetensors` (fp32, the vocab rows padded beyond the tokenizer's
dropped) and, for GPT-2-tokenized runs, the tokenizer: `tokenizer.json` + `tokenizer_config.json` and the
classic `vocab.json` + `merges.txt`, all derived from the BPE ranks that `tokenizer.py` uses.
`gpt2_repro_tokenizer.json` records our tokenizer as in a checkpoint; for character-level runs it is the only
tokenizer there (id i is character i of its `chars`), since that vocabulary is not a Hugging Face tokenizer.
Before the directory appears, the exported model is loaded back with `transformers` and its logits checked
against ours.

The export is written to a new directory and renamed into place. `gpt2_repro_export.json` in it names the source
checkpoint (and its sha256) and every file written; an existing OUT_DIR is replaced only when it is such an export
holding nothing else, so a run directory, a checkpoint's own directory or any directory with files of someone
else's is never touched; and an export of another checkpoint only with `--overwrite` (the same checkpoint, by
sha256, is simply exported again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpt2repro.checkpoint import (
    OUR_TOKENIZER_FILE,
    CheckpointError,
    hf_config_fields,
    latest_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from gpt2repro.devices import quiet_library_logs
from gpt2repro.errors import check_writable
from gpt2repro.fileio import exchange_paths, public_mode, read_json, sha256_of
from gpt2repro.rundir import lock_directory
from gpt2repro.tokenizer import GPT2_EOT, Tokenizer, gpt2_encoding, tokenizer_from_dict
from model import CONV1D_WEIGHTS, GPT, GPTConfig

if TYPE_CHECKING:  # imported where used: transformers is slow to import
    from transformers import GPT2Config, GPT2LMHeadModel

EXPORT_MARKER = "gpt2_repro_export.json"  # what makes a directory an export of ours, and which files are ours
EXPORT_FORMAT = "gpt2-repro Hugging Face export v1"
VERIFY_RTOL = 1e-4  # fp32 logits of the same weights through two implementations, relative to their scale


# -----------------------------------------------------------------------------
# the GPT-2 tokenizer in Hugging Face's byte-level BPE format


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Split `token` with byte-pair merges of rank below `max_rank`, lowest rank first (GPT-2's BPE)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        rank, i = min((ranks.get(parts[j] + parts[j + 1], max_rank), j) for j in range(len(parts) - 1))
        if rank >= max_rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that the ranks encode: token of rank r is the merge of the two parts BPE leaves just before r."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"BPE rank {rank} ({token!r}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json / merges.txt contents: byte strings written with GPT-2's printable stand-in characters."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    ranks = gpt2_encoding()._mergeable_ranks

    def spell(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    vocab["<|endoftext|>"] = GPT2_EOT
    merges = [(spell(a), spell(b)) for a, b in bpe_merges(ranks)]
    return vocab, merges


def save_gpt2_tokenizer(out_dir: Path, model_max_length: int) -> None:
    """Write the GPT-2 tokenizer so `AutoTokenizer.from_pretrained(out_dir)` works offline, old and new versions."""
    from transformers import GPT2Tokenizer

    vocab, merges = gpt2_vocab_and_merges()
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.save_pretrained(out_dir)
    # the classic pair too: older transformers and other tools read these
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                        encoding="utf-8")


# -----------------------------------------------------------------------------
# the model


def unexportable_option(config: GPTConfig) -> str:
    """The first model option GPT-2's format cannot hold, as `--flag value` ("" when it can hold them all)."""
    defaults = GPTConfig()
    for name in ("pos", "norm", "qk_norm", "logit_softcap"):
        if getattr(config, name) != getattr(defaults, name):
            return f"--{name} {getattr(config, name)}"
    return ""


def hf_config(config: GPTConfig, vocab_size: int, eot: int | None) -> GPT2Config:
    """The `transformers` GPT2Config of our model with `vocab_size` rows (options as `checkpoint.hf_config_fields`)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        **hf_config_fields(config),  # the same table checkpoint.load_pretrained reads them back with
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=eot,
        eos_token_id=eot,
        architectures=["GPT2LMHeadModel"],
    )


def hf_state_dict(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights under `transformers` names: Conv1D weights transposed, the vocab cropped to `vocab_size`."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().float()
        if k.endswith(CONV1D_WEIGHTS):
            v = v.t()
        elif k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:vocab_size]  # rows past the tokenizer's ids only pad the matmul; no token maps to them
        out[k] = v.contiguous()
    return out


def to_hf_model(model: GPT, vocab_size: int, eot: int | None) -> GPT2LMHeadModel:
    """A `transformers.GPT2LMHeadModel` computing the same logits as `model` over the first `vocab_size` ids."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_config(model.config, vocab_size, eot))
    sd = hf_state_dict(model, vocab_size)
    for k, v in hf.state_dict().items():
        if k.endswith(".bias") and k not in sd:  # bias=False models: GPT-2 always has biases, zeros are the same
            sd[k] = torch.zeros_like(v)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight names do not map onto GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


@torch.no_grad()
def max_logit_diff(model: GPT, hf: GPT2LMHeadModel, vocab_size: int, seed: int = 0) -> tuple[float, float]:
    """Largest |logit difference| between our model and the exported one on random tokens, and the logits' scale."""
    g = torch.Generator().manual_seed(seed)
    T = min(model.config.block_size, 64)
    idx = torch.randint(0, vocab_size, (2, T), generator=g)
    ours, _ = model.eval()(idx)
    theirs = hf(idx).logits
    diff = (ours[..., :vocab_size].float() - theirs.float()).abs().max().item()
    return diff, max(1.0, ours.abs().max().item())


# -----------------------------------------------------------------------------
# the export


def resolve_checkpoint(spec: str | Path) -> Path:
    """A checkpoint file, or a run dir's newest checkpoint."""
    path = Path(spec)
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{path}: no ckpt_*.pt files in this directory; pass a checkpoint file or run dir")
        return newest
    return path


def _marker(out_dir: Path) -> dict | None:
    """The marker of an earlier export in `out_dir`; None when there is none or it is not ours."""
    try:
        marker = read_json(out_dir / EXPORT_MARKER)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != EXPORT_FORMAT or not isinstance(marker.get("files"),
                                                                                                 list):
        return None
    return marker


def _owned_files(out_dir: Path) -> set[str] | None:
    """The files an earlier export recorded in its marker (the marker included); None when it is not our export."""
    marker = _marker(out_dir)
    return None if marker is None else {str(f) for f in marker["files"]} | {EXPORT_MARKER}


def check_replaceable(out_dir: Path, source_sha256: str | None = None) -> None:
    """Refuse an OUT_DIR that holds anything export_hf.py did not write: only a previous export is replaced. Given
    the source checkpoint's sha256, an export of another checkpoint is refused too (it is a result of its own;
    `--overwrite` passes None), while re-exporting the same checkpoint rewrites the same export."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory; choose a new output directory")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    hint = "choose a new output directory"
    checkpoints = [e for e in entries if e.startswith("ckpt_") and e.endswith(".pt")]
    if checkpoints or "metrics.jsonl" in entries:
        what = checkpoints[0] if checkpoints else "metrics.jsonl"
        raise ValueError(f"{out_dir}: is a training run directory (it holds {what}), never replaced by an export; "
                         f"{hint} (e.g. {out_dir}-hf)")
    owned = _owned_files(out_dir)
    if owned is None:
        raise ValueError(f"{out_dir}: exists and was not written by export_hf.py (no valid {EXPORT_MARKER} in it), "
                         f"so it is not replaced; {hint}, or empty it yourself")
    foreign = [e for e in entries if e not in owned or not (out_dir / e).is_file() or (out_dir / e).is_symlink()]
    if foreign:
        raise ValueError(f"{out_dir / foreign[0]}: not written by export_hf.py, so {out_dir} is not replaced; "
                         f"move that file away or {hint}")
    previous = _marker(out_dir) or {}
    if source_sha256 is not None and previous.get("sha256") != source_sha256:
        raise ValueError(f"{out_dir}: holds the export of another checkpoint ({previous.get('checkpoint')}); pass "
                         f"--overwrite to replace it, or {hint}")


def _make_temp_dir(out_dir: Path) -> Path:
    """A new directory beside `out_dir`, made by `mkdir` so its mode follows the umask (mkdtemp's is 0700)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp.{secrets.token_hex(6)}"
    tmp.mkdir()
    return tmp


def _write_marker(tmp: Path, path: Path, sha256: str) -> None:
    """Record the source checkpoint and the files written, after giving them the umask's permissions."""
    files = sorted(p.name for p in tmp.iterdir())
    mode = public_mode()
    for name in files:
        os.chmod(tmp / name, mode)
    marker = {"format": EXPORT_FORMAT, "checkpoint": str(path.resolve()), "sha256": sha256, "files": files}
    (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def _hold(out_dir: Path) -> tuple[int, bool]:
    """The flock a trainer takes on its run directory (rundir.RunLock), taken on OUT_DIR (made empty when missing):
    a directory a trainer holds is refused, and no trainer can take it while the export is renamed into place.
    Returns the fd holding it and whether OUT_DIR was made here."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return lock_directory(out_dir, "output directory"), created
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise


def _publish(tmp: Path, out_dir: Path, source_sha256: str | None) -> None:
    """Move the finished export into place, holding OUT_DIR's lock; an earlier export is swapped out in one step
    (renameat2 RENAME_EXCHANGE where the system has it) and only its own files are deleted."""
    fd, created = _hold(out_dir)
    try:
        check_replaceable(out_dir, source_sha256)  # again: the directory may have changed while the export was written
        if not any(out_dir.iterdir()):
            os.replace(tmp, out_dir)  # a rename onto an empty directory replaces it; the lock held is on that one
            return
        old = out_dir.parent / f".{out_dir.name}.old.{secrets.token_hex(6)}"
        if exchange_paths(tmp, out_dir):
            os.replace(tmp, old)
        else:
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    finally:
        os.close(fd)
    owned = _owned_files(old) or set()
    for f in old.iterdir():  # entries that are there, never a path the marker names elsewhere
        if f.name in owned and f.is_file() and not f.is_symlink():
            f.unlink()
    try:
        old.rmdir()
    except OSError:  # something appeared there meanwhile: it is not ours to delete
        print(f"warning: kept {old}: it holds files export_hf.py did not write", file=sys.stderr)


def export(checkpoint: str | Path, out_dir: str | Path, verify: bool = True, overwrite: bool = False) -> dict:
    """Write the Hugging Face directory for `checkpoint` to `out_dir`; returns a summary dict. An export of another
    checkpoint already in `out_dir` is replaced only with `overwrite`."""
    path = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    sha256 = sha256_of(path)
    guard = None if overwrite else sha256  # what check_replaceable compares an earlier export's source with
    if out_dir.resolve() in (Path.cwd(), *Path.cwd().parents):  # renamed over, it would hide the shell's cwd
        raise ValueError(f"OUT_DIR {out_dir} is the current directory or holds it; name a new directory, e.g. "
                         f"{Path(out_dir) / 'hf'}")
    check_writable(out_dir, "OUT_DIR")  # before the (large) checkpoint is loaded
    if out_dir.is_dir() and not out_dir.is_symlink():  # a trainer's run dir, even still empty, is refused now
        os.close(lock_directory(out_dir, "output directory"))
    check_replaceable(out_dir, guard)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, str(path))
    tokenizer: Tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    if not isinstance(model, GPT):
        raise ValueError(f"{path}: a {ckpt.get('model_type')} model has no GPT-2 equivalent; only GPT models export")
    if unexportable_option(model.config):
        raise ValueError(f"{path}: trained with {unexportable_option(model.config)}, which GPT-2's Hugging Face "
                         "format cannot hold; only runs with GPT-2's architecture (relu2 and an untied head aside) "
                         "export")
    vocab_size = tokenizer.vocab_size
    if vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: tokenizer has {vocab_size} ids but the model only {model.config.vocab_size}")

    hf = to_hf_model(model, vocab_size, tokenizer.eot)
    params = sum(p.numel() for p in hf.parameters())
    tmp = _make_temp_dir(out_dir)
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        del hf  # the check below loads the files back: one copy fewer in memory for the large sizes
        if tokenizer.name == "gpt2":
            save_gpt2_tokenizer(tmp, model_max_length=model.config.block_size)
        (tmp / OUR_TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict(), ensure_ascii=False) + "\n",
                                              encoding="utf-8")
        diff = None
        if verify:
            from transformers import GPT2LMHeadModel

            diff, scale = max_logit_diff(model, GPT2LMHeadModel.from_pretrained(tmp), vocab_size)
            if not diff <= VERIFY_RTOL * scale:
                raise RuntimeError(f"exported model disagrees with {path}: max |logit difference| {diff:.3g}")
        _write_marker(tmp, path, sha256)
        _publish(tmp, out_dir, guard)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "checkpoint": str(path),
        "out_dir": str(out_dir),
        "tokenizer": tokenizer.name,
        "vocab_size": vocab_size,
        "padded_rows_dropped": model.config.vocab_size - vocab_size,
        "params": params,
        "max_logit_diff": diff,
    }


def main(argv: list[str] | None = None) -> None:
    quiet_library_logs()
    p = argparse.ArgumentParser(description="Export a gpt2-repro checkpoint to a Hugging Face GPT-2 directory.")
    p.add_argument("checkpoint", help="checkpoint file (ckpt_*.pt) or run dir (its newest checkpoint)")
    p.add_argument("out_dir", help="directory to write (created; only a previous export there is replaced)")
    p.add_argument("--no_verify", action="store_true", help="skip loading the export back to compare logits")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an export of another checkpoint in OUT_DIR (re-exporting the same one needs no flag)")
    args = p.parse_args(argv)
    try:
        s = export(args.checkpoint, args.out_dir, verify=not args.no_verify, overwrite=args.overwrite)
    except (CheckpointError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a read-only or full disk, a parent that is a file
        sys.exit(f"error: {e.filename or args.out_dir}: {e.strerror or e}; check the output directory")
    print(f"exported {s['checkpoint']} -> {s['out_dir']}: {s['params']:,} parameters, vocab {s['vocab_size']}"
          + (f" ({s['padded_rows_dropped']} padded rows dropped)" if s["padded_rows_dropped"] else ""))
    if s["max_logit_diff"] is not None:
        print(f"checked: transformers reproduces our logits to {s['max_logit_diff']:.2g}")
    if s["tokenizer"] == "gpt2":
        print(f"load it: transformers.pipeline('text-generation', model={s['out_dir']!r})")
        print(f"evaluate: lm_eval --model hf --model_args pretrained={s['out_dir']} --tasks hellaswag")
    else:
        print(f"note: this run uses the {s['tokenizer']!r} tokenizer, which is not a Hugging Face one; no tokenizer "
              f"files were written (its vocabulary is in {OUR_TOKENIZER_FILE}), so pipelines and lm_eval need "
              "token ids, not text")


if __name__ == "__main__":
    main()
