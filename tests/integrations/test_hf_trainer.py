"""Hugging Face ``Trainer`` trains a LLaMA built from a config with ADOPT, exactly as a hand-written loop does;
``adoptim.integrations.hf`` builds ADOPT from ``TrainingArguments`` (``learning_rate``, ``optim_args``).

The Trainer run (through ``optimizers=`` and through ``optimizer_cls_and_kwargs``) is compared with a
plain loop over the same batches. Every sample is the same sequence, so the Trainer's shuffling cannot
change a batch; gradient clipping is off and the schedule is constant, so nothing but ADOPT moves the
weights. The model is float64: the two runs differ only in how the loss is averaged (the Trainer counts
label tokens itself), a rounding difference of ~1e-16 that stays below 1e-10 over the steps.
"""

from __future__ import annotations

import pytest
import torch

from adoptim import ADOPT

transformers = pytest.importorskip("transformers")

STEPS, BATCH, SEQ, VOCAB = 8, 4, 16, 48
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)


def make_model() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.float64)


def dataset() -> list[dict[str, torch.Tensor]]:
    ids = torch.arange(SEQ) * 7 % VOCAB  # a pattern the model can learn
    return [{"input_ids": ids.clone(), "labels": ids.clone()} for _ in range(STEPS * BATCH)]


def args(tmp_path, **extra) -> transformers.TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=HYPER["lr"],
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    return transformers.TrainingArguments(**{**kwargs, **extra})


def manual_run() -> tuple[list[torch.Tensor], list[float]]:
    model = make_model()
    opt = ADOPT(model.parameters(), **HYPER)
    data = dataset()
    losses = []
    for t in range(STEPS):
        batch = torch.stack([data[t * BATCH + i]["input_ids"] for i in range(BATCH)])
        opt.zero_grad()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [p.detach() for p in model.parameters()], losses


@pytest.fixture(scope="module")
def expected():
    params, losses = manual_run()
    assert losses[-1] < 0.8 * losses[0], "the hand-written loop should learn the pattern"
    return params


def _adopt_of(trainer) -> ADOPT:
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps it
    assert type(opt) is ADOPT
    return opt


def _assert_same(model: torch.nn.Module, expected: list[torch.Tensor]) -> None:
    for i, (p, e) in enumerate(zip(model.parameters(), expected)):
        torch.testing.assert_close(p.detach(), e, atol=1e-10, rtol=0, msg=lambda m, i=i: f"parameter {i}: {m}")


def test_trainer_with_an_adopt_instance_equals_a_plain_loop(tmp_path, expected):
    model = make_model()
    opt = ADOPT(model.parameters(), **HYPER)
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=dataset(), optimizers=(opt, None))
    trainer.train()
    assert _adopt_of(trainer) is opt
    assert all(float(s["step"]) == STEPS for s in opt.state.values())
    _assert_same(model, expected)


def test_trainer_with_optimizer_cls_and_kwargs(tmp_path, expected):
    model = make_model()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, weight_decay=0.0), train_dataset=dataset(),
        # The Trainer passes these kwargs as they are: its learning_rate argument does not reach them.
        optimizer_cls_and_kwargs=(ADOPT, {"lr": HYPER["lr"], "betas": HYPER["betas"]}),
    )
    trainer.train()
    opt = _adopt_of(trainer)
    assert all(g["betas"] == HYPER["betas"] and g["lr"] == HYPER["lr"] for g in opt.param_groups)
    _assert_same(model, expected)


def test_trainer_groups_weight_decay_for_adopt(tmp_path):
    model = make_model()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, weight_decay=0.1, max_steps=1), train_dataset=dataset(),
        optimizer_cls_and_kwargs=(ADOPT, {"decoupled_weight_decay": True}),
    )
    opt = trainer.create_optimizer()
    assert type(opt) is ADOPT
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    # The Trainer's rule: no decay for biases and norm weights; LLaMA has RMSNorm weights and no biases.
    assert decayed and not any("norm" in n for n in decayed)
    assert all(g["decoupled_weight_decay"] for g in opt.param_groups)


# -- adoptim.integrations.hf: ADOPT from TrainingArguments (learning_rate, optim_args) -------------------
def test_optim_args_reach_adopt_and_the_trainer_keeps_8bit_state(tmp_path):
    from adoptim.integrations.hf import optimizer_cls_and_kwargs

    model = make_model()
    targs = args(tmp_path, weight_decay=0.1, max_steps=3,
                 optim_args="state_precision=8bit, state_block_size=128,state_min_size=1024,beta2=0.99")
    cls, kwargs = optimizer_cls_and_kwargs(targs)
    assert cls is ADOPT
    assert kwargs == {"decoupled_weight_decay": True, "lr": HYPER["lr"], "state_precision": "8bit",
                      "state_block_size": 128, "state_min_size": 1024, "betas": (0.9, 0.99)}
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=dataset(),
                                   optimizer_cls_and_kwargs=(cls, kwargs))
    trainer.train()
    opt = _adopt_of(trainer)
    assert all(g["lr"] == HYPER["lr"] and g["betas"] == (0.9, 0.99) and g["state_precision"] == "8bit"
               for g in opt.param_groups)
    embed = model.get_input_embeddings().weight  # 48 x 32 = 1536 elements: at least state_min_size
    entry = opt.state[embed]
    assert entry["exp_avg"].dtype == torch.uint8 and entry["exp_avg"].shape == (1536,)
    assert entry["exp_avg_sq_absmax"].shape == (1536 // 128,) and float(entry["step"]) == 3
    norm = model.model.norm.weight  # 32 elements: full state
    assert opt.state[norm]["exp_avg"].dtype == torch.float64


def test_the_helper_trains_as_the_same_kwargs_given_by_hand(tmp_path):
    from adoptim.integrations.hf import optimizer_cls_and_kwargs

    def run(pair):
        model = make_model()
        targs = args(tmp_path, weight_decay=0.1, max_steps=4, optim_args="state_precision=bfloat16")
        transformers.Trainer(model=model, args=targs, train_dataset=dataset(),
                             optimizer_cls_and_kwargs=pair(targs)).train()
        return [p.detach().clone() for p in model.parameters()]

    helped = run(optimizer_cls_and_kwargs)
    by_hand = run(lambda _: (ADOPT, {"lr": HYPER["lr"], "decoupled_weight_decay": True,
                                     "state_precision": "bfloat16"}))
    for a, b in zip(helped, by_hand):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(helped, make_model().parameters()))  # it did train


def test_pure_bfloat16_options_reach_adopt(tmp_path):
    from adoptim.integrations.hf import optimizer_cls_and_kwargs

    targs = args(tmp_path, optim_args="state_precision=bfloat16,param_rounding=stochastic")
    cls, kwargs = optimizer_cls_and_kwargs(targs)
    assert kwargs["param_rounding"] == "stochastic" and kwargs["state_precision"] == "bfloat16"
    opt = cls(make_model().to(torch.bfloat16).parameters(), **kwargs)
    assert all(g["param_rounding"] == "stochastic" for g in opt.param_groups)


def test_keyword_overrides_come_last_and_adams_betas_are_not_taken(tmp_path):
    from adoptim.integrations.hf import optimizer_cls_and_kwargs

    targs = args(tmp_path, adam_beta2=0.95, adam_epsilon=1e-12, optim_args="state_precision=8bit")
    _, kwargs = optimizer_cls_and_kwargs(targs, state_precision="bfloat16", decoupled_weight_decay=False)
    assert kwargs["state_precision"] == "bfloat16" and kwargs["decoupled_weight_decay"] is False
    assert "betas" not in kwargs and "eps" not in kwargs  # ADOPT's (0.9, 0.9999) and 1e-6 stand


@pytest.mark.parametrize("optim_args,message", [
    ("state_precision", "optim_args entry 'state_precision' is not key=value"),
    ("state_bits=8", "optim_args key 'state_bits' is not an ADOPT option; known: lr, beta1"),
    ("state_block_size=1.5", "optim_args state_block_size='1.5': expects an integer"),
    ("maximize=yes", "optim_args maximize='yes': expects true or false"),
    ("state_precision=4bit", "Invalid state_precision: '4bit'"),
    ("state_block_size=100", "state_block_size"),
    ("param_rounding=up", "param_rounding"),
])
def test_a_bad_optim_args_entry_is_one_line_naming_it(tmp_path, optim_args, message):
    from adoptim.integrations.hf import optimizer_cls_and_kwargs

    with pytest.raises(ValueError) as err:
        optimizer_cls_and_kwargs(args(tmp_path, optim_args=optim_args))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
