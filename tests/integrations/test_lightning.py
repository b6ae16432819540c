"""PyTorch Lightning: ``configure_optimizers`` returns ADOPT with a per-step scheduler; it trains and resumes.

The expectation is a plain loop with the same optimizer, scheduler and batches (float64, no shuffling):
Lightning runs the same arithmetic, so the parameters must be equal, not merely close. A run resumed
from the checkpoint Lightning wrote at step 3 must end exactly where the uninterrupted run ended.
"""

from __future__ import annotations

import pytest
import torch

from adoptim import ADOPT

L = pytest.importorskip("lightning")

STEPS, BATCH, SAMPLES = 6, 4, 12  # 3 batches an epoch
HYPER = dict(lr=2e-2, betas=(0.9, 0.99), weight_decay=0.01, decoupled_weight_decay=True)


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def data() -> torch.utils.data.TensorDataset:
    """Every batch is the same 4 samples: a resumed Lightning run restarts its (plain) dataloader at an
    epoch's first batch, which must not matter here, where the optimizer and scheduler are tested."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 5, generator=g, dtype=torch.float64).repeat(SAMPLES // BATCH, 1)
    return torch.utils.data.TensorDataset(x, torch.sin(x[:, :2]))


def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = ADOPT(self.parameters(), **HYPER)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt), "interval": "step"}}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=False)


def fit(tmp_path, steps: int, ckpt_path: str | None = None, callbacks: list | None = None) -> tuple:
    module = Regressor()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=callbacks,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


@pytest.fixture(scope="module")
def plain_loop() -> tuple[list[torch.Tensor], float]:
    net = make_net()
    opt = ADOPT(net.parameters(), **HYPER)
    sched = make_scheduler(opt)
    loader = torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=False)
    batches = [b for _ in range(STEPS // len(loader) + 1) for b in loader][:STEPS]
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in net.parameters()], opt.param_groups[0]["lr"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on dataloader workers
def test_lightning_trains_with_adopt_and_scheduler_as_a_plain_loop(tmp_path, plain_loop):
    params, lr = plain_loop
    module, trainer = fit(tmp_path, STEPS)
    opt = trainer.optimizers[0]
    assert type(opt) is ADOPT
    assert opt.param_groups[0]["lr"] == lr == HYPER["lr"] * 0.5 ** (STEPS // 2)
    assert all(float(s["step"]) == STEPS for s in opt.state.values())
    for p, e in zip(module.parameters(), params):
        assert torch.equal(p.detach(), e)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_checkpoint_resumes_exactly(tmp_path, plain_loop):
    # Saved by Lightning's own callback at the end of the first epoch (step 3) of an uninterrupted run.
    every_epoch = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1)
    fit(tmp_path / "a", STEPS, callbacks=[every_epoch])
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]
    assert {k for st in saved["state"].values() for k in st} == {"step", "exp_avg", "exp_avg_sq"}
    assert {float(st["step"]) for st in saved["state"].values()} == {STEPS // 2}
    assert saved["param_groups"][0]["clip_exponent"] == 0.25

    resumed, trainer = fit(tmp_path / "b", STEPS, ckpt_path=str(path))
    assert trainer.global_step == STEPS
    for p, e in zip(resumed.parameters(), plain_loop[0]):
        assert torch.equal(p.detach(), e)
    assert trainer.optimizers[0].param_groups[0]["lr"] == plain_loop[1]
