"""Rows -> model inputs: prompt batches, teacher-cache batches, masked-LM batches."""
from __future__ import annotations

import numpy as np
import torch

from rayapp.tasks.prompts import PromptEncoder, pad_ids


def cache_batch(rows: dict, pad_id: int) -> dict:
    """Teacher-cache rows -> tensors: the student reuses the teacher's tokenisation."""
    ids, mask = pad_ids(rows["input_ids"], pad_id)
    return {"input_ids": ids, "attention_mask": mask,
            "mask_pos": torch.as_tensor(np.asarray(rows["mask_pos"], dtype=np.int64)),
            "topk_values": torch.as_tensor(np.stack(rows["topk_values"]).astype(np.float32)),
            "topk_indices": torch.as_tensor(np.stack(rows["topk_indices"]).astype(np.int64)),
            "lse": torch.as_tensor(np.asarray(rows["lse"], dtype=np.float32))}


def prompt_batch(rows: dict, encoder: PromptEncoder) -> dict:
    """Example rows (text_a[, text_b][, label]) in the task's prompt."""
    texts_b = list(rows["text_b"]) if encoder.task.num_inputs == 2 else None
    batch = encoder.encode_batch(list(rows["text_a"]), texts_b)
    if "label" in rows:
        batch["labels"] = torch.as_tensor(np.asarray(rows["label"], dtype=np.int64))
    return batch


class MLMBatcher:
    """Raw text rows (`text`) -> BERT-style masked batches (HF's DataCollatorForLanguageModeling:
    15% of the non-special tokens chosen; 80% [MASK], 10% random, 10% kept), labels under
    `mlm_labels` (-100 elsewhere). Seeded, so the masking of a run is reproducible."""

    def __init__(self, tokenizer, max_length: int, probability: float = 0.15, seed: int = 0):
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer, self.max_length = tokenizer, max_length
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability, seed=seed)

    def __call__(self, rows: dict) -> dict:
        enc = self.tokenizer(list(rows["text"]), truncation=True, max_length=self.max_length,
                             return_special_tokens_mask=True)
        out = self.collator([dict(zip(enc, values)) for values in zip(*enc.values())])
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "mlm_labels": out["labels"]}
