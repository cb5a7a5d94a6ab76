"""Tiny random models and tokenizers for tests (BERT/RoBERTa-style MLMs, MarianMT, T5): they
know no language and are never a default (real runs use hub ids or `../shared/data/models`)."""
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


def make_tiny_marian(out_dir: str | Path, seed: int = 0, vocab_size: int = 400) -> Path:
    """A randomly initialised MarianMT model (1 layer each side, d_model 16) with a real
    `MarianTokenizer`: a SentencePiece unigram model trained on 500 lines of the local
    Wikipedia, as source and target vocabulary. Built offline, for tests of the translation
    path that `Helsinki-NLP/opus-mt-*` models take; it knows no language."""
    import io
    import json

    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    from rayapp.assets import asset

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(asset("corpus", "wikipedia-en", "AA", "wiki_00"), encoding="utf-8") as f:  # 500 lines: 0.8 s, not 3
        lines = [line for line in f.read().splitlines() if line and not line.startswith("<")][:500]
    proto = io.BytesIO()  # Marian's ids: </s> 0, <pad> 1, <unk> 2; no <s>
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size,
                                   eos_id=0, pad_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    for name in ("source.spm", "target.spm"):
        (out / name).write_bytes(proto.getvalue())
    (out / "vocab.json").write_text(json.dumps({processor.id_to_piece(i): i for i in range(len(processor))}))
    tok = MarianTokenizer(str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json"))
    tok.save_pretrained(out)
    config = MarianConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                          max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    MarianMTModel(config).save_pretrained(out)
    return out


def make_tiny_t5(out_dir: str | Path, layers: int = 2, seed: int = 0, words: int = 700) -> Path:
    """A randomly initialised T5 (d_model 32, `layers` blocks each side) with a T5 tokenizer
    built offline from a vocabulary, no training and no sentencepiece: T5's ids (<pad> 0, </s> 1,
    <unk> 2), the lone word start "▁", the built-in label words and the `words` most frequent
    words of one file of the local Wikipedia as "▁word" pieces, ASCII letters and digits with
    and without "▁", punctuation without (as in T5's vocabulary: "?" alone is "▁" "?"), and the
    100 sentinels last, <extra_id_99> .. <extra_id_0>. Unigram scores are log frequencies. The
    vocabulary depends on nothing but the corpus file, so two calls give one tokenizer
    (a teacher and a student). It knows no language."""
    import collections
    import math
    import re
    import string

    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration, T5Tokenizer

    from rayapp.assets import asset

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    text = asset("corpus", "wikipedia-en", "AA", "wiki_00").read_text(encoding="utf-8")
    counts = collections.Counter(re.findall(r"[A-Za-z0-9]+", text))
    top = counts.most_common(1)[0][1]
    pieces = {f"▁{w}": n for w, n in counts.most_common(words)}
    pieces.update({f"▁{w}": top for w in _builtin_label_words()})
    for c in string.ascii_letters + string.digits:
        pieces.setdefault(c, 1)
        pieces.setdefault(f"▁{c}", 1)
    pieces.update({c: top for c in string.punctuation})
    pieces["▁"] = top
    total = sum(pieces.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, math.log(n / total)) for p, n in sorted(pieces.items())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    T5Tokenizer(vocab=vocab, extra_ids=100).save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    # T5's embedding has spare rows beyond its tokenizer's (t5-small: 32128 for 32100 tokens)
    config = T5Config(vocab_size=len(tok) + 28, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
                      dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(out)
    return out
