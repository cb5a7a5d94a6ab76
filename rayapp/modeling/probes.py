"""Layer probes of a frozen masked LM (Prompt-Distiller §2.3, eq. 5-7).

"We first freeze the parameters of Θ_T and Θ_S, and train an MLM-based probe classifier for
each transformer encoder layer (apart from the last layer) w.r.t. the ground-truth label
words." A model with M layers gets N = M - 1 probes, on the outputs of layers 1..M-1
(`hidden_states[1:M]`; BERT-base: N = 11, as the paper's footnote says).

Our probe (the paper does not say what an "MLM-based probe classifier" is): a copy of the
model's own MLM head (BERT: dense + GELU + LayerNorm; RoBERTa: the same), its vocabulary
decoder restricted to the task's label words (one row per class; a class with several words
gets their mean row and bias, so its score is the mean of their logits, as
`prompts.class_logits`). Before training, the probe on layer M would reproduce the model's
own eq. 1 scores; on layer j it reads the mask's hidden state through the model's head (the
"logit lens"), a good start for 32 examples. Each probe (transform and restricted decoder,
H*H + H*(C+2) + C parameters) is then trained with AdamW on CE against the gold labels of the
few-shot train set X, full batch over the frozen hidden states at the mask (computed once),
and the weights with the best few-shot dev accuracy are kept, per layer (LM-BFF's selection
rule). Per-layer dev accuracies are returned: they go to the run record.

Probes output distributions over the task's C labels, not the vocabulary, so teacher and
student probes compare across tokenizers (a RoBERTa teacher's probes against a BERT
student's): each is built from its own model and its own label-word ids.

During distillation every probe is frozen; the student's probes read the student's live
hidden states, so gradients flow through them into the student (eq. 6-7).
"""
from __future__ import annotations

import copy
import io

import torch

from rayapp import storage
from rayapp.errors import ConfigError, DataError
from rayapp.modeling.models import is_seq2seq, mlm_head


class LayerProbes(torch.nn.Module):
    """N probes: hidden states at the mask of layers `layers` [B, N, H] -> class scores [B, N, C]."""

    def __init__(self, heads: list[torch.nn.Module], layers: list[int]):
        super().__init__()
        self.heads = torch.nn.ModuleList(heads)
        self.layers = list(layers)

    @classmethod
    def from_mlm(cls, mlm: torch.nn.Module, label_word_ids: list[list[int]], name: str = "model") -> "LayerProbes":
        """Probes for `mlm` (an HF masked LM), initialised from its MLM head restricted to
        `label_word_ids` (one list of vocabulary ids per class, the model's own tokenizer)."""
        head, decoder = mlm_head(mlm), mlm.get_output_embeddings()
        # T5's lm_head reads the decoder, not an encoder layer's state at the mask
        if head is None or not isinstance(decoder, torch.nn.Linear) or is_seq2seq(mlm.config):
            raise ConfigError(
                f"{name} ({type(mlm).__name__}) has no BERT/RoBERTa-style MLM head (cls / lm_head with a "
                "vocabulary decoder): Prompt-Distiller's probes and label-word scores need a masked LM"
            )
        layers = list(range(1, mlm.config.num_hidden_layers))
        if not layers:
            raise ConfigError(f"{name} has {mlm.config.num_hidden_layers} transformer layer(s); probes sit on every "
                              "layer but the last, so contrastive distillation (PD eq. 5-7) needs at least 2")
        bias = decoder.bias if decoder.bias is not None else torch.zeros(decoder.out_features)
        weight_rows = torch.stack([decoder.weight[ids].detach().float().mean(0) for ids in label_word_ids])
        bias_rows = torch.stack([bias[ids].detach().float().mean() for ids in label_word_ids])
        vocab_sized = [p for p in head.parameters() if p is not decoder.weight and p.shape[:1] == (decoder.out_features,)]

        def probe() -> torch.nn.Module:
            restricted = torch.nn.Linear(decoder.in_features, len(label_word_ids), device=decoder.weight.device)
            with torch.no_grad():
                restricted.weight.copy_(weight_rows)
                restricted.bias.copy_(bias_rows)
            # the head's own module with its vocabulary decoder (and the bias tied to it) swapped
            # for the restricted one: its forward is the head's (transform, then decoder)
            memo = {id(decoder): restricted, **{id(p): restricted.bias for p in vocab_sized}}
            return copy.deepcopy(head, memo).float()

        return cls([probe() for _ in layers], layers)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if states.shape[1] != len(self.heads):
            raise ConfigError(f"probes: got hidden states of {states.shape[1]} layers for {len(self.heads)} probes")
        return torch.stack([head(states[:, i].float()) for i, head in enumerate(self.heads)], dim=1)

    def probs(self, states: torch.Tensor) -> torch.Tensor:
        """PD eq. 1 per probe: [B, N, H] -> class probabilities [B, N, C]."""
        return self(states).softmax(-1)


def mask_states(hidden_states, mask_pos: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Hidden states at each row's mask for `layers`: HF `hidden_states` (M+1 tensors [B, T, H],
    index 0 = embeddings) -> [B, N, H]. Differentiable: the student's probes use it live."""
    rows = torch.arange(mask_pos.shape[0], device=mask_pos.device)
    return torch.stack([hidden_states[j][rows, mask_pos] for j in layers], dim=1)


@torch.no_grad()
def frozen_outputs(model, batches, label_word_ids: list[list[int]], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of a frozen `LogitsAt` over prompt batches (input_ids, attention_mask,
    mask_pos): (eq. 1 label-word scores [n, C], hidden states at the mask of `layers` [n, N, H]
    or None without layers), float32 on CPU. Teachers' scores feed eq. 3-4 and the
    pseudo-labels; states train probes."""
    from rayapp.tasks.prompts import class_logits

    model.eval()
    device = next(model.parameters()).device
    scores, states = [], []
    for batch in batches:
        logits, out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            positions=batch["mask_pos"].to(device), output_hidden_states=bool(layers))
        scores.append(class_logits(logits, label_word_ids).cpu())
        if layers:
            states.append(mask_states(out.hidden_states, batch["mask_pos"].to(device), layers).float().cpu())
    return torch.cat(scores), torch.cat(states) if states else None


def _accuracy(probes: LayerProbes, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (probes(states).argmax(-1) == labels[:, None]).float().mean(0)  # [N]


def fit_probes(probes: LayerProbes, train_states: torch.Tensor, train_labels: torch.Tensor,
               dev_states: torch.Tensor, dev_labels: torch.Tensor, *, steps: int = 200, lr: float = 1e-3,
               eval_every: int = 10, seed: int = 0) -> list[float]:
    """Train every probe on the frozen states of X ([n, N, H], gold labels [n]); keep, per
    layer, the weights with the best dev accuracy (first best on ties, step 0 included).
    Returns the per-layer dev accuracies of the kept probes. Deterministic given `seed`."""
    if train_states.shape[0] == 0 or dev_states.shape[0] == 0:
        raise DataError("probes need a non-empty few-shot train and dev set")
    torch.manual_seed(seed)
    probes.train()
    opt = torch.optim.AdamW(probes.parameters(), lr=lr, weight_decay=0.0)
    best = _accuracy(probes, dev_states, dev_labels)
    kept = [copy.deepcopy(h.state_dict()) for h in probes.heads]
    for step in range(1, steps + 1):
        scores = probes(train_states)  # [n, N, C]
        # sum over probes of each probe's mean CE: the probes are independent
        loss = torch.nn.functional.cross_entropy(scores.flatten(0, 1), train_labels.repeat_interleave(len(probes.heads)),
                                                 reduction="sum") / train_states.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            acc = _accuracy(probes, dev_states, dev_labels)
            for i in torch.nonzero(acc > best).flatten().tolist():
                best[i] = acc[i]
                kept[i] = copy.deepcopy(probes.heads[i].state_dict())
    for head, state in zip(probes.heads, kept):
        head.load_state_dict(state)
    probes.eval().requires_grad_(False)
    return [round(float(a), 4) for a in best]


def save_probes(probes: LayerProbes, uri: str, meta: dict) -> str:
    """Write the probes (state dict + `meta`, e.g. model, label words, dev accuracies) to `uri`
    (local or s3://); `load_probes` rebuilds them from the same model."""
    buf = io.BytesIO()
    torch.save({"layers": probes.layers, "state_dict": probes.state_dict(), "meta": meta}, buf)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def load_probes(mlm: torch.nn.Module, label_word_ids: list[list[int]], uri: str) -> tuple[LayerProbes, dict]:
    saved = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    probes = LayerProbes.from_mlm(mlm, label_word_ids)
    if probes.layers != saved["layers"]:
        raise ConfigError(f"probes at {uri} sit on layers {saved['layers']}, the model has {probes.layers}; "
                          "load them with the model they were trained on")
    probes.load_state_dict(saved["state_dict"])
    return probes.eval().requires_grad_(False), saved["meta"]
