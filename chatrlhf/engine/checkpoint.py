"""Resumable checkpoints: `<run dir>/checkpoints/step-NNNNNNNN/`, complete or absent, and verified before use.

A checkpoint holds everything the run's future depends on: each engine's weights, optimizer, LR schedule and step
counter (`engine.save_state`), the RNG states of python, numpy and torch on every rank, and the driver's own state
(step, data position, KL controller, EMA weights, metrics history) together with the length of metrics.jsonl at
that step, so a resumed run rewrites the lines after it exactly as the uninterrupted run would.

Writing is atomic: everything goes into a hidden temp directory, is fsynced, and is renamed to `step-N` last; a
crash mid-write leaves a `.step-N.tmp` that is never read and is removed on the next start. Only after a new
checkpoint is complete are the oldest beyond `keep` deleted, and a checkpoint is deleted (or replaced) by first
renaming it to a hidden `.….tmp` name, so a crash mid-delete never leaves a visible, incomplete `step-N`. A save
that runs out of disk removes its temp directory and stops the run with a UserError; the checkpoints already
complete are kept.

Integrity: the last file written into the temp directory, before the rename, is `manifest.json`: the relative
path, size and xxh3-128 checksum of every other file, whichever rank wrote it. Resuming checks a checkpoint against
its manifest before loading anything, so bit rot, a truncated copy or a deleted file is found before it can be
loaded silently wrong; `--resume auto` then falls back to the newest intact checkpoint, and an explicit
`--resume PATH` stops with a UserError. A damaged checkpoint is never deleted by the resume: it stays until the
resumed run saves the same step again (which replaces it) or pruning removes it as an old one. Checkpoints written
before manifests existed are accepted if every `.pt` file passes the CRC-32 checks torch's zip format stores for
each of its parts. Under DeepSpeed, hashing and checking are shared out between the ranks, and every rank reaches
the same verdict.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import xxhash

from chatrlhf import distributed as dist
from chatrlhf.errors import UserError

PREFIX = "step-"
MANIFEST = "manifest.json"
"""Written last into each checkpoint: {"format", "step", "ranks", "hash", "files": [{"path", "size", HASH}]}."""
HASH = "xxh3_128"
"""The checksum of the manifest (xxhash's XXH3, 128 bits): ~9.5 GiB/s on one core, see docs/reliability.md."""
CHUNK = 8 << 20
"""Bytes read per call while hashing."""


def checkpoint_root(out: Path) -> Path:
    return out / "checkpoints"


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(PREFIX))


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories of interrupted saves start with a dot)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def remove_partial(out: Path) -> None:
    """Delete temp directories of checkpoints whose writing was interrupted."""
    root = checkpoint_root(out)
    if root.is_dir() and dist.is_main():
        for p in root.glob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str, out: Path) -> Path | None:
    """`no` → None; `auto` → the newest intact checkpoint in `out` (None if there is none; a UserError if there are
    some but every one is damaged); else that directory, which must be intact. Every rank calls this."""
    if resume == "no":
        return None
    if resume == "auto":
        return newest_intact(out)
    path = Path(resume)
    if not (path.is_dir() and ((path / MANIFEST).is_file() or (path / "trainer.pt").is_file())):
        raise UserError(f"resume: '{resume}' is not a complete checkpoint directory (no {MANIFEST}, no trainer.pt)")
    check = check_checkpoint(path)
    if check.problem:
        raise UserError(
            f"resume: checkpoint {path} is damaged: {check.problem}; pass another checkpoint, or --resume auto to "
            "continue from the newest intact one"
        )
    if check.unverified:
        print(_unverified_note(path))
    return path


def newest_intact(out: Path) -> Path | None:
    """The newest checkpoint that passes `check_checkpoint`, with a warning for each newer, damaged one."""
    damaged: list[tuple[Path, str]] = []
    for candidate in reversed(_broadcast(list_checkpoints(out) if dist.is_main() else None)):
        check = check_checkpoint(candidate)
        if check.problem:
            damaged.append((candidate, check.problem))
            continue
        for path, problem in damaged:
            print(f"warning: checkpoint {path} is damaged: {problem}; resuming from {candidate} instead")
        if check.unverified:
            print(_unverified_note(candidate))
        return candidate
    if damaged:
        listing = ", ".join(f"{path.name} ({problem})" for path, problem in damaged)
        raise UserError(
            f"no intact checkpoint in {checkpoint_root(out)}; the damaged ones are: {listing}; pass --run.overwrite "
            "to start over"
        )
    return None


class Check(NamedTuple):
    """The verdict on one checkpoint: what is wrong with it (None: intact), and whether it had no manifest."""

    problem: str | None
    unverified: bool


def check_checkpoint(path: Path) -> Check:
    """Check every file of `path` against its manifest: present, of the size written, with the checksum written.

    A checkpoint without a manifest is damaged if its trainer.pt says it was written with one; otherwise it is
    from before manifests, and each `.pt` file is checked against the CRC-32s inside it instead (`unverified`).
    Every rank calls this: the main rank reads the manifest, each rank checks a share of the files, and all return
    the same verdict.
    """
    problem, unverified, files = _broadcast(_read_manifest(path) if dist.is_main() else None)
    if problem:
        return Check(problem, unverified)
    mine = files[dist.rank() :: dist.world_size()]
    found = sorted(p for share in _gather([_check_file(path, *f) for f in mine]) for p in share if p)
    if found:
        more = f" (and {len(found) - 1} more damaged file{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        return Check(found[0] + more, unverified)
    return Check(None, unverified)


def _read_manifest(path: Path) -> tuple[str | None, bool, list[tuple[str, int | None, str | None]]]:
    """(problem, unverified, files to check as (path, size, checksum)); size and checksum are None for a
    checkpoint written before manifests (checked by its zip CRCs)."""
    named_step = path.name.removeprefix(PREFIX)
    step = int(named_step) if path.name.startswith(PREFIX) and named_step.isdigit() else None
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = [(f["path"], int(f["size"]), str(f[HASH])) for f in manifest["files"]]
        written_format, written_step = manifest["format"], manifest["step"]
    except FileNotFoundError:
        return _without_manifest(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})", False, []
    if written_format != 1:
        return f"{MANIFEST} is of format {written_format!r}, which this chatrlhf cannot check (it writes 1)", False, []
    if step is not None and written_step != step:
        return f"{MANIFEST} is of step {written_step}, not of step {step}", False, []
    return None, False, files


def _without_manifest(path: Path) -> tuple[str | None, bool, list[tuple[str, None, None]]]:
    if not (path / "trainer.pt").is_file():
        return f"{MANIFEST} and trainer.pt are missing", False, []
    problem = _check_zip(path, "trainer.pt")
    if problem:
        return f"{MANIFEST} is missing, and {problem}", False, []
    try:
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # a file that passes its CRCs but does not unpickle: damaged all the same
        return f"{MANIFEST} is missing, and trainer.pt does not load ({type(e).__name__}: {e})", False, []
    if isinstance(trainer, dict) and trainer.get("manifest") == MANIFEST:
        return f"{MANIFEST} is missing (this checkpoint was written with one)", False, []
    return None, True, sorted((str(p.relative_to(path)), None, None) for p in path.rglob("*.pt") if p.is_file())


def _check_file(root: Path, rel: str, size: int | None, digest: str | None) -> str | None:
    """What is wrong with file `rel` of checkpoint `root` (None: nothing)."""
    if digest is None:
        return _check_zip(root, rel)
    try:
        actual = (root / rel).stat().st_size
        if actual != size:
            return f"{rel} is {actual} bytes, not the {size} bytes written"
        if file_digest(root / rel) != digest:
            return f"{rel} does not match its {HASH} checksum: its contents changed after it was written"
    except FileNotFoundError:
        return f"{rel} is missing"
    except OSError as e:
        return f"{rel} cannot be read ({e.strerror or e})"
    return None


def _check_zip(root: Path, rel: str) -> str | None:
    """A `torch.save` file is a zip archive that stores a CRC-32 of each part: check them all."""
    try:
        with zipfile.ZipFile(root / rel) as archive:
            bad = archive.testzip()
    except Exception as e:  # BadZipFile, OSError, EOFError, ...: whatever stops the read, the file is damaged
        return f"{rel} is not a readable torch file ({type(e).__name__}: {e})"
    return f"{rel} fails the CRC-32 check of its part {bad}" if bad else None


def _unverified_note(path: Path) -> str:
    return (
        f"note: checkpoint {path} has no {MANIFEST} (written before chatrlhf recorded checksums); its .pt files "
        "passed the CRC-32 checks stored inside them"
    )


def file_digest(path: Path) -> str:
    """The xxh3-128 checksum of a file's bytes, in hex."""
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """After every rank has written its files: the main rank lists them, each rank hashes a share, and the main rank
    writes `manifest.json` with every file's path, size and checksum (every rank calls this)."""
    listing = None
    if dist.is_main():
        sizes = {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
        sizes.pop(MANIFEST, None)
        listing = sorted(sizes, key=lambda rel: (-sizes[rel], rel))
    listing = _broadcast(listing)  # biggest first, dealt out in turn: shares of about equal bytes
    mine = {}
    for rel in listing[dist.rank() :: dist.world_size()]:
        mine[rel] = ((directory / rel).stat().st_size, file_digest(directory / rel))
    hashed = {rel: entry for share in _gather(mine) for rel, entry in share.items()}
    if dist.is_main():
        files = [{"path": rel, "size": hashed[rel][0], HASH: hashed[rel][1]} for rel in sorted(hashed)]
        manifest = {"format": 1, "step": step, "ranks": dist.world_size(), "hash": HASH, "files": files}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, engines: list, trainer: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` (every rank calls this) and prune to the newest `keep` up to `step`.

    Checkpoints of later steps (left by an earlier attempt of this run that got further, e.g. a damaged one that
    the resume fell back from) are not counted and not pruned: the run replaces each when it saves that step."""
    root = checkpoint_root(out)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{PREFIX}{step:08d}.tmp"
    try:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        for engine in engines:
            engine.save_state(tmp)
        torch.save(rng_state(), tmp / f"rng-rank{dist.rank()}.pt")
        if dist.is_main():
            metrics = out / "metrics.jsonl"
            size = metrics.stat().st_size if metrics.exists() else 0
            torch.save({**trainer, "step": step, "metrics_bytes": size, "manifest": MANIFEST}, tmp / "trainer.pt")
        _barrier()
        write_manifest(tmp, step)
        if dist.is_main():
            _fsync_tree(tmp)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        latest = latest_checkpoint(out)
        kept = f"the last complete checkpoint, {latest}, is kept" if latest else "no earlier checkpoint exists"
        raise UserError(f"checkpoint at step {step}: disk full writing {tmp}: {e}; {kept}") from None
    if dist.is_main():
        if final.exists():  # the same step saved by an earlier attempt of this run (resumed from an older step)
            _discard(final)
        tmp.rename(final)
        _fsync_dir(root)
        for old in [c for c in list_checkpoints(out) if checkpoint_step(c) <= step][:-keep]:
            _discard(old)
    _barrier()
    return final


def _discard(checkpoint: Path) -> None:
    """Delete a complete checkpoint: hide it first (one atomic rename), so that no visible `step-N` is ever
    half-deleted; if the deletion is interrupted, `remove_partial` finishes it on the next start."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.old.tmp")
    shutil.rmtree(hidden, ignore_errors=True)
    checkpoint.rename(hidden)
    shutil.rmtree(hidden)


def load_checkpoint(path: Path, engines: list) -> dict[str, Any]:
    """Restore every engine and this rank's RNGs from `path` and return the driver's state saved with it
    (`truncate_metrics` cuts metrics.jsonl back to its length at that step).

    A file that does not load stops the run with a UserError naming it, on every rank at once (the ranks compare
    notes after loading, so none goes on to train alone)."""
    trainer, error = None, None
    try:
        trainer = _restore(path, engines)
    except UserError as e:
        error = str(e)
    errors = [e for e in _gather(error) if e]
    if errors:
        raise UserError(errors[0])
    return trainer


def _restore(path: Path, engines: list) -> dict[str, Any]:
    for engine in engines:
        try:
            engine.load_state(path)
        except Exception as e:  # torch.load or DeepSpeed's load_checkpoint on a damaged file: name it
            what = f"{engine.name}/" if (path / engine.name).is_dir() else f"{engine.name}.pt"  # DeepSpeed: a dir
            raise UserError(f"checkpoint {path}: {what} does not load ({type(e).__name__}: {e})") from None
    rng = path / f"rng-rank{dist.rank()}.pt"
    if not rng.is_file():
        raise UserError(f"checkpoint {path} was written by fewer ranks: no {rng.name} for rank {dist.rank()}")
    trainer = _load_file(path, "trainer.pt")
    state = _load_file(path, rng.name)
    try:
        set_rng_state(state)
    except Exception as e:
        raise UserError(f"checkpoint {path}: {rng.name} does not hold RNG states ({type(e).__name__}: {e})") from None
    return trainer


def _load_file(path: Path, name: str) -> Any:
    try:
        return torch.load(path / name, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path}: {name} does not load ({type(e).__name__}: {e})") from None


def truncate_metrics(out: Path, trainer: dict[str, Any]) -> None:
    """Cut metrics.jsonl back to what had been written when the checkpoint was taken (main rank)."""
    metrics = out / "metrics.jsonl"
    if dist.is_main() and metrics.exists():
        with open(metrics, "r+b") as f:
            f.truncate(trainer["metrics_bytes"])


def due(step: int, every: int, total: int) -> bool:
    """Whether to checkpoint after `step`: every `every` steps and at the last."""
    return step == total or (every > 0 and step % every == 0)


def _barrier() -> None:
    if dist.is_distributed():
        torch.distributed.barrier()


def _broadcast(value: Any) -> Any:
    """The main rank's `value`, on every rank."""
    if not dist.is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_distributed():
        return [value]
    values = [None] * dist.world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
