"""Helpers shared by the CLI, data and model tests (offline tokenizers and tiny configs)."""

from pathlib import Path


def tiny_tokenizer(folder: Path, words: list[str]):
    """A WordPiece BERT tokenizer over a handful of words, saved to ``folder`` (no Hub needed)."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(folder)
    return tokenizer


TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
