"""Resuming on a different number of ranks through DeepSpeed's universal checkpoint format.

A ZeRO checkpoint stores optimizer state partitioned by the data-parallel size it was written with.
``convert_to_universal`` rewrites one ``step_N`` folder into per-parameter files (``step_N_universal``)
that an engine of any size loads with ``{"checkpoint": {"load_universal": true}}``; the trainer does this
by itself when ``--resume`` meets a checkpoint written by another rank count.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

from linreg.checkpoint import safe_torch_load
from linreg.errors import CheckpointError


def convert_to_universal(src: Path, dst: Path, workers: int = 1) -> Path:
    from deepspeed.checkpoint import ds_to_universal

    src, dst = Path(src), Path(dst)
    if (dst / "COMPLETE").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), safe_torch_load():
            ds_to_universal.main(args)
    except CheckpointError:
        raise
    except Exception as exc:  # DeepSpeed raises plain exceptions here
        raise CheckpointError(f"could not convert {src} to a universal checkpoint: {exc}") from exc
    # DeepSpeed writes <output>/zero/... plus the model-state files; the loader wants the step folder itself
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    (dst / "COMPLETE").write_text("universal\n")
    return dst
