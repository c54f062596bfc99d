"""Checkpoint bookkeeping around DeepSpeed's own save and load.

A checkpoint is ``checkpoints/step_N/`` written by ``engine.save_checkpoint`` on every rank; after all
ranks are done, rank 0 writes ``step_N/COMPLETE``. Resuming only ever picks a folder with that marker,
so a save that a crash (or SIGKILL) interrupted is skipped with a message and the previous one is used.
Saving over an existing ``step_N`` (a resumed run passing a step whose save had been cut short) first
deletes it, marker first; removing an old checkpoint also deletes the marker first, then the folder and
its ``step_N_universal`` copy. A run never starts below complete checkpoints of an earlier run in the same
folder (:func:`refuse_newer_checkpoints`).

Every checkpoint read (resume, universal conversion, ``linreg analyze --checkpoints``) goes through
:func:`safe_torch_load`: ``torch.load`` with ``weights_only=True``, DeepSpeed's own reads included, so a
tampered file cannot run code. Set ``LINREG_TRUST_CHECKPOINTS=1`` to read a checkpoint you trust that
holds other Python objects with full pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from linreg.errors import CheckpointError

MARKER = "COMPLETE"
TRUST_ENV = "LINREG_TRUST_CHECKPOINTS"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f"step_{step}"


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every step_N folder, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p, (p / MARKER).is_file()))
    return sorted(out)


def latest_complete(ckpt_root: Path, log=print) -> tuple[int, Path] | None:
    """Newest complete checkpoint; says which newer ones are skipped as incomplete."""
    found = list_checkpoints(ckpt_root)
    for step, path, complete in reversed(found):
        if complete:
            return step, path
        log(f"checkpoint {path} is incomplete (no {MARKER} marker: the save was interrupted); skipping it")
    return None


def mark_complete(path: Path, step: int, extra: dict | None = None) -> None:
    info = {"step": step, "time": time.time(), **(extra or {})}
    tmp = Path(path) / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.rename(Path(path) / MARKER)


def universal_dir(path: Path) -> Path:
    """The universal-format copy of ``step_N`` made when a run resumes on another rank count."""
    return Path(path).with_name(Path(path).name + "_universal")


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, its ``COMPLETE`` marker first (a deletion cut short leaves a folder that
    resume skips as incomplete, never one that looks complete), and its universal copy."""
    path = Path(path)
    for folder in (path, universal_dir(path)):
        (folder / MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(universal_dir(path).with_name(universal_dir(path).name + ".tmp"), ignore_errors=True)


def remove_old(ckpt_root: Path, keep_last: int, log=print) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; incomplete ones older than the newest complete
    one are removed too (they can never be resumed from). Removed ones lose their universal copy too."""
    if keep_last <= 0:
        return
    found = list_checkpoints(ckpt_root)
    complete = [s for s, _, c in found if c]
    if not complete:
        return
    keep = set(complete[-keep_last:])
    newest = complete[-1]
    for step, path, c in found:
        if step in keep or (not c and step > newest):
            continue
        remove_checkpoint(path)
        log(f"removed old checkpoint {path}")


def refuse_newer_checkpoints(ckpt_root: Path, start_step: int) -> None:
    """A run that starts at ``start_step`` (fresh: 0, or an explicit older ``--resume``) in a folder that
    holds complete checkpoints of later steps would mix two runs: keep-last-k would delete the new run's
    checkpoints as the oldest, and a later ``--resume auto`` would continue the old run. Refuse instead."""
    newer = [path for step, path, complete in list_checkpoints(ckpt_root) if complete and step > start_step]
    if not newer:
        return
    names = ", ".join(p.name for p in newer)
    where = "a fresh start" if start_step == 0 else f"a start from step {start_step}"
    raise CheckpointError(
        f"{Path(ckpt_root)} holds complete checkpoints newer than {where}: {names} (an earlier run). Continuing "
        f"would mix the two runs (old-checkpoint removal and --resume auto go by step number). Use a new "
        f"--output-dir, continue the newest with --resume auto, or move those folders out of "
        f"{Path(ckpt_root)} (e.g. mv {newer[-1]} {Path(ckpt_root).parent / 'old-checkpoints'}/) and start again")


def rng_state() -> dict:
    """This process's RNG states. CUDA: only the current device's generator (the one this rank uses), so
    the state restores on a machine with fewer visible devices."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def cuda_state_for_device(saved, device_index: int):
    """The CUDA generator state to restore on ``device_index`` from a saved ``"cuda"`` entry: a single
    state (current format), or the list of every visible device's state that older checkpoints hold (the
    entry of this device, or None when the saving machine had fewer devices)."""
    if isinstance(saved, (list, tuple)):
        return saved[device_index] if 0 <= device_index < len(saved) else None
    return saved


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = cuda_state_for_device(state["cuda"], torch.cuda.current_device())
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def resolve_resume(arg: str | None, ckpt_root: Path, log=print) -> tuple[int, Path] | None:
    """``--resume``: ``auto`` (newest complete, or fresh start), ``none``, or a checkpoint folder."""
    if arg in (None, "", "none"):
        return None
    if arg == "auto":
        return latest_complete(ckpt_root, log=log)
    path = Path(arg)
    if not path.is_dir():
        raise CheckpointError(f"--resume {arg}: no such checkpoint folder")
    m = _STEP_DIR.match(path.name)
    if not m:
        raise CheckpointError(f"--resume {arg}: expected a folder named step_N written by this trainer")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"--resume {arg}: checkpoint is incomplete (no {MARKER} marker); refusing to load it")
    return int(m.group(1)), path


def checkpoint_safe_globals() -> list:
    """What a DeepSpeed checkpoint of ours holds besides tensors and plain containers: numpy arrays (the
    RNG state in the client state) and DeepSpeed's loss-scaler, ZeRO-stage and fragment-address records."""
    allowed: list = [np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core")
    allowed.append(core.multiarray._reconstruct)
    allowed += [type(np.dtype(t)) for t in ("uint32", "int64", "float32", "float64", "bool")]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # an older or newer DeepSpeed without one of them: its checkpoints lack it too
        pass
    return allowed


@contextlib.contextmanager
def safe_torch_load():
    """Within this block every ``torch.load`` (DeepSpeed's internal ones too) runs with
    ``weights_only=True``, allowing only :func:`checkpoint_safe_globals`. A file that needs anything
    else raises :class:`CheckpointError` naming it. ``LINREG_TRUST_CHECKPOINTS=1`` switches this off."""
    if os.environ.get(TRUST_ENV) == "1":
        yield
        return
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            why = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), str(exc).splitlines()[0])
            raise CheckpointError(
                f"{f}: refused by the weights-only loader ({why}); if you trust where this checkpoint came from, "
                f"set {TRUST_ENV}=1 to load it with full pickle") from exc

    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original
