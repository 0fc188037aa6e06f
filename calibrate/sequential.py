"""Model plumbing for block-by-block calibration of a LLaMA-layout model (LLaMA, Mistral, Qwen2).

One decoder block lives on the calibration device at a time, with a dense copy of itself; the two
activation streams (dense model X̃, compressed model X̂) stay on CPU unless they fit the device.
The solver math is in calibrate.solver; this module only walks layers, hooks inputs and keeps the
streams.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from calibrate import solver
from calibrate.methods import prune_weight
from duo_vllm.format import LINEAR_GROUPS, DuoConfig, LayerRecord, apply_threshold

log = logging.getLogger("duo.calibrate")
QUANTILE_SAMPLE = 1 << 24  # entries kept per group for the threshold quantile (exact below this)


class CalibrationError(ValueError):
    """A block that cannot be calibrated (non-finite weights or statistics); the message names the linear."""


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
    fp_inps = [x.clone() for x in inps]
    thresholds: dict[tuple[int, str], float] = {}
    rows: list[LayerRecord] = []
    layers = model.model.layers
    bar = tqdm(range(len(layers)), desc="calibrating", unit="block", dynamic_ncols=True)
    for idx in bar:
        t0 = time.time()
        block = layers[idx].to(device)
        where = [f"model.layers.{idx}"]  # the linear being worked on, for error messages
        try:
            if idx < len(finished):
                bar.set_postfix_str(f"({idx + 1}/{len(layers)}) replaying the interrupted run's block")
                done = finished[idx]
                fp_inps = [_run(block, x, kwargs, device).to(storage) for x in fp_inps]  # the dense stream
                for name, W in done.weights.items():
                    block.get_submodule(name).weight.data = W.to(device)
                gen.set_state(done.generator_state)
            else:
                done, fp_inps = _calibrate_block(block, idx, inps, fp_inps, kwargs, cfg, gen, device, storage,
                                                 lambda s: bar.set_postfix_str(f"({idx + 1}/{len(layers)}) {s}"),
                                                 log_line, where)
            inps = _compressed_outputs(block, done.thresholds, inps, kwargs, device, storage)
        except (RuntimeError, MemoryError) as e:
            if not _out_of_memory(e):
                raise
            raise CalibrationError(
                f"{where[0]}: out of memory on {device} ({str(e).splitlines()[0][:200]}); calibrate with fewer "
                "--nsamples or a shorter --seqlen" + (", or --device cpu" if device.type == "cuda" else "")) from None
        layers[idx] = block.cpu()
        thresholds.update({(idx, name): t for name, t in done.thresholds.items()})
        if idx >= len(finished):
            for r in done.rows:
                r.block_seconds = round(time.time() - t0, 3)
            if on_block:
                on_block(idx, done)
        rows += done.rows
    return thresholds, rows


def _out_of_memory(e: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError with this text
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def _calibrate_block(block: nn.Module, idx: int, inps: list[torch.Tensor], fp_inps: list[torch.Tensor],
                     kwargs: dict, cfg: DuoConfig, gen: torch.Generator, device: torch.device,
                     storage: torch.device, status: Callable[[str], None], log_line: Callable[[str], None],
                     where: list[str]) -> tuple[FinishedBlock, list[torch.Tensor]]:
    """Calibrate one block in place: one pass of the dense block over the dense stream captures X̃ at every
    group input; then, group by group in order of dependence, the partially compressed block gives X̂ at
    that group's input, its threshold is calibrated, its statistics accumulated and its linears pruned.
    Returns the block's decisions and the dense stream's block outputs."""
    dense_block = copy.deepcopy(block)  # the original weights, for the dense stream X̃
    status("dense stream")
    dense_inputs, fp_outs = _dense_pass(dense_block, fp_inps, kwargs, device, storage)
    del dense_block
    done = FinishedBlock(weights={}, thresholds={}, rows=[], generator_state=torch.empty(0))
    handles = []
    try:
        for group, names in LINEAR_GROUPS.items():
            status(group)
            where[0] = f"model.layers.{idx}.{names[0]}"
            first = block.get_submodule(names[0])
            if cfg.input_stream == "original":
                xs = dense_inputs[group]
            else:
                xs = [_group_input(block, first, x, kwargs, device).to(storage) for x in inps]
            t = _threshold(xs, cfg.act_sparsity, gen)
            stats = solver.InputStats(first.in_features, device=device)
            zeros = 0
            for x, x_dense in zip(xs, dense_inputs.pop(group)):
                x_hat = apply_threshold(x.to(device), t)
                zeros += int((x_hat == 0).sum())
                stats.add(x_hat, x_dense.to(device))
            del xs
            act_sparsity = zeros / (stats.tokens * first.in_features)
            if not (torch.isfinite(stats.H).all() and (stats.G is None or torch.isfinite(stats.G).all())):
                raise CalibrationError(f"model.layers.{idx}.{names[0]}: NaN/inf in its calibration inputs "
                                       "(the model's earlier weights or activations overflow)")

            for name in names:
                where[0] = f"model.layers.{idx}.{name}"
                linear = block.get_submodule(name)
                W = linear.weight.data
                if not torch.isfinite(W).all():
                    raise CalibrationError(f"model.layers.{idx}.{name}.weight holds NaN/inf in the input model")
                W_new = prune_weight(W, stats, cfg)
                if not torch.isfinite(W_new).all():
                    raise CalibrationError(f"model.layers.{idx}.{name}: pruning gave NaN/inf weights "
                                           f"(ill-conditioned Hessian; try a larger --percdamp than {cfg.percdamp})")
                err = solver.reconstruction_error(W_new, W, stats)
                linear.weight.data = W_new.to(W.dtype)
                done.weights[name] = linear.weight.data.cpu()
                done.thresholds[name] = t
                w_sp = float((linear.weight == 0).float().mean())
                done.rows.append(LayerRecord(layer=idx, linear=name, numel=W.numel(), weight_sparsity=w_sp,
                                             act_sparsity=act_sparsity, threshold=t, rel_error=err))
                log_line(f"layer {idx:3d} {name:16s} w-sparsity {w_sp:.3f} x-sparsity {act_sparsity:.3f} "
                         f"t {t:.4g} rel-err {err:.4g}")
            handles += [_threshold_hook(block.get_submodule(n), t) for n in names]  # for the next group's X̂
            del stats
    finally:
        for h in handles:
            h.remove()
    done.generator_state = gen.get_state()
    return done, fp_outs


def _compressed_outputs(block: nn.Module, thresholds: dict[str, float], inps: list[torch.Tensor], kwargs: dict,
                        device: torch.device, storage: torch.device) -> list[torch.Tensor]:
    """The compressed stream through a finished block: its new weights, every linear's input thresholded."""
    handles = [_threshold_hook(block.get_submodule(name), t) for name, t in thresholds.items()]
    try:
        return [_run(block, x, kwargs, device).to(storage) for x in inps]
    finally:
        for h in handles:
            h.remove()


def _dense_pass(block: nn.Module, inps: list[torch.Tensor], kwargs: dict, device, storage
                ) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """Run the dense block once per sample: the input of every linear group, and the block outputs."""
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


def _threshold(xs: list[torch.Tensor], sparsity: float, gen: torch.Generator) -> float:
    """The |x| quantile over all samples, from at most QUANTILE_SAMPLE entries (exact below that)."""
    if sparsity <= 0:
        return 0.0
    keep = max(1, QUANTILE_SAMPLE // len(xs))
    samples = []
    for x in xs:
        x = x.reshape(-1)
        if x.numel() > keep:
            x = x[torch.randint(0, x.numel(), (keep,), generator=gen).to(x.device)]
        samples.append(x.float().cpu())
    return solver.activation_threshold(torch.cat(samples), sparsity)


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
