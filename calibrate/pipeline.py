"""Model plumbing for block-by-block calibration of a LLaMA-layout model (LLaMA, Mistral, Qwen2).

One decoder block lives on the calibration device at a time, with a copy of its original weights; the two
activation streams (original model X̃, compressed model X̂) stay on CPU unless they fit the device.
What a group of linears sharing an input gets is decided by calibrate.group (its math in calibrate.solver,
the methods in calibrate.methods); this module only walks layers, hooks inputs and keeps the streams.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from duo_vllm.calibrate.group import calibrate_group, named_failures
from duo_vllm.format import LINEAR_GROUPS, DuoConfig, LayerRecord, apply_threshold

log = logging.getLogger("duo.calibrate")


class _Stop(Exception):
    """Raised by a capture hook once the wanted input is seen, so the rest of the block is not run."""


def _capture_input(module: nn.Module, sink: list) -> torch.utils.hooks.RemovableHandle:
    def hook(_m, args):
        sink.append(args[0])
        raise _Stop

    return module.register_forward_pre_hook(hook)


def _threshold_hook(module: nn.Module, t: float) -> torch.utils.hooks.RemovableHandle:
    def hook(_m, args):
        return (apply_threshold(args[0], t),) + tuple(args[1:])

    return module.register_forward_pre_hook(hook)


@torch.no_grad()
def _block_inputs(model: nn.Module, ids: torch.Tensor, device: torch.device) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering block 0 for each sample, and the block keyword arguments (mask, rotary)."""
    layers = model.model.layers
    captured: dict = {}
    inps: list[torch.Tensor] = []

    class Catcher(nn.Module):
        def __init__(self, block: nn.Module):
            super().__init__()
            self.block = block

        def forward(self, hidden, **kwargs):
            inps.append(hidden)
            captured.update(kwargs)
            raise _Stop

    model.model.embed_tokens.to(device)
    model.model.rotary_emb.to(device)
    layers[0] = Catcher(layers[0])
    try:
        for row in ids:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = layers[0].block
        model.model.embed_tokens.cpu()
    kwargs = {k: v for k, v in captured.items() if k in ("attention_mask", "position_ids", "position_embeddings")}
    return inps, kwargs


def _run(block: nn.Module, x: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    out = block(x.to(device), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _group_input(block: nn.Module, first: nn.Module, x: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    """Input of `first` (a linear of `block`) when the block runs on x; stops right there."""
    sink: list = []
    handle = _capture_input(first, sink)
    try:
        _run(block, x, kwargs, device)
    except _Stop:
        pass
    finally:
        handle.remove()
    return sink[0]


@dataclass
class FinishedBlock:
    """What calibration decided for one decoder block: all a later run needs to replay it (calibrate.resume)."""

    weights: dict[str, torch.Tensor]  # linear name -> its new weight, on CPU
    thresholds: dict[str, float]  # linear name -> its input threshold
    rows: list[LayerRecord]  # the block's report rows
    generator_state: torch.Tensor  # the threshold sampler's RNG state after the block


def _cpu_busy_elsewhere(seconds: float = 0.2) -> float | None:
    """Cores' worth of CPU time other processes used over `seconds` while this one slept (Linux /proc/stat),
    or None where that can't be read."""
    def busy_total() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    try:
        b0, t0 = busy_total()
        time.sleep(seconds)
        b1, t1 = busy_total()
    except (OSError, ValueError, IndexError):
        return None
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def _cpu_threads(max_threads: int) -> int:
    """Threads for the next block on CPU: one per core other processes leave free, at most `max_threads`.
    torch splits every op evenly over its threads, so a thread sharing its core with a busy process makes
    each op wait for that core's time slices (SmolLM2, 16 x 512, 2-core VM, one busy process beside it:
    20 s per block at 2 threads, 10 s at 1; 7.3 s at 2 when quiet)."""
    busy = _cpu_busy_elsewhere()
    if busy is None:
        return max_threads
    cores = os.cpu_count() or 1
    return max(1, min(max_threads, cores - int(busy + 0.25)))  # a core counts as taken from 0.75 of it on


@torch.no_grad()
def calibrate_blocks(
    model: nn.Module,
    ids: torch.Tensor,
    cfg: DuoConfig,
    device: torch.device,
    log_line: Callable[[str], None] = log.info,
    finished: Sequence[FinishedBlock] = (),
    on_block: Callable[[int, FinishedBlock], None] | None = None,
) -> tuple[dict[tuple[int, str], float], list[LayerRecord]]:
    """Prune every decoder block of `model` in place and calibrate its activation thresholds.

    Blocks 0..len(finished)-1 are replayed from `finished` (an interrupted run's results): their weights
    are set and both streams pushed through them, which gives the same bits as calibrating them again.
    Every newly calibrated block is passed to `on_block`. Returns ({(layer, linear): threshold}, report rows).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    inps, kwargs = _block_inputs(model, ids, device)
    storage = device if _fits_on_device(inps, model.model.layers[0], device) else torch.device("cpu")
    inps = [x.to(storage) for x in inps]
    orig_inps = [x.clone() for x in inps]
    thresholds: dict[tuple[int, str], float] = {}
    rows: list[LayerRecord] = []
    layers = model.model.layers
    max_threads = torch.get_num_threads()
    bar = tqdm(range(len(layers)), desc="calibrating", unit="block", dynamic_ncols=True)
    try:
        for idx in bar:
            t0 = time.time()
            if device.type == "cpu" and max_threads > 1:
                threads = _cpu_threads(max_threads)
                if threads != torch.get_num_threads():
                    log_line(f"block {idx}: {threads} of {max_threads} threads (other processes use the other cores)")
                    torch.set_num_threads(threads)
            block = layers[idx].to(device)
            with named_failures(f"model.layers.{idx}", device):
                if idx < len(finished):
                    bar.set_postfix_str(f"({idx + 1}/{len(layers)}) replaying the interrupted run's block")
                    done = finished[idx]
                    orig_inps = [_run(block, x, kwargs, device).to(storage) for x in orig_inps]
                    for name, W in done.weights.items():
                        block.get_submodule(name).weight.data = W.to(device)
                    gen.set_state(done.generator_state)
                else:
                    done, orig_inps = _calibrate_block(block, idx, inps, orig_inps, kwargs, cfg, gen, device, storage,
                                                       lambda s: bar.set_postfix_str(f"({idx + 1}/{len(layers)}) {s}"),
                                                       log_line)
                applied = done.thresholds if cfg.calibration_inputs == "thresholded" else {}
                inps = _compressed_outputs(block, applied, inps, kwargs, device, storage)
            layers[idx] = block.cpu()
            thresholds.update({(idx, name): t for name, t in done.thresholds.items()})
            if idx >= len(finished):
                for r in done.rows:
                    r.block_seconds = round(time.time() - t0, 3)
                if on_block:
                    on_block(idx, done)
            rows += done.rows
    finally:
        torch.set_num_threads(max_threads)
    return thresholds, rows


def _calibrate_block(block: nn.Module, idx: int, inps: list[torch.Tensor], orig_inps: list[torch.Tensor],
                     kwargs: dict, cfg: DuoConfig, gen: torch.Generator, device: torch.device,
                     storage: torch.device, status: Callable[[str], None], log_line: Callable[[str], None]
                     ) -> tuple[FinishedBlock, list[torch.Tensor]]:
    """Calibrate one block in place: one pass of the original block over the original stream captures X̃ at
    every group input; then, group by group in order of dependence, the partially compressed block gives X̂
    at that group's input and calibrate.group decides the group. Returns the block's decisions and the
    original stream's block outputs."""
    original_block = copy.deepcopy(block)  # the original weights, for the original stream X̃
    status("original stream")
    original_inputs, orig_outs = _original_pass(original_block, orig_inps, kwargs, device, storage)
    del original_block
    done = FinishedBlock(weights={}, thresholds={}, rows=[], generator_state=torch.empty(0))
    handles = []
    try:
        for group, names in LINEAR_GROUPS.items():
            status(group)
            with named_failures(f"model.layers.{idx}.{names[0]}", device):
                first = block.get_submodule(names[0])
                if cfg.input_stream == "original":
                    xs = original_inputs[group]
                else:
                    xs = [_group_input(block, first, x, kwargs, device).to(storage) for x in inps]
                linears = {name: block.get_submodule(name) for name in names}
                targets = original_inputs.pop(group)
                if cfg.residual_target == "compressed":
                    targets = xs
                result = calibrate_group({name: lin.weight.data for name, lin in linears.items()}, xs, targets,
                                         cfg, gen, idx, device, log_line)
                del xs
            for name, linear in linears.items():
                linear.weight.data = result.weights[name]
                done.weights[name] = result.weights[name].cpu()
                done.thresholds[name] = result.threshold
            done.rows += result.records
            if cfg.calibration_inputs == "thresholded":  # the next group's X̂ as served
                handles += [_threshold_hook(lin, result.threshold) for lin in linears.values()]
    finally:
        for h in handles:
            h.remove()
    done.generator_state = gen.get_state()
    return done, orig_outs


def _compressed_outputs(block: nn.Module, thresholds: dict[str, float], inps: list[torch.Tensor], kwargs: dict,
                        device: torch.device, storage: torch.device) -> list[torch.Tensor]:
    """The compressed stream through a finished block: its new weights, every linear's input thresholded."""
    handles = [_threshold_hook(block.get_submodule(name), t) for name, t in thresholds.items()]
    try:
        return [_run(block, x, kwargs, device).to(storage) for x in inps]
    finally:
        for h in handles:
            h.remove()


def _original_pass(block: nn.Module, inps: list[torch.Tensor], kwargs: dict, device, storage
                   ) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """Run the original block once per sample: the input of every linear group, and the block outputs."""
    captured: dict[str, list[torch.Tensor]] = {g: [] for g in LINEAR_GROUPS}
    handles = [
        block.get_submodule(names[0]).register_forward_pre_hook(
            lambda _m, args, sink=captured[g]: sink.append(args[0].to(storage)))
        for g, names in LINEAR_GROUPS.items()
    ]
    try:
        outs = [_run(block, x, kwargs, device).to(storage) for x in inps]
    finally:
        for h in handles:
            h.remove()
    return captured, outs


def _fits_on_device(inps: list[torch.Tensor], block: nn.Module, device: torch.device) -> bool:
    """Keep the streams and cached group inputs on the GPU only when they take under half its free memory."""
    if device.type != "cuda":
        return True
    widths = [block.get_submodule(names[0]).in_features for names in LINEAR_GROUPS.values()]
    hidden = inps[0].shape[-1]
    per_hidden = sum(x.numel() * x.element_size() for x in inps) / hidden
    need = per_hidden * (2 * hidden + sum(widths) + max(widths))  # two streams, X̃ of each group, one X̂
    free, _ = torch.cuda.mem_get_info(device)
    return need < free // 2
