"""Models and tokenizers: load any HF masked LM, export trained ones, build tiny test models.

Users name models by HF hub id (`roberta-large`, `distilroberta-base`) or local path; both go
through `from_pretrained`. `make_tiny_random_model` exists for tests and smoke runs only:
its weights are random and it is never a default.
"""
from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import torch

from rayapp.errors import ConfigError


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        hint = (
            "it is not a local directory and could not be fetched as a hub id (offline, or no such model)"
            if not Path(name_or_path).exists()
            else "the directory exists but does not hold a usable HF model/tokenizer"
        )
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"cannot load {what} {name_or_path!r}: {hint} ({type(e).__name__}: {detail})") from None


def local_model_dir(name_or_path: str) -> str:
    """Hub ids and local dirs pass through; an `s3://` model dir is downloaded once to
    `~/.cache/rayapp/models/<hash>` so `from_pretrained` can read it."""
    from rayapp import storage

    if not storage.is_remote(name_or_path):  # workers run elsewhere: make local paths absolute
        return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path
    local = Path.home() / ".cache" / "rayapp" / "models" / hashlib.sha1(name_or_path.encode()).hexdigest()[:16]
    if not (local / ".complete").exists():
        storage.copy_dir(name_or_path, str(local))
        (local / ".complete").touch()
    return str(local)


def portable_model(name_or_path: str) -> str:
    """The model as workers on any node can load it: local paths made absolute (workers do
    not share the driver's working directory), hub ids and `s3://` URIs as given (each node
    fetches them itself with `local_model_dir`)."""
    from rayapp import storage

    return name_or_path if storage.is_remote(name_or_path) else local_model_dir(name_or_path)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, "tokenizer")


def load_model_config(name_or_path: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name_or_path, "model config")


def load_mlm(name_or_path: str, **kwargs):
    """An `AutoModelForMaskedLM` (kwargs go to `from_pretrained`, e.g. attn_implementation).
    Encoders saved without an MLM head (e.g. the MiniLM sentence-transformers weights) load
    with a freshly initialised head."""
    from transformers import AutoModelForMaskedLM

    config = load_model_config(name_or_path)
    try:
        AutoModelForMaskedLM._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(
            f"model {name_or_path!r} ({config.model_type}) has no masked-LM head class; "
            "prompt-based methods need an MLM such as BERT, RoBERTa or DistilRoBERTa"
        ) from None
    return _from_pretrained(AutoModelForMaskedLM, name_or_path, "masked LM", **kwargs)


def mlm_head(model) -> torch.nn.Module | None:
    """The module mapping hidden states [..., H] to vocabulary logits: BERT's `cls`,
    RoBERTa-family `lm_head`; None for other MLMs (they get the full forward pass)."""
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


class LogitsAt(torch.nn.Module):
    """An HF masked LM whose forward projects to the vocabulary only at chosen positions.

    Prompt methods read one position per example (the mask) and MLM reads ~15%: the full
    projection is the largest tensor of a step (B*T*V floats, 3.3 GB at SMASH's batch 128 x
    128 tokens x 50k vocabulary) and almost all of it would be thrown away. The engines wrap
    this module, so DDP and DeepSpeed see one ordinary forward.
    """

    def __init__(self, mlm: torch.nn.Module):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids, attention_mask, positions: torch.Tensor, **kwargs):
        """positions: LongTensor [B] (one position per row) or BoolTensor [B, T]. Returns
        (logits [N, V], the encoder's outputs: hidden_states/attentions when asked for)."""
        head = mlm_head(self.mlm)
        model = self.mlm.base_model if head is not None else self.mlm
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        states = out.last_hidden_state if head is not None else out.logits
        if positions.dtype == torch.bool:
            picked = states[positions]
        else:
            picked = states[torch.arange(states.shape[0], device=states.device), positions]
        return (head(picked) if head is not None else picked), out


def load_classifier(name_or_path: str, num_labels: int):
    """A sequence classifier (standard fine-tuning baseline) on the same encoder."""
    from transformers import AutoModelForSequenceClassification

    return _from_pretrained(
        AutoModelForSequenceClassification, name_or_path, "classifier", num_labels=num_labels
    )


def export_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """Save an HF model directory (safetensors) that `from_pretrained` loads back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# --- tiny random models, for tests and smoke runs only ---------------------------------

def _builtin_label_words() -> list[str]:
    from rayapp.prompts import BUILTIN_TASKS

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

