"""Training (paper Algorithm 1): the net learns the exact ε of a known mixture, labels are dropped at
rate p_uncond, and a resumed run is bit-identical to an uninterrupted one."""
import math

import pytest
import torch
from scipy import stats

from cfgengine import checkpoint
from cfgengine.cli import main
from cfgengine.data import load_dataset
from cfgengine.schedule import alpha_sigma
from cfgengine.train import (TrainConfig, diffusion_loss, new_state, resume, train, train_step)

TINY = dict(data="gmm", preset="tiny", batch_size=16, ckpt_every=1000, sample_every=1000)


def _noisy_batch(mixture, n_per_class: int, logsnr_range: tuple[float, float]):
    """(z, λ, labels, exact conditional ε) with z = α·x + σ·ε, x from the mixture itself."""
    gen = torch.Generator().manual_seed(123)
    labels = torch.arange(mixture.num_classes).repeat_interleave(n_per_class)
    x = mixture.sample_data(labels, gen)
    logsnr = torch.empty(len(labels)).uniform_(*logsnr_range, generator=gen)
    alpha, sigma = (t[:, None, None, None] for t in alpha_sigma(logsnr))
    z = alpha * x + sigma * torch.randn(x.shape, generator=gen)
    return z, logsnr, labels, mixture(z, logsnr, labels)


@torch.no_grad()
def _mse(net, z, logsnr, labels, exact) -> float:
    return float((net(z, logsnr, labels) - exact).pow(2).mean())


def test_network_eps_approaches_exact_eps(tmp_path):
    """100 steps on `gmm` images (tiny preset): MSE to the exact conditional ε at λ ∈ [−2, 2] falls
    from ≈0.97 (untrained: ε_θ = 0) to ≈0.025 (measured, seed 0). We require < 5% of untrained."""
    config = TrainConfig(**{**TINY, "batch_size": 64}, lr=3e-3, warmup=20, out=str(tmp_path))
    dataset = load_dataset("gmm")
    state = new_state(config, dataset, torch.device("cpu"))
    batch = _noisy_batch(dataset.mixture, 128, (-2.0, 2.0))
    untrained = _mse(state.model, *batch)
    for _ in range(100):
        train_step(state, dataset, config, torch.device("cpu"))
    trained = _mse(state.model, *batch)
    assert trained < 0.05 * untrained, (trained, untrained)


class _LabelRecorder(torch.nn.Module):
    """Stands in for the net: records the labels it is called with, predicts ε = 0."""

    num_classes = 5

    def __init__(self):
        super().__init__()
        self.seen = []
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, logsnr, labels):
        self.seen.append(labels)
        return self.scale * z


@pytest.mark.parametrize("p_uncond", [0.1, 0.5])
def test_null_label_rate_matches_p_uncond(p_uncond):
    """Over n labels the count of null labels K is Binomial(n, p_uncond): it lies inside the
    central 1 − 1e-6 interval (two rates tested: Bonferroni-safe), and kept labels are unchanged."""
    net, gen = _LabelRecorder(), torch.Generator().manual_seed(7)
    labels = torch.arange(net.num_classes).repeat(400)  # n = 2000 per batch
    x = torch.zeros(len(labels), 1, 2, 2)
    for _ in range(10):
        diffusion_loss(net, x, labels, p_uncond, gen)
    seen = torch.cat(net.seen)
    n, nulls = seen.numel(), int((seen == net.num_classes).sum())
    low, high = stats.binom.ppf([0.5e-6, 1 - 0.5e-6], n, p_uncond)
    assert low <= nulls <= high, (nulls, n * p_uncond)
    kept = seen != net.num_classes
    assert torch.equal(seen[kept], labels.repeat(10)[kept])


def test_loss_is_the_eps_mse():
    """With ε_θ = 0 the loss is mean ε², i.e. ≈ 1 for unit Gaussian noise."""
    loss = diffusion_loss(_LabelRecorder(), torch.zeros(4000, 1, 2, 2), torch.zeros(4000).long(),
                          0.1, torch.Generator().manual_seed(0))
    assert abs(float(loss.detach()) - 1.0) < 6 * math.sqrt(2 / 16000)


def _state_tensors(ckpt):
    """Every tensor and number in a checkpoint, flattened, except the (differing) config."""
    contents = checkpoint.read_checkpoint(ckpt)
    contents.pop("config")
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = value
    walk("", contents)
    return flat


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key


def test_resume_is_bit_identical(tmp_path):
    straight = train(TrainConfig(**TINY, steps=6, out=str(tmp_path / "straight")))
    train(TrainConfig(**TINY, steps=3, out=str(tmp_path / "split")))
    resumed = resume(tmp_path / "split" / "ckpt.pt", steps=6)
    assert straight.step == resumed.step == 6
    _assert_identical(_state_tensors(tmp_path / "straight" / "ckpt.pt"),
                      _state_tensors(tmp_path / "split" / "ckpt.pt"))


def test_ctrl_c_checkpoints_the_current_step(tmp_path, monkeypatch):
    """An interrupt writes a checkpoint at the step reached; resuming it matches a straight run."""
    from cfgengine import train as train_module

    original = train_module.train_step

    def interrupt_at_4(state, *args):
        if state.step == 4:
            raise KeyboardInterrupt
        return original(state, *args)

    monkeypatch.setattr(train_module, "train_step", interrupt_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**TINY, steps=6, out=str(tmp_path / "split")))
    monkeypatch.setattr(train_module, "train_step", original)
    assert checkpoint.read_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 4
    resume(tmp_path / "split" / "ckpt.pt")
    train(TrainConfig(**TINY, steps=6, out=str(tmp_path / "straight")))
    _assert_identical(_state_tensors(tmp_path / "straight" / "ckpt.pt"),
                      _state_tensors(tmp_path / "split" / "ckpt.pt"))


def test_seed_changes_the_run(tmp_path):
    a = train(TrainConfig(**TINY, steps=2, seed=1, out=str(tmp_path / "a")))
    b = train(TrainConfig(**TINY, steps=2, seed=2, out=str(tmp_path / "b")))
    assert not torch.equal(a.model.conv_in.weight, b.model.conv_in.weight)


def test_cli_train_and_user_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--preset", "tiny", "--steps", "2", "--batch-size", "8",
                 "--out", str(out)]) == 0
    assert (out / "ckpt.pt").is_file() and (out / "model.safetensors").is_file()
    capsys.readouterr()
    for argv in (["train", "--p-uncond", "1.5"], ["train", "--resume", str(tmp_path / "no.pt")],
                 ["train", "--resume", str(out / "ckpt.pt"), "--lr", "0.1"],
                 ["train", "--preset", "huge", "--out", str(tmp_path / "x")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("cfgengine: error:") and err.count("\n") == 1, err
