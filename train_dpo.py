"""Train the SFT baseline or a DPO-family run from one config.

    python train_dpo.py --config configs/default.yaml [key=value ...] [--dry-run]
    accelerate launch train_dpo.py --config configs/default.yaml loss.beta=0.05

--dry-run loads and validates the config and the data, prints the pairs loaded, the pairs dropped by reason, the
split sizes and one tokenised example (prompt masked from the loss), and exits 0 without training.
"""
from __future__ import annotations

import argparse
import sys

from chat_format import IGNORE_INDEX, resolve_template, sequence_and_labels, tokenize_pairs
from config import Config, UserInputError, load_config
from models import load_tokenizer
from preference_data import load_pairs, split_pairs


def prepare_data(cfg: Config, tokenizer, log=print):
    """Load, split and tokenise the preference pairs; returns (train, eval) TokenizedPair lists."""
    pairs, report = load_pairs(cfg.data)
    for line in report.lines():
        log(f"data: {line}")
    train_pairs, eval_pairs = split_pairs(pairs, cfg.data.eval_fraction, cfg.train.seed)
    log(f"split (train.seed={cfg.train.seed}, data.eval_fraction={cfg.data.eval_fraction}): "
        f"train {len(train_pairs)}, eval {len(eval_pairs)}")
    t = cfg.tokenize
    train, train_counts = tokenize_pairs(tokenizer, train_pairs, t.max_length, t.max_prompt_length, t.chat_template)
    held_out, eval_counts = tokenize_pairs(tokenizer, eval_pairs, t.max_length, t.max_prompt_length, t.chat_template)
    counts = {k: train_counts[k] + eval_counts[k] for k in train_counts}
    log(f"tokenise (max_length {t.max_length}, max_prompt_length {t.max_prompt_length}, template "
        f"{resolve_template(tokenizer, t.chat_template)}): dropped empty_response_after_truncation "
        f"{counts['empty_response_after_truncation']}; prompts cut from the left {counts['prompt_truncated']}; "
        f"responses cut from the right {counts['response_truncated']}; kept train {len(train)}, eval {len(held_out)}")
    if not train:
        raise UserInputError("no training pairs left after tokenisation; raise tokenize.max_length")
    return train, held_out


def show_example(tokenizer, tok) -> str:
    input_ids, labels = sequence_and_labels(tok.prompt_ids, tok.chosen_ids)
    masked = [i for i, label in zip(input_ids, labels) if label == IGNORE_INDEX]
    trained = [i for i, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    return "\n".join([
        f"example {tok.id}",
        f"--- prompt: {len(masked)} tokens, masked from the loss (labels = {IGNORE_INDEX}) ---",
        tokenizer.decode(masked),
        f"--- chosen response: {len(trained)} tokens, trained ---",
        tokenizer.decode(trained),
        f"--- rejected response: {len(tok.rejected_ids)} tokens, trained ---",
        tokenizer.decode(tok.rejected_ids),
    ])


def dry_run(cfg: Config) -> None:
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    print(f"model: {cfg.model.path} (dtype {cfg.model.dtype}); loss: {cfg.loss.name}"
          + (f" {cfg.loss.type} beta={cfg.loss.beta}" if cfg.loss.name == "dpo" else ""))
    train, _ = prepare_data(cfg, tokenizer)
    print(show_example(tokenizer, train[0]))
    print("dry run: config and data are valid; nothing was trained")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.05 train.max_steps=10")
    parser.add_argument("--dry-run", action="store_true", help="validate config and data, show an example, train nothing")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            dry_run(cfg)
            return 0
        raise UserInputError("training is not implemented yet (issue #3); use --dry-run")
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
