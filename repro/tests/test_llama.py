"""The llama experiment: the finetune corpus (real packaged KJV), Alpaca encoding, MMLU scoring, and
both code paths at a tiny size: the packaged default and a local checkpoint + Alpaca JSON + MMLU."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from adoptim_repro import mmlu, text_data
from adoptim_repro.lm_train import IGNORE

transformers = pytest.importorskip("transformers")

from adoptim_repro.llama import ByteTokenizer, collate, encode_record  # noqa: E402


def test_bible_records_and_book_split():
    recs = text_data.bible_records()
    assert len(recs) == 31103  # one record per verse; this text counts 3 John 1:15 apart from 1:14
    assert recs[0]["output"] == "In the beginning God created the heaven and the earth."
    assert recs[0]["instruction"] == "Recite Genesis 1:1 (King James Version)."
    train, val = text_data.split_records(recs, val_every=10)
    assert len(train) + len(val) == len(recs)
    train_books, val_books = {r["book"] for r in train}, {r["book"] for r in val}
    assert train_books.isdisjoint(val_books) and len(train_books) + len(val_books) == 66
    assert len(val_books) == 6


def test_encode_record_masks_the_prompt():
    tok = ByteTokenizer()
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    ids, labels = encode_record(rec, tok, max_len=512)
    prompt = "### Instruction:\nSay hi.\n\n### Response:\n"
    assert ids == [tok.bos] + list(prompt.encode()) + [ord("h"), ord("i"), tok.eos]
    assert labels == [IGNORE] * (1 + len(prompt)) + [ord("h"), ord("i"), tok.eos]
    x, y = collate([(ids, labels), ([tok.bos, 65, tok.eos], [IGNORE, 65, tok.eos])], tok.pad)
    assert x.shape == y.shape == (2, len(ids) - 1)
    # targets are the labels shifted by one; padding carries no loss
    assert y[0].tolist() == labels[1:] and y[1].tolist()[:2] == [65, tok.eos]
    assert (y[1, 2:] == IGNORE).all() and (x[1, 3:] == tok.pad).all()


def test_alpaca_json_checks_and_input_prompt(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps([{"instruction": "Add.", "input": "2 and 3", "output": "5"}]))
    rec = text_data.load_alpaca_json(good)[0]
    assert text_data.alpaca_prompt(rec) == "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="record 0 lacks"):
        text_data.load_alpaca_json(bad)


def _write_mmlu(root, answers_by_subject):
    (root / "test").mkdir(parents=True)
    (root / "dev").mkdir()
    for subject, answers in answers_by_subject.items():
        rows = [f'"Q{i}?",a,b,c,d,{a}' for i, a in enumerate(answers)]
        (root / "test" / f"{subject}_test.csv").write_text("\n".join(rows) + "\n")
        (root / "dev" / f"{subject}_dev.csv").write_text('"Example?",w,x,y,z,B\n')


class _AlwaysLetter(torch.nn.Module):
    """A stand-in model whose next-token logits always favour one letter (byte ids)."""

    def __init__(self, letter: str) -> None:
        super().__init__()
        self.letter = ord(letter)

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, 259)
        logits[..., self.letter] = 1.0
        return SimpleNamespace(logits=logits)


def test_mmlu_accuracy_of_a_constant_answerer(tmp_path, capsys):
    _write_mmlu(tmp_path, {"anatomy": ["A", "B", "A", "D"], "virology": ["C", "C", "A"]})
    enc = ByteTokenizer().encode
    got = mmlu.evaluate(_AlwaysLetter("A"), enc, tmp_path, shots=1)
    # always "A": right on 2 of 4 and 1 of 3 questions
    assert got["accuracy"] == pytest.approx(3 / 7) and got["questions"] == 7
    assert got["macro"] == pytest.approx((2 / 4 + 1 / 3) / 2)
    assert mmlu.evaluate(_AlwaysLetter("C"), enc, tmp_path, shots=0, limit=2)["accuracy"] == pytest.approx(2 / 4)
    capsys.readouterr()
    assert mmlu.evaluate(_AlwaysLetter("A"), enc, tmp_path, shots=1, progress=True) == got
    assert "mmlu subjects" in capsys.readouterr().err  # a long phase at full size shows its progress
    prompt = mmlu.subject_prompt("anatomy", mmlu.read_subject(tmp_path / "dev" / "anatomy_dev.csv"))
    assert prompt.endswith("Example?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n")


@pytest.mark.slow
def test_quick_run_pretrains_then_finetunes(tmp_path):
    from adoptim_repro.cli import main

    out = tmp_path / "llama"
    sets = ["--set", "steps=12", "--set", "pretrain_steps=12", "--set", "eval_every=6"]
    assert main(["llama", "--quick", "--out", str(out), *sets]) == 0
    rows = json.loads((out / "summary.json").read_text())["final"]
    assert [(r["stage"], r["optimizer"]) for r in rows] == [
        ("pretrain", "adamw"), ("finetune", "adamw"), ("finetune", "adopt")]
    for r in rows[1:]:
        # finetuning starts from the pretrained model, so it beats a uniform guess over the 259 tokens
        assert r["heldout_loss"] < math.log(259) - 0.5
    assert (out / "pretrained" / "s0.pt").is_file() and (out / "llama_loss.png").is_file()


@pytest.mark.parametrize("what,make,message", [
    ("data", lambda d: (d / "README.md").write_text("# not JSON\n"), "config key 'data': {} is not a JSON file"),
    ("data", lambda d: (d / "a.json").write_text('[{"instruction": "x"}]'), "record 0 lacks 'instruction' or 'output'"),
    ("mmlu", lambda d: (d / "mmlu").mkdir(), "has no test/*_test.csv"),
    ("model", lambda d: (d / "ckpt").mkdir(), "holds no config.json"),
])
def test_bad_inputs_are_refused_before_the_pretraining_runs(tmp_path, capsys, what, make, message):
    from adoptim_repro.cli import main

    made = tmp_path / "in"
    made.mkdir()
    make(made)
    (path,) = made.iterdir()
    out = tmp_path / "out"
    assert main(["llama", "--quick", "--set", f"{what}={path}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message.format(path) in err, err
    assert not out.exists()  # nothing pretrained, saved or locked: the corrected command may use this --out


@pytest.mark.slow
def test_full_scale_path_with_a_local_checkpoint(tmp_path):
    """``model=DIR data=alpaca.json mmlu=DIR``: a tiny checkpoint with a real BPE tokenizer saved locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from adoptim_repro.cli import main

    corpus = [r["output"] for r in text_data.bible_records()[:2000]]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")
    ckpt = tmp_path / "ckpt"
    tok.save_pretrained(ckpt)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(ckpt)
    data = tmp_path / "alpaca.json"
    recs = [{"instruction": f"Recite verse {i}.", "input": "", "output": r} for i, r in enumerate(corpus[:200])]
    data.write_text(json.dumps(recs))
    _write_mmlu(tmp_path / "mmlu", {"astronomy": ["A", "B", "C", "D"]})
    out = tmp_path / "out"
    sets = [f"model={ckpt}", f"data={data}", f"mmlu={tmp_path / 'mmlu'}", "steps=6", "eval_every=3",
            "batch=4", "eval_records=8", "mmlu_shots=1"]
    assert main(["llama", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    rows = json.loads((out / "summary.json").read_text())["final"]
    assert [(r["stage"], r["optimizer"]) for r in rows] == [("finetune", "adamw"), ("finetune", "adopt")]
    for r in rows:
        assert 0.0 <= r["mmlu_accuracy"] <= 1.0 and math.isfinite(r["heldout_loss"])
        assert "shakespeare_val_loss" not in r  # no pretraining stage with a checkpoint
