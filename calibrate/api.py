"""Library API of duo-calibrate: load the model and calibration text, calibrate it, write the duo checkpoint."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from duo_vllm.calibrate import data, models
from duo_vllm.calibrate.resume import BlockStore, run_identity, state_dir
from duo_vllm.calibrate.group import CalibrationError
from duo_vllm.calibrate.pipeline import calibrate_blocks
from duo_vllm.files import refuse_existing
from duo_vllm.format import CalibrationData, CalibrationReport, DuoConfig, write_checkpoint


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def calibrate(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: DuoConfig,
    device: torch.device | str | None = None,
    force: bool = False,
    resume: bool = False,
) -> Path:
    """Prune and threshold-calibrate a checkpoint of a supported family; write the duo checkpoint atomically to out_dir.

    Finished blocks are kept in ``OUT.resume/`` until the checkpoint is written; ``resume=True`` continues an
    interrupted run from there (calibrate.resume), ``force=True`` starts over.
    """
    device = torch.device(device) if device else default_device()
    refuse_existing(out_dir, force)  # before the work, not after it
    models.check_model_dir(model_dir)
    tokenizer = models.load_tokenizer(model_dir)
    ids = data.calibration_windows(tokenizer, cfg.dataset, cfg.nsamples, cfg.seqlen, cfg.seed)
    fingerprint = data.fingerprint(ids)
    identity = run_identity(model_dir, cfg.model_dump(), fingerprint, device)
    store = BlockStore(state_dir(Path(out_dir)), identity, resume=resume, force=force)
    finished = store.finished()
    model = models.load_model(model_dir)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    try:
        thresholds, rows = calibrate_blocks(model, ids, cfg, device, finished=finished, on_block=store.save)
    except BaseException as e:
        kept = store.remove_if_empty()  # keep finished blocks for --resume, nothing else
        if kept and isinstance(e, CalibrationError):
            raise CalibrationError(f"{e} [kept for --resume: {kept} finished block(s) in {store.directory}]") from None
        raise
    report = CalibrationReport(
        config=cfg,
        model=str(Path(model_dir).resolve()),
        calibration_data=CalibrationData(dataset=cfg.dataset, shape=list(ids.shape), fingerprint=fingerprint),
        seconds=round(time.time() - t0, 2),
        resumed_blocks=len(finished),
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        host=platform.node(),
        layers=rows,
    )
    out = write_checkpoint(out_dir, model, tokenizer, thresholds, report, force=force)
    store.remove()
    return out
