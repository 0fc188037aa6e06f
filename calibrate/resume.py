"""Resumable calibration: every finished decoder block is kept beside --out until the checkpoint is written.

    NAME.resume/run.json               what the run is (model files, settings, calibration data, device)
    NAME.resume/block-0000.safetensors one per finished block: its new linear weights, the RNG state, and
                                       its thresholds and report rows in the header metadata

Each file is written to a temporary name and renamed, so a kill leaves whole files only. `--resume`
replays the finished blocks (calibrate.pipeline) and goes on from the first missing one; the
checkpoint then equals an uninterrupted run's bit for bit. A directory left by a run with other
inputs is refused, naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from duo_vllm.files import write_json_atomic
from duo_vllm.calibrate.pipeline import FinishedBlock
from duo_vllm.format import LayerRecord

RUN_FILE = "run.json"
_RNG = "__generator_state__"


class ResumeError(ValueError):
    """A resume directory that this run cannot use; the message says why and what to do."""


def state_dir(out: str | os.PathLike) -> Path:
    out = Path(out).resolve()
    return out.with_name(f"{out.name}.resume")


def run_identity(model_dir: str | os.PathLike, settings: dict, data_fingerprint: str, device: torch.device) -> dict:
    """What must be equal for a resumed run to give the same checkpoint (weight files by size and mtime)."""
    model = Path(model_dir).resolve()
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(model.glob("*.safetensors"))}
    return {
        "model": str(model),
        "config.json sha256": hashlib.sha256((model / "config.json").read_bytes()).hexdigest(),
        "weight files": files,
        "settings": settings,
        "calibration data": data_fingerprint,
        "device": str(device),
        "torch": torch.__version__,
    }


class BlockStore:
    """The resume directory of one run: opened fresh, or (resume=True) continued if it is the same run's."""

    def __init__(self, directory: Path, identity: dict, resume: bool, force: bool) -> None:
        self.directory = directory
        run_file = directory / RUN_FILE
        if run_file.is_file():
            earlier = json.loads(run_file.read_text())
            n = len(self._block_files())
            if n and not resume and not force:
                raise ResumeError(f"{directory} holds {n} finished blocks of an interrupted run: pass --resume to "
                                  "continue it, or --force to start over")
            if n and resume and earlier != identity:
                raise ResumeError(f"--resume: {directory} belongs to a run with other inputs ({_differences(earlier, identity)}); "
                                  "run with the same ones, or pass --force instead of --resume to start over")
            if not n or not resume:
                shutil.rmtree(directory)
        elif directory.exists():  # killed before run.json was written: nothing to keep
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, identity)

    def _block_files(self) -> list[Path]:
        return sorted(self.directory.glob("block-*.safetensors"))

    def finished(self) -> list[FinishedBlock]:
        """The finished blocks 0, 1, ... up to the first one missing."""
        blocks = []
        for idx, f in enumerate(self._block_files()):
            if f.name != _block_name(idx):
                break
            try:
                with safe_open(str(f), framework="pt") as sf:
                    meta = sf.metadata()
                    tensors = {name: sf.get_tensor(name) for name in sf.keys()}
            except SafetensorError as e:
                raise ResumeError(f"{f}: unreadable ({e}); pass --force instead of --resume to start over") from None
            rng = tensors.pop(_RNG)
            blocks.append(FinishedBlock(tensors, json.loads(meta["thresholds"]), [LayerRecord.model_validate(r) for r in json.loads(meta["rows"])], rng))
        return blocks

    def save(self, idx: int, block: FinishedBlock) -> None:
        tmp = self.directory / f".{_block_name(idx)}.tmp-{os.getpid()}"
        tensors = {**{n: w.contiguous() for n, w in block.weights.items()}, _RNG: block.generator_state}
        save_file(tensors, str(tmp), metadata={"thresholds": json.dumps(block.thresholds), "rows": json.dumps([r.model_dump() for r in block.rows])})
        os.replace(tmp, self.directory / _block_name(idx))

    def remove_if_empty(self) -> int:
        """Remove the directory unless it holds finished blocks; returns how many it holds."""
        kept = len(self._block_files())
        if not kept:
            self.remove()
        return kept

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _block_name(idx: int) -> str:
    return f"block-{idx:04d}.safetensors"


def _differences(earlier: dict, now: dict) -> str:
    diffs = []
    for key in sorted(set(earlier) | set(now)):
        a, b = earlier.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [f"{key}.{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            diffs += sub
        else:
            diffs.append(f"{key}: {a!r} then, {b!r} now")
    return "; ".join(diffs)
