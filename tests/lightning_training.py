"""A tiny real Lightning training on the CPU, published with trainbus; run by tests/test_lightning.py.

    python tests/lightning_training.py single|ddp WORKDIR

``ddp``: ``strategy="ddp", devices=2`` on the CPU (Lightning starts the second process by running
this script again). TRAINBUS_* from the environment (TRAINBUS_RUN_ID names the run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producers.lightning import TrainbusLogger

EPOCHS = 2


class TinyRegressor(L.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)
        self.log("val/mae", torch.nn.functional.l1_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def fit(bus: TrainbusLogger, workdir: Path, epochs: int = EPOCHS, devices: int = 1) -> None:
    """The tiny training with ``bus`` as its logger and callback (the benchmark times it too)."""
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=bus,
        callbacks=[bus, L.pytorch.callbacks.ModelCheckpoint(dirpath=workdir / "checkpoints", monitor="val_loss")],
        default_root_dir=workdir,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyRegressor(), data(64, 0), data(32, 1))


def main() -> None:
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    fit(TrainbusLogger(name="tiny-regressor", project="lightning-test"), workdir, devices=2 if mode == "ddp" else 1)


if __name__ == "__main__":
    main()
