"""``overlock export``: ONNX and torch.export of the fused deploy form, checked against the official outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli

DATA = Path(__file__).parent / "data"


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow  # about a minute of CPU: one trace, the ONNX translation, two verifications
def test_export_onnx_and_torch_export_reproduce_the_official_deploy_outputs(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    expected = np.load(DATA / "expected.npz")
    x = expected["input_1"]  # 64x64: the official small-map resize path
    assert x.shape[-2:] == (64, 64)
    # one trace, two files, each verified inside the command against PyTorch
    code, out, err = run_cli("export", DATA / "classification.pth", "--format", "onnx", "torch-export",
                             "--img-size", "64", "-o", tmp_path / "tiny")
    assert code == 0, err
    assert out.count("verified against PyTorch") == 4 and "fixed at 64x64" in out
    side = json.loads((tmp_path / "tiny.onnx.json").read_text())
    assert side["dynamic"] == {"batch": [1, 1024], "height": False, "width": False}
    assert all(c["rel_err"] < 1e-4 for c in side["checks"])
    # onnxruntime on the reference input, at batch sizes other than the tracing example's (2)
    session = ort.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    import onnx
    model = onnx.load(str(tmp_path / "tiny.onnx"), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    for batch in (1, 3):
        xb = np.repeat(x, batch, axis=0)
        out = session.run(None, {"input": xb})[0]
        assert out.shape == (batch, 10)
        assert rel_err(out, np.repeat(expected["logits_reparam_1"], batch, axis=0)) < 1e-4
    program = torch.export.load(str(tmp_path / "tiny.pt2")).module()
    with torch.no_grad():
        assert rel_err(program(torch.from_numpy(x)), expected["logits_1"]) < 1e-4


def test_export_refuses_what_it_cannot_export(tmp_path):
    code, _, err = run_cli("export", DATA / "maskrcnn.pth", "-o", tmp_path / "det.onnx")
    assert code == 2 and "detection checkpoint" in err
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 3, 1, 1)}}, tmp_path / "foreign.pth")
    code, _, err = run_cli("export", tmp_path / "foreign.pth", "--format", "torch-export", "-o", tmp_path / "f.pt2")
    assert code == 2 and "not an OverLoCK classification checkpoint" in err and "conv.weight" in err
    code, _, err = run_cli("export", DATA / "classification.pth", "--opset", "13", "-o", tmp_path / "x.onnx")
    assert code == 2 and "17 or newer" in err
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.pt2"))


def test_benchmark_adds_an_onnxruntime_row_beside_pytorch():
    from overlock.cli import build_parser
    from overlock.commands.benchmark import configs
    argv = ["benchmark", "--model", "overlock_t", "resnet18", "--mode", "infer", "train", "--onnxruntime"]
    rows = configs(build_parser(argv).parse_args(argv))
    labels = [r.label for r in rows]
    assert labels.index("overlock_t infer b16 224px nchw deploy onnxruntime") == \
        labels.index("overlock_t infer b16 224px channels_last deploy") + 1
    assert [r.runtime for r in rows].count("onnxruntime") == 1  # OverLoCK inference only


@pytest.mark.slow  # about a minute of CPU: one trace of the tiny UperNet and two verifications
def test_export_segmentation_reproduces_mmseg_logits(tmp_path):
    """The tiny official UperNet (mmseg layout) exported with torch.export gives mmsegmentation's own logits."""
    expected = np.load(DATA / "upernet_expected.npz")
    code, out, err = run_cli("export", DATA / "upernet.pth", "--format", "torch-export", "--img-size", "64",
                             "-o", tmp_path / "upernet.pt2")
    assert code == 0, err
    assert out.count("verified against PyTorch") == 2
    program = torch.export.load(str(tmp_path / "upernet.pt2")).module()
    x = torch.from_numpy(expected["input_1"])  # 2 x 3 x 64 x 64
    with torch.no_grad():
        logits = program(x)
    assert logits.shape == (2, 5, 64, 64)
    assert rel_err(logits, expected["logits_1"]) < 1e-4
