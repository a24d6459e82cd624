"""bncheck's Lightning callback in a real ``lightning.Trainer`` on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ConvBNReLU

pytestmark = pytest.mark.slow
L = pytest.importorskip("lightning")


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = ConvBNReLU()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(batch_size: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 16, 16, generator=generator)
    y = torch.randint(0, 4, (16,), generator=generator)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, num_workers=0
    )


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice (num_workers, logging)
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's use of a torch deprecation
@pytest.mark.parametrize(("batch_size", "found"), [(2, {"small-batch"}), (8, set())])
def test_callback_watches_a_real_trainer(batch_size: int, found: set[str]) -> None:
    from bncheck.lightning import lightning_callback

    torch.manual_seed(0)
    callback = lightning_callback(select="small-batch,multiple-updates-per-step")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Module()
    trainer.fit(module, loader(batch_size), loader(batch_size))
    assert callback.report is not None
    assert callback.report.rules_found() == found  # validation batches are not extra updates
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    assert hooks == 0  # the Monitor left the model as it was
