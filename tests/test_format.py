"""duo_vllm.format on its own: the report model, writing refuses bad thresholds before touching --out."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from duo_vllm.format import (
    LINEAR_NAMES,
    CalibrationData,
    CalibrationReport,
    DuoConfig,
    DuoFormatError,
    LayerRecord,
    all_linears,
    apply_threshold,
    check_thresholds,
    read_report,
    write_checkpoint,
)


def _report(layers: int = 1) -> CalibrationReport:
    rows = [LayerRecord(layer=i, linear=n, numel=100 if n.startswith("mlp") else 50, weight_sparsity=0.5 if
                        n.startswith("mlp") else 0.2, act_sparsity=0.4, threshold=0.1, rel_error=0.01)
            for i in range(layers) for n in LINEAR_NAMES]
    return CalibrationReport(config=DuoConfig(), model="m", calibration_data=CalibrationData(
        dataset="local:c4", shape=[2, 8], fingerprint="f" * 16), seconds=1.0, resumed_blocks=0, device="cpu",
        peak_gpu_bytes=None, host="h", layers=rows)


def test_report_summary_and_round_trip(tmp_path):
    report = _report()
    # parameter-weighted: 3 mlp linears of 100 at 0.5, 4 attention linears of 50 at 0.2
    assert report.summary.weight_sparsity == pytest.approx((3 * 100 * 0.5 + 4 * 50 * 0.2) / 500)
    (tmp_path / "duo_report.json").write_text(report.model_dump_json())
    assert read_report(tmp_path) == report
    assert json.loads(report.model_dump_json())["summary"]["act_sparsity"] == pytest.approx(0.4)
    (tmp_path / "duo_report.json").write_text('{"config": {}}')
    with pytest.raises(DuoFormatError, match=r"duo_report\.json: not a duo calibration report"):
        read_report(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop((0, "mlp.up_proj")), r"threshold model\.layers\.0\.mlp\.up_proj\.input_threshold is missing"),
    (lambda t: t.update({(0, "mlp.up_proj"): -1.0}), r"up_proj\.input_threshold = -1\.0 \(must be finite"),
    (lambda t: t.update({(0, "mlp.up_proj"): 0.2}), r"layer 0 gate_up linears share one input"),
    (lambda t: t.update({(1, "mlp.up_proj"): 0.1}), r"thresholds for layer 1, but config\.json has num_hidden_layers 1"),
    (lambda t: t.update({(0, "mlp.extra"): 0.1}), r"mlp\.extra\.input_threshold belongs to no decoder linear"),
])
def test_bad_thresholds_are_refused_before_anything_is_written(tmp_path, edit, message):
    thresholds = {key: 0.1 for key in all_linears(1)}
    check_thresholds(thresholds, all_linears(1), "ok")
    edit(thresholds)
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1))  # never saved: refused first
    with pytest.raises(DuoFormatError, match=message):
        write_checkpoint(tmp_path / "out", model, None, thresholds, _report())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_threshold_float_equals_tensor(dtype):
    """The one-pass path of a Python float threshold (calibration) keeps exactly what the 0-d tensor path
    (serving, the reference) keeps: |x| > t with t in x's dtype, ties dropped, NaN dropped, inf kept."""
    x = torch.randn(300, 97, generator=torch.Generator().manual_seed(0)).to(dtype)
    x.view(-1)[:7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, -0.5, -0.0, 0.3]).to(dtype)
    for t in (0.0, 0.3, 0.5, 1.7):
        fast = apply_threshold(x, t)
        assert fast.dtype == dtype
        assert torch.equal(fast, apply_threshold(x, torch.tensor(t, dtype=torch.float32).to(dtype))), t
    assert apply_threshold(x, 0.5).view(-1)[:5].tolist() == [0.0, float("inf"), -float("inf"), 0.0, 0.0]
