"""Writing a whole folder atomically: build it beside its destination, then rename it into place.

Where it sits: under the dataset generators (`synthetic.py`, `scenes.py`, `objects.py`), whose output folder is
either absent or complete, never half-written (a killed run leaves only a hidden temp folder,
which the next run removes). `checkpoint.atomic_save` does the same for single files.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(out_dir, overwrite: bool = False):
    """`with atomic_folder(out) as tmp:` write into `tmp`; on success it replaces `out`.

    An existing `out` is replaced only with `overwrite=True`; on an error nothing of `out` changes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
