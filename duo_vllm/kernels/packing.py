"""The runtime format of a pruned weight: input-channel-major, output-tiled bitmap + packed values.

A weight W [N, K] (N outputs, K inputs) is cut into T = ceil(N / block_n) tiles of block_n outputs.
For every segment (tile t, input channel k) the format stores
  masks[t, k]   block_n bits (block_n / 32 int32 words): bit b of word w <=> W[t*block_n + 32*w + b, k] != 0
  offsets[t, k] int32 index into ``values`` where the segment's nonzeros start
  values[...]   the nonzeros of the segment, in output order, contiguous; after the last segment one
                zero of padding (the decode kernel's unmasked gathers may read one element past a segment)
Segments are laid out tile-major (t, then k), so the channels one program walks for one tile form a
single contiguous stream; a zero activation skips its whole segment (mask, offset and values) and
pruned weights are never stored or read.

Bytes per dense element, relative to dense bf16/fp16 (2 B): (1 - p_w) for values + 1/16 for the mask +
2/block_n for the offset, i.e. 0.578 of dense at p_w = 0.5, block_n = 128 (1.156 B per dense element);
plus one int32 ticket per output tile (the decode kernel's split-K completion counter). That is the
whole resident weight: ``pack_weight`` keeps no dense copy unless asked (``keep_gemm_weight``).
Choices, by bytes read per segment:
- one offset per segment rather than one per block of channels: with shared offsets a segment's start
  is a prefix sum over the masks of all channels before it, so dead channels' masks (block_n / 8 = 16 B)
  would be read too; at s_a = 0.5 that is 8 B more per segment to save 2 B of offsets.
- no stored per-word prefix counts: the decode kernel's threads hold all block_n / 32 words of a
  segment and count them with popcount (cheaper than loading and unpacking stored counts, and 4 B per
  segment less: the stored variant would be 0.594 of dense at p_w = 0.5 instead of 0.578).
- no padding of segments to 32-byte sectors: it would add about 16 B per segment (6% of dense at
  block_n = 128) to every read, while the tile-major order already makes a run of live channels one
  contiguous read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BLOCK_N = 128


@dataclass
class PackedWeight:
    """A weight in the bitmap format (see module docstring), plus what dispatch needs beside it.

    values:   [nnz + 1] weight dtype, nonzeros in (tile, channel, output) order, then one zero
    masks:    [T, K, block_n // 32] int32 bitmaps
    offsets:  [T, K] int32 start of each segment in ``values``
    col_nnz:  [K] int32 nonzeros per input channel (byte accounting only; never read by kernels)
    gemm_weight: [N, K] the original weight for the "gemm" path, or None (the default: see ``pack_weight``)
    tickets:  [T] int32, zero between launches: the decode kernel's per-tile split-K counters
    out_features, in_features, block_n: N, K and the tile width
    """

    values: torch.Tensor
    masks: torch.Tensor
    offsets: torch.Tensor
    col_nnz: torch.Tensor
    gemm_weight: torch.Tensor | None
    tickets: torch.Tensor
    out_features: int
    in_features: int
    block_n: int

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def num_tiles(self) -> int:
        return self.masks.shape[0]


def pack_weight(weight: torch.Tensor, block_n: int = DEFAULT_BLOCK_N,
                keep_gemm_weight: bool = False) -> PackedWeight:
    """Build the bitmap format from a dense-with-zeros weight [N, K], on the weight's device.

    Call once at load time, after tensor-parallel sharding (not inside CUDA-graph capture: it
    allocates the zeroed tickets).

    ``keep_gemm_weight`` is a memory-vs-speed choice, off by default: True keeps a reference to
    ``weight`` (no copy) so large batches (prefill) run cuBLAS on it (the "gemm" path), which holds
    0.578 + 1 = 1.58x the dense weight bytes at p_w = 0.5 (vLLM takes that from the KV cache). False
    (default) keeps only the bitmap (0.578x) and large batches run the "load sparse, compute dense"
    tl.dot kernel on it; the caller may then free ``weight``. Switch the default only after a GPU
    measurement shows that sparse prefill path slower than 1.2x dense.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    if block_n % 32 != 0 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two and a multiple of 32, got {block_n}")
    n, k = weight.shape
    tiles = -(-n // block_n)
    # [K, T*block_n] -> [T, K, block_n]: tile-major, channel, output
    wt = torch.zeros(k, tiles * block_n, dtype=weight.dtype, device=weight.device)
    wt[:, :n] = weight.t()
    wt = wt.view(k, tiles, block_n).transpose(0, 1).contiguous()
    nz = wt != 0

    # 8 bits -> one byte, 4 little-endian bytes -> one int32 word (bit b of word w is output 32*w + b)
    shifts = torch.arange(8, device=weight.device, dtype=torch.int16)
    bytes_ = (nz.view(tiles, k, block_n // 8, 8).to(torch.int16) << shifts).sum(-1, dtype=torch.int16)
    masks = bytes_.to(torch.uint8).view(torch.int32)

    counts = nz.sum(-1, dtype=torch.int64).view(-1)
    total = int(counts.sum())
    if total >= 2**31:
        raise ValueError(f"{total} nonzeros do not fit int32 offsets")
    offsets = (torch.cumsum(counts, 0) - counts).to(torch.int32).view(tiles, k)
    return PackedWeight(
        values=torch.cat([wt[nz], wt.new_zeros(1)]),
        masks=masks.contiguous(),
        offsets=offsets,
        col_nnz=nz.sum((0, 2), dtype=torch.int32),
        gemm_weight=weight if keep_gemm_weight else None,
        tickets=torch.zeros(tiles, dtype=torch.int32, device=weight.device),
        out_features=n,
        in_features=k,
        block_n=block_n,
    )


def unpack_weight(packed: PackedWeight) -> torch.Tensor:
    """The dense [N, K] weight back from the bitmap format (tests, and the CPU path without a gemm weight)."""
    tiles, k, bn = packed.num_tiles, packed.in_features, packed.block_n
    shifts = torch.arange(8, device=packed.masks.device, dtype=torch.uint8)
    bits = (packed.masks.view(torch.uint8).view(tiles, k, bn // 8, 1) >> shifts) & 1
    nz = bits.view(tiles, k, bn).bool()
    wt = torch.zeros(tiles, k, bn, dtype=packed.dtype, device=packed.values.device)
    wt[nz] = packed.values[:-1]
    return wt.transpose(0, 1).reshape(k, tiles * bn)[:, : packed.out_features].t().contiguous()


def channel_bytes(packed: PackedWeight) -> torch.Tensor:
    """[K] int64: bytes of the format read when input channel k is live (its nonzeros, and one int32
    offset and block_n mask bits per tile)."""
    seg = 4 + packed.block_n // 8
    return packed.col_nnz.to(torch.int64) * packed.values.element_size() + seg * packed.num_tiles


def format_bytes(packed: PackedWeight, active: torch.Tensor | None = None) -> int:
    """Bytes of the format a launch must read when only the ``active`` input channels are live.

    active: bool [K] (channels live for the batch) or [M, K] (per token; a channel is read if any token
    needs it); None means every channel (= the storage size). Excludes x, the output and 32-byte
    sector rounding.
    """
    per_channel = channel_bytes(packed)
    if active is None:
        return int(per_channel.sum())
    if active.dim() == 2:
        active = active.any(0)
    return int(per_channel[active.to(per_channel.device)].sum())


def dense_bytes(packed: PackedWeight) -> int:
    """Bytes of the same weight stored dense."""
    return packed.out_features * packed.in_features * packed.values.element_size()


def resident_bytes(packed: PackedWeight) -> int:
    """Bytes the packed layer keeps on the device: values, masks, offsets, tickets, and the gemm weight if kept."""
    tensors = [packed.values, packed.masks, packed.offsets, packed.tickets]
    if packed.gemm_weight is not None:
        tensors.append(packed.gemm_weight)
    return sum(t.numel() * t.element_size() for t in tensors)
