"""A causal-LM training script as the transformers language-modeling examples write it (HfArgumentParser,
TrainingArguments, --deepspeed ds.json). It knows nothing of rigl_ds: tests run it unchanged.

    deepspeed --num_gpus 2 hf_trainer_clm.py --deepspeed ds.json --train_file text.txt --output_dir out ...
"""

from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments, set_seed


@dataclass
class ModelArguments:
    n_layer: int = field(default=2)
    n_embd: int = field(default=32)
    n_head: int = field(default=2)


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "a plain text file"})
    block_size: int = field(default=32)


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)
    with open(data_args.train_file, "rb") as f:
        ids = torch.tensor(list(f.read()), dtype=torch.long)  # bytes as tokens: vocab 256
    n = len(ids) // data_args.block_size
    blocks = ids[: n * data_args.block_size].view(n, data_args.block_size)
    train = Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    config = GPT2Config(
        vocab_size=256,
        n_positions=data_args.block_size,
        n_layer=model_args.n_layer,
        n_embd=model_args.n_embd,
        n_head=model_args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    trainer = Trainer(model=model, args=training_args, train_dataset=train)
    result = trainer.train()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_state()


if __name__ == "__main__":
    main()
