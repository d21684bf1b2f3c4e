"""The Hugging Face callback, with the real ``transformers.Trainer`` on a 2-layer BERT built from a config
(random weights: nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from optional import need
from torch import nn

import normtrace as nt

transformers = need("transformers")
need("accelerate")
from normtrace.integrations.transformers import NormtraceCallback  # noqa: E402

pl = need("polars")

STEPS_PER_EPOCH = 4  # 16 samples, batch 4
EPOCHS = 2


class Tokens(torch.utils.data.Dataset):
    """Random token ids and labels."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": self.labels[i],
        }


def _trainer(tmp_path: Path, callback: NormtraceCallback):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=EPOCHS * STEPS_PER_EPOCH,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        logging_steps=1,
        eval_strategy="epoch",
        save_strategy="epoch",
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return transformers.Trainer(
        model=transformers.BertForSequenceClassification(config),
        args=args,
        train_dataset=Tokens(16, 1),
        eval_dataset=Tokens(8, 2),
        callbacks=[callback],
    )


def _table(run: Path, table: str) -> pl.DataFrame:
    return pl.read_ipc(sorted((run / table).glob("*.arrow")))


def test_one_line_records_the_trainers_logs_epochs_params_and_events(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = _trainer(
        tmp_path, NormtraceCallback(run, [nt.OutputNorm(include=[nn.Linear]), nt.ParameterNorm()])
    )
    trainer.train()
    history = trainer.state.log_history

    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "closed"
    assert meta["epochs"] == EPOCHS
    assert meta["root"] == "BertForSequenceClassification"
    # the TrainingArguments become the run's config, JSON values only, as the Trainer holds them
    assert meta["config"]["learning_rate"] == 1e-3 and meta["config"]["seed"] == 0
    assert meta["config"]["per_device_train_batch_size"] == 4
    assert meta["config"]["lr_scheduler_type"] == "linear"

    metrics = _table(run, "metrics")
    train = metrics.filter(pl.col("name") == "loss", pl.col("split") == "train")
    assert train["value"].to_list() == [h["loss"] for h in history if "loss" in h]
    assert train.height == EPOCHS * STEPS_PER_EPOCH
    assert train["epoch"].to_list() == [0] * STEPS_PER_EPOCH + [1] * STEPS_PER_EPOCH
    val = metrics.filter(pl.col("name") == "loss", pl.col("split") == "val")
    assert val["value"].to_list() == [h["eval_loss"] for h in history if "eval_loss" in h]
    assert val["epoch"].to_list() == [0, 1]  # each epoch's evaluation carries that epoch
    logged_lr = metrics.filter(pl.col("name") == "learning_rate")["value"].to_list()
    assert logged_lr == [h["learning_rate"] for h in history if "learning_rate" in h]
    assert metrics.filter(pl.col("name") == "train_runtime").height == 1
    assert metrics.filter(pl.col("name") == "epoch").is_empty()

    events = _table(run, "events").select("epoch", "name").rows()
    # the linear schedule starts moving after the first step: one lr_step, not one per step
    assert events == [
        (0, "lr_step"),
        (0, "validation"),
        (0, "checkpoint"),
        (1, "validation"),
        (1, "checkpoint"),
    ]

    params = _table(run, "params")
    assert params["epoch"].unique().sort().to_list() == [0, 1]
    bias = params.filter(pl.col("epoch") == 1, pl.col("module") == "classifier", pl.col("param") == "bias")
    assert bias["norm"][0] == pytest.approx(trainer.model.classifier.bias.detach().norm().item(), rel=1e-6)

    # include=[nn.Linear] adds to the activations found by default: the pooler's nn.Tanh and each layer's
    # transformers GELUActivation (not a torch.nn class: found by its module, transformers.activations)
    kinds = (nn.Linear, nn.Tanh, transformers.activations.GELUActivation)
    observed = {name for name, m in trainer.model.named_modules() if isinstance(m, kinds)}
    assert len(observed) == 12 + 2 + 1 + 2  # 6 Linear per layer, pooler, classifier; tanh; 2 GELU
    outputs = _table(run, "outputs")
    assert set(outputs["module"].unique()) == observed
    assert outputs.height == len(observed) * EPOCHS * STEPS_PER_EPOCH  # evaluation runs under no_grad


def test_close_failed_in_an_except_block_and_a_second_run_needs_a_new_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    callback = NormtraceCallback(run)
    trainer = _trainer(tmp_path, callback)
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
    callback.close("failed")  # what the docs say to do in an except block
    assert json.loads((run / "meta.json").read_text())["status"] == "failed"
    callback.close("failed")  # twice is harmless
    with pytest.raises(nt.RunDirError, match="already holds a trace"):
        callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)


def test_the_default_output_norm_finds_transformers_activation_classes(tmp_path: Path) -> None:
    """Issue 15: the default OutputNorm() saw one module of a BERT (the pooler's tanh). transformers'
    activations live in ``transformers.activations``, which the documented rule recognises."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_act="gelu_new",
    )
    model = transformers.BertModel(config)
    gelus = [n for n, m in model.named_modules() if isinstance(m, transformers.activations.NewGELUActivation)]
    assert len(gelus) == 3  # one per layer
    seen: list[torch.Tensor] = []  # a plain PyTorch hook: the output the recorder should have measured
    act = model.encoder.layer[1].intermediate.intermediate_act_fn
    handle = act.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with nt.Recorder(tmp_path / "run", lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        model(input_ids=torch.randint(0, 100, (2, 5)))
    handle.remove()
    outputs = _table(tmp_path / "run", "outputs")
    assert set(outputs["module"]) == {*gelus, "pooler.activation"}
    row = outputs.filter(pl.col("module") == gelus[1])
    assert row["numel"].to_list() == [5 * 32]
    expected = seen[0].flatten(1).norm(dim=1).mean().item()
    assert row["norm"][0] == pytest.approx(expected, rel=1e-5)
