"""The Lightning callback, with the real ``lightning.pytorch.Trainer`` on a tiny model and random data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from optional import need
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normtrace as nt

L = need("lightning")
from normtrace.integrations.lightning import NormtraceCallback  # noqa: E402

pl = need("polars")

BATCHES = 4  # training batches per epoch: 32 samples, batch 8
VAL_BATCHES = 2  # 32 samples, batch 16
EPOCHS = 2


class Regressor(L.LightningModule):
    """Two linear layers around a ReLU; logs the loss per step and per epoch, and a validation loss."""

    def __init__(self, fail_at: int | None = None, *, call_net: bool = False) -> None:
        super().__init__()
        self.call_net = call_net  # training_step calls self.net(x), as many LightningModules do
        self.save_hyperparameters({"hidden": 8, "lr": 0.1, "loss": nn.MSELoss()})  # a module is not JSON
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.losses: list[float] = []
        self.inputs: list[torch.Tensor] = []
        self.epoch_means: list[float] = []
        self.val_losses: list[float] = []
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and len(self.losses) == self.fail_at:
            raise RuntimeError("planted failure")
        x, y = batch
        out = self.net(x) if self.call_net else self(x)
        self.inputs.append(x)
        loss = nn.functional.mse_loss(out, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.losses.append(loss.item())
        return loss

    def on_train_epoch_end(self) -> None:
        self.epoch_means.append(float(self.trainer.logged_metrics["train_loss_epoch"]))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_losses.append(float(self.trainer.callback_metrics["val_loss"]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        }


def _fit(tmp_path: Path, model: Regressor, callback: NormtraceCallback) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=16))


def _table(run: Path, table: str) -> pl.DataFrame:
    return pl.read_ipc(sorted((run / table).glob("*.arrow")))


def test_one_line_records_losses_logged_metrics_epochs_params_and_events(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = Regressor()
    _fit(tmp_path, model, NormtraceCallback(run, [nt.OutputNorm(), nt.ParameterNorm()]))

    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "closed"
    assert meta["epochs"] == EPOCHS
    # the sanity check's 2 validation batches, then per epoch 4 training and 2 validation batches
    assert meta["passes"] == VAL_BATCHES + EPOCHS * (BATCHES + VAL_BATCHES)
    assert meta["config"] == {"hidden": 8, "lr": 0.1}  # the hparams, less what is not JSON

    metrics = _table(run, "metrics")
    loss = metrics.filter(pl.col("name") == "loss")
    assert loss["split"].to_list() == ["train"] * (EPOCHS * BATCHES)
    assert loss["value"].to_list() == pytest.approx(model.losses, rel=1e-6)
    assert loss["epoch"].to_list() == [0] * BATCHES + [1] * BATCHES

    step = metrics.filter(pl.col("name") == "train_loss_step")
    assert step["value"].to_list() == pytest.approx(model.losses, rel=1e-6)
    epoch = metrics.filter(pl.col("name") == "train_loss_epoch")
    assert epoch["epoch"].to_list() == [0, 1]
    assert epoch["value"].to_list() == pytest.approx(model.epoch_means, rel=1e-6)
    val = metrics.filter(pl.col("name") == "val_loss")
    assert val["split"].to_list() == ["val", "val"]  # the sanity check's value is not recorded
    assert val["epoch"].to_list() == [0, 1]
    assert val["value"].to_list() == pytest.approx(model.val_losses, rel=1e-6)
    lr = metrics.filter(pl.col("name") == "lr")
    assert lr["value"].to_list() == pytest.approx([0.1, 0.05])
    assert lr["epoch"].to_list() == [0, 1]

    events = _table(run, "events").select("epoch", "name").rows()
    # per epoch: the validation run, then ModelCheckpoint's save; StepLR's drop opens epoch 1
    assert events == [
        (0, "validation"),
        (0, "checkpoint"),
        (1, "lr_step"),
        (1, "validation"),
        (1, "checkpoint"),
    ]

    params = _table(run, "params")
    assert params.group_by("epoch").len().sort("epoch").rows() == [(0, 4), (1, 4)]  # 2 weights, 2 biases
    final = params.filter(pl.col("epoch") == 1, pl.col("module") == "net.0", pl.col("param") == "weight")
    assert final["norm"][0] == pytest.approx(model.net[0].weight.detach().norm().item(), rel=1e-6)

    outputs = _table(run, "outputs")
    assert outputs["module"].unique().to_list() == ["net.1"]
    assert outputs.height == EPOCHS * BATCHES  # validation passes run under no_grad: skipped


def test_an_exception_in_training_closes_the_run_as_failed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    callback = NormtraceCallback(run)
    with pytest.raises(RuntimeError, match="planted failure"):
        _fit(tmp_path, Regressor(fail_at=5), callback)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "failed"
    assert callback.recorder is None
    assert _table(run, "metrics").filter(pl.col("name") == "loss").height == 5


def test_module_attaches_a_submodule_and_a_wrong_path_is_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fit(tmp_path, Regressor(), NormtraceCallback(run, [nt.OutputNorm()], module="net"))
    assert _table(run, "outputs")["module"].unique().to_list() == ["1"]  # names inside self.net
    with pytest.raises(ValueError, match=r"module='nope'.*no submodule"):
        _fit(tmp_path / "second", Regressor(), NormtraceCallback(tmp_path / "other", module="nope"))


def test_a_training_step_calling_self_net_counts_its_passes(tmp_path: Path) -> None:
    """Issue 15: with ``self.net(x)`` in training_step the root's forward never ran in training, and the
    recorder wrote 40 series ``net.0#1 … net.4#7`` with passes 1, 5, 9. Now each call of ``self.net`` is a
    pass (with one warning saying so), and validation's ``self(x)`` calls are passes as before."""
    run = tmp_path / "run"
    model = Regressor(call_net=True)
    initial = copy.deepcopy(model.net)  # the weights of the first step
    with pytest.warns(UserWarning, match=r"'net\.1' ran outside Regressor\.forward"):
        _fit(tmp_path, model, NormtraceCallback(run, [nt.OutputNorm()], lr_events=False))
    outputs = _table(run, "outputs").sort("pass")
    meta = json.loads((run / "meta.json").read_text())
    assert meta["passes"] == VAL_BATCHES + EPOCHS * (BATCHES + VAL_BATCHES)
    assert outputs["module"].to_list() == ["net.1"] * (EPOCHS * BATCHES)  # one per training step
    # the training passes are numbered between the validation passes: 2 sanity, 4 train, 2 val, 4 train
    assert outputs["pass"].to_list() == [2, 3, 4, 5, 8, 9, 10, 11]
    # the first step's ReLU output, recomputed from its input and the weights before any update
    first = torch.relu(initial[0](model.inputs[0]))
    assert outputs["norm"][0] == pytest.approx(first.norm(dim=1).mean().item(), rel=1e-5)
    loss = _table(run, "metrics").filter(pl.col("name") == "loss")
    assert loss["pass"].to_list() == outputs["pass"].to_list()  # each step's loss carries its pass
