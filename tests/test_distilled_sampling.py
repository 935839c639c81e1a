"""Sampling a guidance-distilled net (issue 26): ONE forward of B rows per step with w per row,
the same loop as the doubled batch otherwise; rules that need both branches are refused."""
import pytest
import torch

import cfgengine
from cfgengine.unet import UNet, preset


class Student(torch.nn.Module):
    """A tiny distilled UNet that records the rows and w of every call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = UNet(preset("tiny", num_classes=3, image_size=8, in_channels=1,
                               guidance_embedding=True)).eval()
        with torch.no_grad():
            for p in self.net.parameters():
                if not p.any():
                    p.normal_(0, 0.1)  # the zero-initialised layers would hide w entirely
        self.num_classes, self.sample_shape = 3, (1, 8, 8)
        self.guidance_embedded, self.clip = True, 1.0
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, z, logsnr, labels, w):
        self.calls.append((z.shape[0], w.clone()))
        return self.net(z, logsnr, labels, w)


LABELS = torch.tensor([0, 2, 1, 1])
W = torch.tensor([0.0, 0.5, 2.0, 4.0])


def test_one_b_row_forward_per_step_with_w_per_row():
    student = Student()
    cfgengine.sample(student, LABELS, w=W, steps=6, seed=1)
    assert [rows for rows, _ in student.calls] == [4] * 6
    assert all(torch.equal(w, W) for _, w in student.calls)


def test_w_reaches_the_net_and_changes_the_sample():
    student = Student()
    a = cfgengine.sample(student, LABELS, w=W, steps=6, seed=1)
    b = cfgengine.sample(student, LABELS, w=W * 0, steps=6, seed=1)
    assert float((a - b).abs().max()) > 1e-4
    assert torch.equal(a[0], b[0])  # row 0 has w = 0 in both calls: rows never mix


def test_outside_the_interval_the_student_gets_w_zero():
    student = Student()
    lam = cfgengine.tables.grid_logsnr(6).tolist()
    rule = cfgengine.CFG(interval=(lam[2], lam[3]))
    cfgengine.sample(student, LABELS, w=W, steps=6, seed=1, guidance=rule)
    guided = [bool(w.any()) for _, w in student.calls]
    assert guided == [False, False, True, True, False, False]


@pytest.mark.parametrize("rule", [cfgengine.ZeroStar(), cfgengine.APG(),
                                  cfgengine.CFG(rescale=0.7)])
def test_rules_that_need_both_branches_are_refused(rule):
    with pytest.raises(ValueError, match="guidance-distilled"):
        cfgengine.sample(Student(), LABELS, w=W, steps=4, guidance=rule)


def test_the_shipped_student_samples_in_one_pass_per_step():
    model = cfgengine.load("default-distilled")
    assert cfgengine.model.info(model).guidance_embedded
    x = cfgengine.sample(model, torch.tensor([0, 3]), w=torch.tensor([1.0, 4.0]), steps=4)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_onnx_runtime_runs_the_student_with_w_as_an_input(tmp_path, monkeypatch):
    """The session backend exports a distilled net with w as a graph input (auto picks it on
    CPU, as for the doubled batch), and samples what eager torch samples."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CFGENGINE_CACHE_DIR", str(tmp_path))
    student = Student()
    engine = cfgengine.Sampler(student, backend="auto")
    assert engine.backend == "onnxruntime"
    engine.model.warm()
    onnx = engine.sample(LABELS, w=W, steps=6, seed=1)
    assert engine.model.runtime == "onnxruntime"
    eager = cfgengine.sample(student, LABELS, w=W, steps=6, seed=1, backend="torch")
    torch.testing.assert_close(onnx, eager, rtol=1e-4, atol=1e-4)
    zero = engine.sample(LABELS, w=W * 0, steps=6, seed=1)
    assert float((onnx - zero)[1:].abs().max()) > 1e-3  # w reached the graph
