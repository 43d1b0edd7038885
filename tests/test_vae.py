import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from pyro_nf.cli import main
from pyro_nf.vae import (
    FlowVAE,
    NonFiniteLossError,
    TrainConfig,
    load_binarized_mnist,
    log_likelihood,
    train,
)
from pyro_nf.vae import checkpoint as checkpoint_module
from pyro_nf.vae import data as data_module
from pyro_nf.vae.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL = {"latent_dim": 8, "hidden_dims": [64], "flow_hidden_dims": [16]}


@pytest.fixture(scope="module")
def mnist():
    return load_binarized_mnist()


@pytest.fixture
def tiny_npz(tmp_path, mnist):
    """A valid small data file (user-supplied files skip the checksum)."""
    path = tmp_path / "tiny.npz"
    np.savez(path, train=mnist["train"][:300], valid=mnist["valid"][:20], test=mnist["test"][:20])
    return str(path)


def _config(out, data, **kwargs):
    base = dict(
        flow="iaf",
        num_layers=2,
        epochs=2,
        batch_size=50,
        lr=3e-3,
        data=data,
        out=str(out),
        eval_samples=0,
        progress=False,
        **SMALL,
    )
    return TrainConfig(**{**base, **kwargs})


# --- data -----------------------------------------------------------------------------


def test_shipped_data(mnist):
    assert {k: v.shape for k, v in mnist.items()} == {
        "train": (50000, 784),
        "valid": (10000, 784),
        "test": (10000, 784),
    }
    assert mnist["test"].dtype == np.uint8
    assert abs(mnist["train"].mean() - 0.130562) < 1e-6


GOOD = np.zeros((3, 784), np.uint8)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"train": GOOD[:, :700], "valid": GOOD, "test": GOOD}, r"'train' has shape \(3, 700\)"),
        ({"train": GOOD, "valid": GOOD.astype(np.float32), "test": GOOD}, "'valid' has dtype"),
        ({"train": GOOD, "valid": GOOD, "test": GOOD + 2}, r"'test' holds values \[2\]"),
        ({"train": GOOD, "valid": GOOD}, "missing array\\(s\\) 'test'"),
    ],
)
def test_loader_rejects_bad_arrays(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_binarized_mnist(path)
    assert "uint8 array of shape (N, 784) with values 0/1" in str(info.value)


def test_loader_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz.*does not exist"):
        load_binarized_mnist(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
        load_binarized_mnist(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", train=np.array([{}], dtype=object), valid=GOOD, test=GOOD)
    with pytest.raises(ValueError, match="obj.npz: not a readable .npz"):
        load_binarized_mnist(tmp_path / "obj.npz")


def test_loader_checks_shipped_checksum(tmp_path, monkeypatch):
    tampered = tmp_path / "binarized_mnist.npz"
    np.savez(tampered, train=GOOD, valid=GOOD, test=GOOD)
    monkeypatch.setattr(data_module, "SHIPPED_MNIST", tampered)
    with pytest.raises(ValueError, match="checksum mismatch for array 'train'"):
        load_binarized_mnist()
    assert load_binarized_mnist(tampered)["test"].shape == (3, 784)  # valid as user data


# --- model and inference --------------------------------------------------------------


@pytest.mark.parametrize("flow", ["none", "planar", "spline"])
def test_svi_trace_elbo_loss_falls(mnist, flow):
    torch.manual_seed(0)
    pyro.clear_param_store()
    vae = FlowVAE(flow=flow, num_layers=2, **SMALL)
    x = torch.from_numpy(mnist["train"][:100]).float()
    svi = pyro.infer.SVI(
        vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), pyro.infer.Trace_ELBO()
    )
    losses = [svi.step(x) / len(x) for _ in range(30)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 50


def test_same_seed_same_networks_whatever_the_flow():
    nets = []
    for flow in ["none", "iaf"]:
        torch.manual_seed(0)
        vae = FlowVAE(flow=flow, num_layers=2, **SMALL)
        nets.append(
            [
                *vae.decoder.parameters(),
                *vae.encoder.hidden.parameters(),
                *vae.encoder.gaussian.parameters(),
            ]
        )
    for a, b in zip(*nets, strict=True):
        assert torch.equal(a, b)


def _exact_log_px(vae: FlowVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) for a 1-d latent by quadrature on a fine grid."""
    z = torch.linspace(-12, 12, 48001, dtype=torch.float64).unsqueeze(-1)
    log_joint = vae.prior(z).log_prob(z).unsqueeze(-1) + torch.stack(
        [vae.likelihood(z).log_prob(xi) for xi in x], dim=-1
    )
    return torch.logsumexp(log_joint, dim=0) + math.log(24 / 48000)


def test_importance_sampling_matches_exact_likelihood():
    torch.manual_seed(0)
    vae = FlowVAE(
        data_dim=4, latent_dim=1, hidden_dims=[8], flow="planar", num_layers=2, flow_hidden_dims=[8]
    ).double()
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(0.5 * torch.randn_like(p))
        for p in vae.encoder.flow.parameters():  # planar layers away from the identity
            p.add_(0.1 * torch.randn_like(p))
        # A broad base Gaussian N(0, 1.5²) (then the planar layers) as proposal.
        vae.encoder.gaussian.weight.zero_()
        vae.encoder.gaussian.bias.copy_(torch.tensor([0.0, math.log(math.expm1(1.5))]))
    patterns = torch.tensor([[int(b) for b in f"{i:04b}"] for i in range(16)], dtype=torch.float64)
    exact = _exact_log_px(vae, patterns)
    assert torch.logsumexp(exact, 0).abs() < 1e-6  # the 16 probabilities sum to one
    log_px, elbo = log_likelihood(vae, patterns, num_samples=20000, chunk_size=3000)
    assert (log_px >= elbo).all()
    assert (elbo < exact - 1e-3).all()  # an untrained posterior: a strictly loose ELBO
    assert torch.allclose(log_px, exact, atol=0.03)


def test_forward_is_trace_elbo_and_weights_the_kl_term():
    torch.manual_seed(0)
    vae = FlowVAE(flow="planar", num_layers=2, **SMALL)
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    losses = {}
    for beta in (0.0, 0.5, 1.0):
        torch.manual_seed(1)
        losses[beta] = vae(x, beta=beta)
    torch.manual_seed(1)
    traced = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert torch.allclose(losses[1.0], traced, rtol=1e-5)
    assert torch.allclose(losses[0.5], (losses[0.0] + losses[1.0]) / 2, rtol=1e-5)
    assert not torch.allclose(losses[0.0], losses[1.0])


def test_iwae_bound_is_the_log_mean_weight_and_above_the_elbo():
    torch.manual_seed(0)
    vae = FlowVAE(flow="iaf", num_layers=2, **SMALL)
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    torch.manual_seed(1)
    log_w = sum(vae.log_weight_terms(x, num_samples=5))
    torch.manual_seed(1)
    iwae = -vae(x, num_samples=5)
    assert torch.allclose(iwae, (torch.logsumexp(log_w, 0) - math.log(5)).sum(), rtol=1e-6)
    assert iwae > log_w.mean(0).sum() + 1.0  # an untrained posterior: a loose ELBO


def test_recipe_schedules():
    config = TrainConfig(warmup=100, warmup_start=0.1, lr_decay=0.5)
    assert [config.beta(u) for u in (0, 50, 100, 10**6)] == pytest.approx([0.1, 0.55, 1, 1])
    assert TrainConfig(warmup=0).beta(0) == 1.0
    assert [config.lr_factor(e) for e in (0, 1, 3)] == [1.0, 0.5, 0.125]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eval_samples", -5, "--eval-samples .* .*>= 0.*got -5"),
        ("flow_lr_scale", -0.1, "--flow-lr-scale .*> 0"),
        ("lr", float("nan"), "--lr .*> 0"),
        ("lr_decay", 1.5, "--lr-decay .*> 0.*<= 1"),
        ("warmup", -1, "--warmup .* .*>= 0"),
        ("iwae", 0, "--iwae .* .*>= 1"),
        ("batch_size", 0, "--batch-size .*>= 1"),
        ("train_subset", 0, "--train-subset .*>= 1"),
        ("seed", -1, "--seed .*>= 0"),
        ("hidden_dims", [300, 0], "--hidden .*ints >= 1"),
        ("force_resume", True, "--force-resume only applies with --resume"),
    ],
)
def test_config_rejects_values_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


# --- checkpoints, training loop -------------------------------------------------------


def test_failed_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    state = load_checkpoint(path, keys=("epoch", "w"))
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.slow
def test_resume_continues_like_an_uninterrupted_run(tmp_path, tiny_npz):
    # warm-up, lr decay and the IWAE bound all depend on where the run stands
    recipe = {"warmup": 8, "lr_decay": 0.5, "iwae": 2}
    full = train(_config(tmp_path / "full", tiny_npz, **recipe))
    train(_config(tmp_path / "split", tiny_npz, epochs=1, **recipe))
    state = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["updates"] == 6
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([3e-3, 3e-4])
    resumed = train(_config(tmp_path / "split", tiny_npz, resume=True, **recipe))
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2]
    assert [h["lr"] for h in resumed.metrics["history"]] == pytest.approx([3e-3, 1.5e-3])
    betas = [h["beta"] for h in resumed.metrics["history"]]
    assert betas == pytest.approx([0.01 + 0.99 * 5 / 8, 1.0])
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["epoch"] == 2
    for a, b in zip(full.vae.state_dict().values(), resumed.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="trained with --flow 'iaf' \\(now 'planar'\\)"):
        train(_config(tmp_path / "split", tiny_npz, resume=True, flow="planar", **recipe))
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(_config(tmp_path / "split", tiny_npz))


def test_nan_loss_stops_with_last_good_parameters(tmp_path, tiny_npz, monkeypatch):
    calls, seen = [], {}
    original = FlowVAE.forward

    def forward(self, x, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # epoch 2 (6 steps per epoch), step 3
            seen["vae"] = self
            seen["params"] = [p.detach().clone() for p in self.parameters()]
            return original(self, x, **kwargs) * float("nan")
        return original(self, x, **kwargs)

    monkeypatch.setattr(FlowVAE, "forward", forward)
    message = "epoch 2, step 3.*checkpoint.pt still holds epoch 1"
    with pytest.raises(NonFiniteLossError, match=message):
        train(_config(tmp_path, tiny_npz, epochs=3))
    for before, after in zip(seen["params"], seen["vae"].parameters(), strict=True):
        assert torch.equal(before, after)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


# --- command line ----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_then_eval(tmp_path, tiny_npz, capsys):
    out = str(tmp_path / "run")
    args = ["--data", tiny_npz, "--out", out, "--eval-samples", "20", "--no-progress"]
    assert (
        main(
            [
                "vae",
                "train",
                "--flow",
                "planar",
                "--layers",
                "2",
                "--latent",
                "8",
                "--hidden",
                "64",
                "--flow-hidden",
                "16",
                "--epochs",
                "2",
                "--train-subset",
                "200",
                "--eval-subset",
                "10",
                *args,
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["test"]["num_images"] == 10
    assert metrics["history"][1]["images_per_s"] > 0
    for name in ["checkpoint.pt", "samples.png", "reconstructions.png"]:
        assert (tmp_path / "run" / name).stat().st_size > 0
    capsys.readouterr()
    assert main(["vae", "eval", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 20 and result["epoch"] == 2
    assert result["nll"] <= result["neg_elbo"]
    assert json.loads((tmp_path / "run" / "eval_test.json").read_text())["nll"] == result["nll"]


def test_cli_reports_user_errors(tmp_path, capsys):
    assert main(["vae", "eval", "--out", str(tmp_path)]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["vae", "train", "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path)]) == 1
    assert "x.npz' does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["vae", "train", "--device", "cuda", "--out", str(tmp_path)]) == 1
        assert "no CUDA device is available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["vae", "train", "--flow", "maf"])


# --- multi-process ---------------------------------------------------------------------

WORKER = """
import os, sys, torch
torch.set_num_threads(1)
from pyro_nf.vae import TrainConfig, train
cfg = TrainConfig(flow="planar", num_layers=2, epochs=3, batch_size=10, lr=1e-2,
                  data=sys.argv[1], out=sys.argv[2], eval_samples=0, progress=False,
                  latent_dim=8, hidden_dims=[64], flow_hidden_dims=[16])
result = train(cfg)
torch.save({"state": result.vae.state_dict(), "history": result.metrics["history"]},
           os.path.join(sys.argv[3], f"rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
def test_two_process_data_parallel_training(tmp_path, tiny_npz):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        tiny_npz,
        str(tmp_path / "run"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for a, b in zip(ranks[0]["state"].values(), ranks[1]["state"].values(), strict=True):
        assert torch.equal(a, b)
    elbos = [h["train_bound"] for h in ranks[0]["history"]]
    assert elbos[-1] > elbos[0] + 5
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["checkpoint.pt", "metrics.json", "reconstructions.png", "samples.png"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


def test_pictures_skipped_with_warning_without_matplotlib(tmp_path, monkeypatch):
    from pyro_nf.vae.plots import save_image_grid

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.warns(UserWarning, match="matplotlib is not installed.*pyro-nf\\[plot\\]"):
        assert save_image_grid(torch.rand(4, 784), tmp_path / "g.png", "t") is False
    assert not (tmp_path / "g.png").exists()


# --- benchmark ---------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_quick_run_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    argv = ["bench", "vae", "--quick", "--flows", "none", "planar", "iaf"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "vae.json").read_text())
    rows = {row["posterior"]: row for row in results["rows"]}
    assert results["epochs_done"] == 1 and results["test_images"] == 20
    assert rows["planar"]["layers"] == 10 and rows["iaf"]["layers"] == 4
    for name in ("planar", "iaf"):  # the paired difference of means is the mean difference
        diff = rows[name]["nll"] - rows["none"]["nll"]
        assert rows[name]["nll_diff"] == pytest.approx(diff, abs=1e-9)
        assert 0 < rows[name]["nll_diff_se"] < rows[name]["nll_se"]
        assert rows[name]["speed_ratio"] > 0
    assert rows["none"]["nll"] <= rows["none"]["neg_elbo"]
    assert "speed planar >= 0.8x diagonal" in results["bars"]
    assert "| planar | 10 |" in capsys.readouterr().out


def test_benchmark_needs_a_source_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "vae", "--quick"]) == 1
    assert "runs from a source checkout of pyro-nf" in capsys.readouterr().err
