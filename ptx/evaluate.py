"""Scoring prompts on a task: many prompts per forward pass over one tokenized split."""

import logging

import torch
from tqdm.auto import tqdm

from ptx.data import iterate_batches
from ptx.errors import PtxError
from ptx.metrics import METRICS

log = logging.getLogger(__name__)


def bf16_autocast(backbone):
    """bf16 autocast on CUDA; a disabled autocast elsewhere (CPU runs stay fp32)."""
    enabled = backbone.device.type == "cuda"
    return torch.autocast(device_type=backbone.device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def predict_labels(backbone, prompts: torch.Tensor, encoded, label_ids: torch.Tensor, batch_size: int = 32,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted label indices [P, N] for prompts [P, n, d], and the gold labels [N] in the same order."""
    preds, golds = [], []
    it = iterate_batches(encoded, batch_size, backbone.pad_id, seed=None)
    total = (len(encoded) + batch_size - 1) // batch_size
    for batch in tqdm(it, total=total, disable=not progress, desc="evaluating", leave=False):
        with bf16_autocast(backbone):
            logits = backbone.label_logits(prompts.to(backbone.device), batch, label_ids)  # [P, B, L]
        preds.append(logits.argmax(-1).cpu())
        golds.append(batch["labels"])
    return torch.cat(preds, dim=1), torch.cat(golds)


def score_prompts(backbone, prompts: torch.Tensor, spec, encoded, batch_size: int = 32,
                  progress: bool = False) -> list[float]:
    """The task metric of each prompt in `prompts` [P, n, d] (or [n, d]) on an encoded split."""
    if prompts.dim() == 2:
        prompts = prompts[None]
    if len(encoded) == 0:
        raise PtxError(f"task '{spec.name}': the evaluation split is empty")
    metric = METRICS[spec.metric]
    if spec.kind == "generation":
        return [_score_generation(backbone, p, spec, encoded, batch_size, metric) for p in prompts]
    label_ids = backbone.label_ids(spec.label_words(backbone.kind))
    preds, golds = predict_labels(backbone, prompts, encoded, label_ids, batch_size, progress)
    gold = golds.tolist()
    return [float(metric(p.tolist(), gold)) for p in preds]


def _score_generation(backbone, prompt, spec, encoded, batch_size, metric) -> float:
    preds, refs = [], []
    for batch in iterate_batches(encoded, batch_size, backbone.pad_id, seed=None):
        preds += backbone.generate(prompt, batch, max_new_tokens=spec.max_new_tokens)
        if "references" not in batch:  # a split encoded without them cannot be scored honestly
            raise PtxError(f"task '{spec.name}': the encoded split has no references column (encoded by an older "
                           "ptx); clear the encoded cache (ptx cache dir, encoded/) and encode it again")
        refs += batch["references"]
    return float(metric(preds, refs))
