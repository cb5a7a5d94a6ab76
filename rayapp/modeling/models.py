"""Models and tokenizers: load any HF masked LM, export trained ones, build tiny test models.

Users name models by HF hub id (`roberta-large`, `distilroberta-base`) or local path; both go
through `from_pretrained`. (Tiny random test models live in `tests/tiny.py`.)
"""
from __future__ import annotations

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
