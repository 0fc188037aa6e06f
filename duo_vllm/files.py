"""Writing files and directories whole: a temporary beside the target, then one rename, so a crash or a
kill leaves the old target or the new one, never half of either."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: object) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def refuse_existing(out: str | os.PathLike, force: bool, hint: str = "pass --force to replace it") -> None:
    if Path(out).exists() and not force:
        raise FileExistsError(f"--out {out} already exists ({hint})")


def remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary directories that killed writers of `out` left beside it (their pid is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = tmp.name.removeprefix(f".{out.name}.tmp-").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    On any error the temporary directory is removed and ``out_dir`` is left as it was. A writer killed
    outright (kill -9, OOM killer) leaves its ``.NAME.tmp-PID-*`` directory: the next writer removes it.
    """
    out = Path(out_dir).resolve()
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
