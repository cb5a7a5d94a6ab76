"""Models and tokenizers: load any HF masked LM (or T5), export trained ones, build tiny test models.

Users name models by HF hub id (`roberta-large`, `distilroberta-base`) or local path; both go
through `from_pretrained`. (Tiny random test models live in `tests/tiny.py`.)

Prompt methods read a label word's logit where the prompt's mask slot is. A masked LM scores it
at the mask; a seq2seq LM without a masked-LM head (T5, `is_seq2seq`) scores it the way it was
pre-trained on span corruption (SMASH §4.7): the slot holds the sentinel `<extra_id_0>` and the
label word is the decoder's second token (`LogitsAt`). Everything above `LogitsAt` (objectives,
recipes, the teacher cache, export) is the same for both; what needs a masked LM by nature (MLM
pre-training, DistilBERT's objective, Prompt-Distiller's layer probes, soft prompts) refuses a
seq2seq model on the driver (`check_model(needs_mlm=...)`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from rayapp.errors import ConfigError


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    from rayapp import assets

    src = local_model_dir(name_or_path)
    try:
        return loader.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if not Path(src).exists():
            raise ConfigError(f"cannot load {what}: {assets.not_found(name_or_path, detail)}") from None
        raise ConfigError(f"cannot load {what} {name_or_path!r}: the directory {src} does not hold a "
                          f"usable HF {what} ({detail})") from None


def local_model_dir(name_or_path: str) -> str:
    """A model reference as `from_pretrained` reads it on this node: a local dir (made
    absolute), a hub id, or for an `s3://` dir (given, or found in the `$RAYAPP_ASSETS`
    mirror) a node-local copy, downloaded once per node however many workers ask."""
    from rayapp import assets, storage

    ref = assets.resolve(name_or_path)
    if storage.is_remote(ref):
        return storage.local_copy(ref)
    return str(Path(ref).resolve()) if Path(ref).exists() else ref


def portable_model(name_or_path: str) -> str:
    """The model as workers on any node can load it: resolved through the mirror on the
    driver (workers need not see `$RAYAPP_ASSETS`), local paths made absolute (workers do
    not share the driver's working directory), hub ids and `s3://` URIs as such (each node
    fetches them itself with `local_model_dir`)."""
    from rayapp import assets, storage

    ref = assets.resolve(name_or_path)
    return ref if storage.is_remote(ref) else local_model_dir(ref)


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def check_model(name_or_path: str, *, mlm: bool = True, tokenizer: bool = True, prompt=None,
                soft_prompt: int = 0, needs_mlm: str | None = None) -> None:
    """Driver-side check, before any Ray worker starts, that `name_or_path` is a model:
    it resolves (local dir, `s3://`, mirror, hub), has a config (and weights, where files
    can be listed), a head prompt methods read when `mlm` (a masked LM, or a seq2seq LM such
    as T5), and a tokenizer that loads and fits the embedding. With `prompt=(task, max_length)`
    (or `(task, max_length, demonstrations)`, `PromptEncoder`'s arguments)
    also that the task's prompt encodes with that tokenizer (single-token label words, the
    template within max_length) and that max_length plus `soft_prompt` tokens fit the model's
    positions: the error a worker would raise, before Ray starts. `needs_mlm` is why the
    caller needs a masked LM (a seq2seq model is then refused; a soft prompt implies it). A
    rayapp checkpoint counts by its `model/` folder. Raises a one-line ConfigError/PromptError
    naming the model and the fix."""
    import fnmatch

    from rayapp import assets, storage

    ref = assets.resolve(name_or_path)
    if storage.is_remote(ref) or Path(ref).is_dir():
        files = _top_level_files(ref, name_or_path)
        if "config.json" not in files and "config.json" in _top_level_files(storage.join(ref, "model"), name_or_path):
            ref, files = storage.join(ref, "model"), _top_level_files(storage.join(ref, "model"), name_or_path)
        missing = [what for what, patterns in (("config.json", ["config.json"]), ("weights", _WEIGHTS))
                   if not any(fnmatch.fnmatch(f, p) for f in files for p in patterns)]
        if missing:
            where = "" if ref == name_or_path else f" ({ref})"
            raise ConfigError(f"model {name_or_path!r}{where} is not an HF model directory: no "
                              f"{' and no '.join(missing)} ({', '.join(_WEIGHTS)}); give the folder written "
                              "by save_pretrained, a rayapp run checkpoint (holding model/), or a hub id")
        if storage.is_remote(ref):  # config and tokenizer only: the weights are fetched where they are used
            with tempfile.TemporaryDirectory() as tmp:
                for f in files:
                    if not any(fnmatch.fnmatch(f, p) for p in _WEIGHTS):
                        storage.write_bytes(os.path.join(tmp, f), storage.read_bytes(storage.join(ref, f)))
                return _check_loads(tmp, name_or_path, mlm, tokenizer, prompt, soft_prompt, needs_mlm)
    elif Path(ref).exists():
        raise ConfigError(f"model {name_or_path!r} is a file; give the model's directory or a hub id")
    _check_loads(ref, name_or_path, mlm, tokenizer, prompt, soft_prompt, needs_mlm)


def _top_level_files(uri: str, name: str) -> list[str]:
    import pyarrow.fs as pafs

    from rayapp import storage

    fs, path = storage.filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise ConfigError(f"model {name!r}: cannot list {uri} ({e})") from None
    return [i.base_name for i in infos if i.type == pafs.FileType.File]


# Embedding rows beyond the tokenizer's tokens that are still one model's pair: vocabularies
# padded to a multiple of 64/128 for speed (DeBERTa-v3: 99 rows, ModernBERT: 88, T5: 28)
_SPARE_ROWS = 256


def _check_loads(src: str, name: str, mlm: bool, tokenizer: bool, prompt=None, soft_prompt: int = 0,
                 needs_mlm: str | None = None) -> None:
    config = load_model_config(src)
    if mlm:
        _mlm_class(config, name)
    needs_mlm = needs_mlm or (SOFT_PROMPT_NEEDS_MLM if soft_prompt else None)
    if needs_mlm and is_seq2seq(config):
        raise ConfigError(f"model {name!r} is a seq2seq LM ({config.model_type}), but {needs_mlm}: give a masked LM "
                          "(BERT, RoBERTa, ...)")
    if tokenizer or prompt:
        fix = "save it beside the weights (tokenizer.save_pretrained) or give a model that has one"
        try:
            tok = load_tokenizer(src)
        except ConfigError as e:
            raise ConfigError(f"model {name!r}: its tokenizer does not load ({e}); {fix}") from None
        # transformers 5 builds an empty tokenizer (special tokens only) when the files are missing
        if len(tok) <= len(tok.all_special_tokens):
            raise ConfigError(f"model {name!r}: its tokenizer has no vocabulary (no tokenizer files); {fix}")
        # more tokens than rows: ids past the embedding; far fewer: ids of another vocabulary
        # index rows trained for other tokens (it runs, and learns noise)
        if not 0 <= config.vocab_size - len(tok) <= max(_SPARE_ROWS, config.vocab_size // 100):
            raise ConfigError(f"model {name!r}: its tokenizer has {len(tok)} tokens but the model embeds "
                              f"{config.vocab_size}; the tokenizer belongs to another model, {fix}")
        if prompt is not None:
            from rayapp.tasks.prompts import PromptEncoder

            task, max_length, *demonstrations = prompt
            PromptEncoder(tok, task, max_length, *demonstrations)
            limit = getattr(config, "max_position_embeddings", None)
            if limit and "roberta" in config.model_type:  # RoBERTa numbers positions from padding_idx + 1
                limit -= config.pad_token_id + 1
            if limit and max_length + soft_prompt > limit:
                extra = f" plus {soft_prompt} soft prompt tokens" if soft_prompt else ""
                raise ConfigError(f"max_length={max_length}{extra} does not fit model {name!r}, which has {limit} "
                                  "positions; lower max_length" + (" or prompt_tokens" if soft_prompt else ""))


def is_seq2seq(config) -> bool:
    """An encoder-decoder LM without a masked-LM head class (T5): `LogitsAt` reads its label word
    at the decoder's second token. (BART has a masked-LM class and is read as a masked LM.)"""
    from transformers import AutoModelForMaskedLM

    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    return encoder_decoder and type(config) not in AutoModelForMaskedLM._model_mapping


def _mlm_class(config, name: str):
    """The Auto class that loads the model with the head prompt methods read: a masked LM, or
    a seq2seq LM (`is_seq2seq`)."""
    from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if is_seq2seq(config) else AutoModelForMaskedLM
    if type(config) not in auto._model_mapping:
        raise ConfigError(
            f"model {name!r} ({config.model_type}) has no masked-LM head class; prompt-based methods need an "
            "MLM such as BERT, RoBERTa or DistilRoBERTa, or a seq2seq LM such as T5"
        )
    if auto is AutoModelForSeq2SeqLM and getattr(config, "decoder_start_token_id", None) is None:
        raise ConfigError(f"model {name!r} ({config.model_type}) has no decoder_start_token_id in its config.json, "
                          "which LogitsAt feeds its decoder first; set it (T5: 0, its pad id)")
    return auto


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, "tokenizer")


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (its sorted token -> id items, added tokens
    included). Distillation over the vocabulary (SMASH eq. 1) pairs the teacher's and the
    student's logits id by id, so they must share the vocabulary, not just its size."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def load_model_config(name_or_path: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name_or_path, "model config")


def load_mlm(name_or_path: str, **kwargs):
    """An `AutoModelForMaskedLM`, or for T5 an `AutoModelForSeq2SeqLM` (`is_seq2seq`); kwargs go
    to `from_pretrained`, e.g. attn_implementation. Encoders saved without an MLM head (e.g.
    the MiniLM sentence-transformers weights) load with a freshly initialised head."""
    auto = _mlm_class(load_model_config(name_or_path), name_or_path)
    return _from_pretrained(auto, name_or_path, "masked LM", **kwargs)


def load_seq2seq(name_or_path: str, what: str = "seq2seq LM", **kwargs):
    """An `AutoModelForSeq2SeqLM` (MarianMT, T5, BART, ...): a translation model of back-
    translation (`data.backtranslate`); `what` names it in the error a bad path gets."""
    from transformers import AutoModelForSeq2SeqLM

    return _from_pretrained(AutoModelForSeq2SeqLM, name_or_path, what, **kwargs)


def mlm_head(model) -> torch.nn.Module | None:
    """The module mapping hidden states [..., H] to vocabulary logits: BERT's `cls`,
    RoBERTa-family `lm_head` (T5's `lm_head` too, which reads the decoder); None for other
    MLMs (they get the full forward pass)."""
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

    A seq2seq LM (T5, `is_seq2seq`) is read as SMASH reads it (§4.7, App. A.3): the encoder
    takes the prompt, whose mask slot holds `<extra_id_0>`; "the first generated token is always
    <extra_id_0>", so the decoder is fed `[decoder_start_token_id, <extra_id_0>]` and its second
    position's logits are the logits at the mask. Where this differs from SMASH: that first
    token is given (teacher forcing, one forward), not generated, and the sentinel is read from
    the input at `positions`. One position per row only ([B]): the label word is one token.
    `outputs` are then the encoder's (hidden_states/attentions over the prompt, which
    `positions` index), not the decoder's two positions.

    `soft_prompt` ([n, H], prompt tuning / PPT, Gu et al. 2021): n trained input vectors
    inserted after the first token (<s>/[CLS], which the model saw first in pre-training; PPT's
    T5 has no such token and puts them first). Callers keep the ids of the plain prompt:
    `positions` are shifted here, and `outputs` cover the longer sequence.
    """

    def __init__(self, mlm: torch.nn.Module, soft_prompt: torch.Tensor | None = None):
        super().__init__()
        self.mlm = mlm
        self.seq2seq = is_seq2seq(mlm.config)
        if self.seq2seq and soft_prompt is not None:
            raise ConfigError(f"{type(mlm).__name__} is a seq2seq LM, but {SOFT_PROMPT_NEEDS_MLM}")
        self.soft_prompt = None if soft_prompt is None else torch.nn.Parameter(soft_prompt.detach().clone())

    def forward(self, input_ids, attention_mask, positions: torch.Tensor, **kwargs):
        """positions: LongTensor [B] (one position per row), [B, M] (M per row: the masks of
        a label word of several pieces) or BoolTensor [B, T]. Returns (logits [B, V], [B, M, V]
        or [N, V], the encoder's outputs: hidden_states/attentions when asked for)."""
        if self.seq2seq:
            return self._at_decoder(input_ids, attention_mask, positions, **kwargs)
        head = mlm_head(self.mlm)
        model = self.mlm.base_model if head is not None else self.mlm
        if self.soft_prompt is None:
            out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        else:
            embeds, attention_mask, positions = self._prompted(input_ids, attention_mask, positions)
            out = model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        states = out.last_hidden_state if head is not None else out.logits
        if positions.dtype == torch.bool:
            picked = states[positions]
        else:
            rows = torch.arange(states.shape[0], device=states.device)
            picked = states[rows[:, None] if positions.dim() == 2 else rows, positions]
        return (head(picked) if head is not None else picked), out

    def _at_decoder(self, input_ids, attention_mask, positions, **kwargs):
        """T5: logits of the decoder's second token after `[start, sentinel at positions]`."""
        from transformers.modeling_outputs import BaseModelOutput

        sentinel = input_ids[torch.arange(input_ids.shape[0], device=input_ids.device), positions]
        start = torch.full_like(sentinel, self.mlm.config.decoder_start_token_id)
        out = self.mlm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       decoder_input_ids=torch.stack([start, sentinel], 1), **kwargs)
        return out.logits[:, 1], BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state,
                                                 hidden_states=out.encoder_hidden_states,
                                                 attentions=out.encoder_attentions)

    def _prompted(self, input_ids, attention_mask, positions):
        """(input embeddings, attention mask, positions) with the soft prompt after token 0."""
        embeds = self.mlm.get_input_embeddings()(input_ids)
        rows, n = input_ids.shape[0], self.soft_prompt.shape[0]
        prompt = self.soft_prompt.to(embeds.dtype).expand(rows, -1, -1)
        embeds = torch.cat([embeds[:, :1], prompt, embeds[:, 1:]], 1)
        attention_mask = torch.cat([attention_mask[:, :1], attention_mask.new_ones(rows, n), attention_mask[:, 1:]], 1)
        if positions.dtype == torch.bool:
            positions = torch.cat([positions[:, :1], positions.new_zeros(rows, n), positions[:, 1:]], 1)
        else:
            positions = positions + n  # a mask is never token 0: the tokenizer's start token is
        return embeds, attention_mask, positions


SOFT_PROMPT_FILE = "soft_prompt.safetensors"  # beside the HF weights of a prompt-tuned model
SOFT_PROMPT_NEEDS_MLM = "prompt tuning (PPT) puts its soft prompt after a masked LM's first token"


def initial_soft_prompt(mlm: torch.nn.Module, tokenizer, tokens: int) -> torch.Tensor:
    """PPT's fresh soft prompt: `tokens` copies of the mask token's input embedding (PPT's
    `default_init_token`, configs/prompt/pretrain.json and pt.json)."""
    return mlm.get_input_embeddings().weight[tokenizer.mask_token_id].detach().float().expand(tokens, -1).clone()


def prompt_tuned(mlm: torch.nn.Module, tokenizer, tokens: int, src: str) -> LogitsAt:
    """Prompt tuning (Lester et al. 2021, PPT's downstream stage): the MLM frozen, only a soft
    prompt trained: the one saved in the local model dir `src` (a pre-trained PPT prompt, its
    own length), else a fresh one of `tokens`."""
    prompt = load_soft_prompt(src)
    if prompt is None:
        prompt = initial_soft_prompt(mlm, tokenizer, tokens)
    return LogitsAt(mlm.requires_grad_(False), prompt)


def save_soft_prompt(prompt: torch.Tensor, model_dir: str | Path, dtype: str = "float32") -> None:
    from safetensors.torch import save_file

    save_file({"soft_prompt": prompt.detach().to(getattr(torch, dtype)).cpu().contiguous()},
              os.path.join(model_dir, SOFT_PROMPT_FILE))


def load_soft_prompt(model_dir: str) -> torch.Tensor | None:
    """The soft prompt saved beside a model (a local dir, see `local_model_dir`), else None."""
    from safetensors.torch import load_file

    path = os.path.join(model_dir, SOFT_PROMPT_FILE)
    return load_file(path)["soft_prompt"].float() if os.path.exists(path) else None


def load_classifier(name_or_path: str, num_labels: int):
    """A sequence classifier (standard fine-tuning baseline) on the same encoder."""
    from transformers import AutoModelForSequenceClassification

    return _from_pretrained(
        AutoModelForSequenceClassification, name_or_path, "classifier", num_labels=num_labels
    )
