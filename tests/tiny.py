"""Tiny random BERT/RoBERTa-style MLMs and tokenizers for tests: they know no language and
are never a default (real runs use hub ids or `../shared/data/models`)."""
from __future__ import annotations

import glob
from pathlib import Path

import torch

from rayapp.errors import ConfigError

def _builtin_label_words() -> list[str]:
    from rayapp.tasks.registry import BUILTIN_TASKS

    words = set()
    for task in BUILTIN_TASKS.values():
        for w in task.verbalizer.values():
            words.update([w] if isinstance(w, str) else w)
    words.update(["terrible", "bad", "okay", "good", "great", "No", "Maybe", "Yes"])
    return sorted(words)


def make_tiny_tokenizer(kind: str, out_dir: str | Path, vocab_size: int = 8000):
    """`wordpiece`: the real bert-base-uncased tokenizer from the local assets.
    `bpe`: a RoBERTa-style byte-level BPE trained on two files of the local Wikipedia
    corpus; the built-in label words are fed in repeatedly so each is one `Ġword` token,
    as in the real RoBERTa vocabulary."""
    from transformers import AutoTokenizer

    from rayapp.assets import asset

    out = Path(out_dir)
    if (out / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(out)
    if kind == "wordpiece":
        tok = AutoTokenizer.from_pretrained(asset("models", "bert-base-uncased-tokenizer"))
    elif kind == "bpe":
        from tokenizers import AddedToken, ByteLevelBPETokenizer
        from tokenizers.processors import RobertaProcessing
        from transformers import RobertaTokenizerFast

        files = sorted(glob.glob(str(asset("corpus", "wikipedia-en", "AA") / "wiki_*")))[:2]
        words = " " + " ".join(_builtin_label_words())

        def lines():
            for f in files:
                with open(f, encoding="utf-8") as fh:
                    yield from (line for line in fh if not line.startswith("<"))
            for _ in range(100):
                yield words

        bpe = ByteLevelBPETokenizer()
        specials = ["<s>", "<pad>", "</s>", "<unk>", AddedToken("<mask>", lstrip=True)]
        bpe.train_from_iterator(lines(), vocab_size=vocab_size, min_frequency=2, special_tokens=specials)
        bpe._tokenizer.post_processor = RobertaProcessing(
            ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>"))
        )
        tok = RobertaTokenizerFast(
            tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
            cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        )
    else:
        raise ConfigError(f"tiny tokenizer kind must be 'wordpiece' or 'bpe', got {kind!r}")
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def make_tiny_random_model(
    kind: str,
    out_dir: str | Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    dropout: float = 0.1,
    seed: int = 0,
) -> Path:
    """A randomly initialised BERT (`wordpiece`) or RoBERTa (`bpe`) MLM saved as an HF dir.
    For tests only: it knows no language."""
    from transformers import AutoModelForMaskedLM, BertConfig, RobertaConfig

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tok = make_tiny_tokenizer(kind, out)
    common = dict(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 4, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        pad_token_id=tok.pad_token_id,
    )
    if kind == "wordpiece":
        config = BertConfig(max_position_embeddings=512, **common)
    else:  # RoBERTa offsets positions by pad_token_id + 1
        config = RobertaConfig(
            max_position_embeddings=514, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            type_vocab_size=1, **common,
        )
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    return out

