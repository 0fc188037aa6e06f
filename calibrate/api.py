"""Library API of duo-calibrate: model directory in, duo checkpoint directory out."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from calibrate import data, models
from calibrate.resume import BlockStore, run_identity, state_dir
from calibrate.sequential import CalibrationError, calibrate_blocks
from duo_vllm.format import (
    THRESHOLDS_FILE,
    DuoConfig,
    atomic_output_dir,
    threshold_name,
    threshold_tensor,
    write_report,
)


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
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"--out {out} already exists (pass --force to replace it)")
    models.check_model_dir(model_dir)
    tokenizer = models.load_tokenizer(model_dir)
    ids = data.calibration_windows(tokenizer, cfg.dataset, cfg.nsamples, cfg.seqlen, cfg.seed)
    identity = run_identity(model_dir, cfg.model_dump(), data.fingerprint(ids), device)
    store = BlockStore(state_dir(out), identity, resume=resume, force=force)
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
    seconds = time.time() - t0

    report = {
        "config": cfg.model_dump(),
        "model": str(Path(model_dir).resolve()),
        "calibration_data": {"dataset": cfg.dataset, "shape": list(ids.shape), "fingerprint": data.fingerprint(ids)},
        "seconds": round(seconds, 2),
        "resumed_blocks": len(finished),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "host": platform.node(),
        "summary": _summary(rows),
        "layers": rows,
    }
    with atomic_output_dir(out, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_file({threshold_name(l, n): threshold_tensor(t) for (l, n), t in thresholds.items()},
                  str(tmp / THRESHOLDS_FILE))
        _finish_config(tmp, cfg)
        write_report(tmp, report)
    store.remove()
    return out


def _finish_config(ckpt: Path, cfg: DuoConfig) -> None:
    """Add quantization_config to config.json, and the thresholds file to a sharded index if there is one."""
    config_file = ckpt / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = cfg.model_dump()
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    index_file = ckpt / "model.safetensors.index.json"
    if index_file.is_file():
        from safetensors import safe_open

        index = json.loads(index_file.read_text())
        with safe_open(str(ckpt / THRESHOLDS_FILE), framework="pt") as sf:
            index["weight_map"].update({name: THRESHOLDS_FILE for name in sf.keys()})
        index_file.write_text(json.dumps(index, indent=2) + "\n")


def _summary(rows: list[dict]) -> dict:
    """Parameter-weighted sparsities over all pruned linears, and the mean layer error."""
    return {
        "weight_sparsity": sum(r["weight_sparsity"] * r["numel"] for r in rows) / sum(r["numel"] for r in rows),
        "act_sparsity": sum(r["act_sparsity"] for r in rows) / len(rows),
        "mean_rel_error": sum(r["rel_error"] for r in rows) / len(rows),
    }


def read_summary(ckpt_dir: str | os.PathLike) -> dict:
    from duo_vllm.format import read_report

    return read_report(ckpt_dir)["summary"]
