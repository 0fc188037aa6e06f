"""The bitmap format: round trip, layout, and the byte counter."""
import pytest
import torch
from kernel_helpers import make_weight

from duo_vllm.kernels import dense_bytes, format_bytes, pack_weight, resident_bytes, unpack_weight


@pytest.mark.parametrize("n,k,block_n", [(200, 101, 128), (64, 7, 32), (300, 33, 256), (1, 1, 32)])
@pytest.mark.parametrize("p_w", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_round_trip(n, k, block_n, p_w):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w = make_weight(n, k, p_w, dtype, gen)
        packed = pack_weight(w, block_n=block_n)
        assert torch.equal(unpack_weight(packed), w)
        # the nonzeros, then one zero of padding for the decode kernel's unmasked gathers
        assert packed.values.dtype == dtype and packed.values.numel() == int((w != 0).sum()) + 1
        assert packed.values[-1] == 0
        assert packed.masks.shape == (-(-n // block_n), k, block_n // 32)
        assert torch.equal(packed.col_nnz, (w != 0).sum(0, dtype=torch.int32))
        assert packed.gemm_weight is None  # no dense copy unless asked
        assert packed.tickets.shape == (-(-n // block_n),) and not packed.tickets.any()


def test_layout():
    """Bit b of word j of segment (t, k) is output t*BN + 32j + b; values of a segment are contiguous."""
    w = torch.zeros(70, 3)
    w[[0, 31, 32, 63, 64, 69], 1] = torch.tensor([1.0, 2, 3, 4, 5, 6])
    p = pack_weight(w, block_n=64)
    assert p.masks[0, 1].tolist() == [(1 << 0) | -(1 << 31), 1 | -(1 << 31)]  # outputs 0, 31 | 32, 63
    assert p.masks[1, 1].tolist() == [1 | (1 << 5), 0]  # outputs 64, 69 in tile 1
    assert p.offsets.tolist() == [[0, 0, 4], [4, 4, 6]]  # tile-major: (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
    assert p.values.tolist() == [1, 2, 3, 4, 5, 6, 0]
    assert not p.masks[:, [0, 2]].any()


def test_keep_gemm_weight():
    """Default: only the bitmap stays resident (0.578x dense at W50); keep_gemm_weight=True adds the dense weight."""
    w = make_weight(512, 256, 0.5, torch.bfloat16, torch.Generator().manual_seed(0))
    p = pack_weight(w)
    assert p.gemm_weight is None and torch.equal(unpack_weight(p), w)
    nnz = int((w != 0).sum())
    assert resident_bytes(p) == (nnz + 1) * 2 + 4 * 256 * (16 + 4) + 4 * 4
    assert resident_bytes(p) / dense_bytes(p) == pytest.approx(0.5 + 1 / 16 + 2 / 128, abs=0.01)
    kept = pack_weight(w, keep_gemm_weight=True)
    assert kept.gemm_weight is w and resident_bytes(kept) == resident_bytes(p) + dense_bytes(p)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_weight(torch.ones(2, 3, 4))
    with pytest.raises(ValueError):
        pack_weight(torch.ones(2, 3), block_n=48)


def test_format_bytes():
    gen = torch.Generator().manual_seed(1)
    n, k, bn = 1024, 512, 128
    w = make_weight(n, k, 0.5, torch.bfloat16, gen)
    p = pack_weight(w, block_n=bn)
    tiles = n // bn
    seg = 4 + bn // 8
    # all channels: the storage size
    storage = (p.values.numel() - 1) * 2 + p.masks.numel() * 4 + p.offsets.numel() * 4
    assert format_bytes(p) == storage
    # memory ~ (1 - p_w + 1/16 + 2/BN) of dense
    assert format_bytes(p) / dense_bytes(p) == pytest.approx(0.5 + 1 / 16 + 2 / bn, abs=0.01)
    # a channel subset: its nonzeros plus one offset and one mask per tile
    active = torch.rand(k, generator=gen) < 0.4
    want = int((w[:, active] != 0).sum()) * 2 + int(active.sum()) * tiles * seg
    assert format_bytes(p, active) == want
    # per-token masks: the union is read
    per_token = torch.stack([active, torch.zeros(k, dtype=torch.bool)])
    per_token[1, 0] = ~active[0]
    union = active.clone()
    union[0] = True
    assert format_bytes(p, per_token) == format_bytes(p, union)
    assert format_bytes(p, torch.zeros(k, dtype=torch.bool)) == 0
