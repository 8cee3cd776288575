"""A tiny real Hugging Face ``Trainer`` run on the CPU, published with trainbus; run by tests/test_transformers.py.

    python tests/transformers_training.py WORKDIR

The model is built from a config (a one-layer BERT classifier, random weights): nothing is
downloaded. TRAINBUS_* from the environment (TRAINBUS_RUN_ID names the run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producers.transformers import TrainbusCallback

EPOCHS = 2


class Tokens(torch.utils.data.Dataset):
    """Sequences of 8 token ids; the label says whether token 7 occurs."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids == 7).any().long()}


def train(callback: TrainbusCallback, workdir: Path, epochs: int = EPOCHS) -> None:
    """The tiny run with ``callback`` (the benchmark times it too)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    args = TrainingArguments(
        output_dir=str(workdir / "out"),
        run_name="tiny-bert",
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    model = BertForSequenceClassification(config)
    Trainer(model, args, train_dataset=Tokens(64, 0), eval_dataset=Tokens(32, 1), callbacks=[callback]).train()


def main() -> None:
    train(TrainbusCallback(project="transformers-test"), Path(sys.argv[1]))


if __name__ == "__main__":
    main()
