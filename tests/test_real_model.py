"""Real models (slow, run in CI): SmolLM2-135M learns tweet_sentiment by prompt tuning; MiniLM-L6 scores labels.

SmolLM2 is converted once into $PTX_CACHE_DIR (CI keeps that dir, so later runs skip the conversion).
"""

from collections import Counter

import pytest
import torch

from ptx.backbones import BackboneKind, load_backbone
from ptx.data import collate, encode_split
from ptx.evaluate import score_prompts
from ptx.prompt import init_prompt
from ptx.tasks import load_task
from ptx.train import TrainSettings, train_prompt

pytestmark = pytest.mark.slow


def test_smollm2_prompt_tuning_beats_the_majority_class():
    """A 20-token prompt, 60 steps: held-out test accuracy well above always answering the majority class.

    Text init (an instruction) rather than vocab init: with vocab init the 64-example dev set picked prompts
    that scored below the majority class on test (observed 0.375 vs 0.430), with text init 0.48 to 0.56.
    """
    backbone = load_backbone("smollm2-135m")
    assert backbone.kind is BackboneKind.CAUSAL_LM and backbone.d_model == 576
    spec = load_task("tweet_sentiment")
    train = encode_split(spec, backbone, "train", limit=1000)
    dev = encode_split(spec, backbone, "dev", limit=64)
    test = encode_split(spec, backbone, "test", limit=200)
    majority = max(Counter(test["label"]).values()) / len(test)
    init = init_prompt(backbone, 20, "text", text="Classify the sentiment of the tweet as negative, neutral or positive.")
    settings = TrainSettings(steps=60, batch_size=8, lr=0.01, eval_every=20, eval_batch_size=32, seed=0)
    result = train_prompt(backbone, spec, init, train, dev, settings)
    before, after = score_prompts(backbone, torch.stack([init, result.prompt]), spec, test, batch_size=32)
    print(f"smollm2 tweet_sentiment: test accuracy {after:.3f} (init {before:.3f}, majority {majority:.3f}); "
          f"best dev {result.best_metric:.3f} at step {result.best_step}; {result.seconds:.0f} s")
    assert result.stopped == "max_steps" and result.best_step > 0
    assert after > majority + 0.05, (after, majority)


def test_minilm_loads_as_masked_lm_and_scores_labels():
    backbone = load_backbone("minilm-l6")
    assert backbone.kind is BackboneKind.MASKED_LM and backbone.d_model == 384 and backbone.n_layers == 6
    label_ids = backbone.label_ids(["negative", "neutral", "positive"])
    rows = []
    for text in ("what a great movie . it was", "the worst day of my life . it was"):
        ids, score = backbone.encode(text, ".", 64)
        assert ids[score] == backbone.tokenizer.mask_token_id
        rows.append({"input_ids": ids, "score_index": score})
    batch = collate(rows, backbone.pad_id)
    prompt = init_prompt(backbone, 8, "vocab", seed=0)
    with torch.no_grad():
        logits = backbone.label_logits(prompt, batch, label_ids)
        # the label-rows head equals the full MLM head at the mask
        x = torch.cat([prompt.expand(2, -1, -1), backbone.input_embeddings()[batch["input_ids"]]], dim=1)
        mask = torch.cat([torch.ones(2, 8, dtype=torch.long), batch["attention_mask"]], dim=1)
        full = backbone.model(inputs_embeds=x, attention_mask=mask).logits
        want = full[torch.arange(2), 8 + batch["score_index"]][:, label_ids]
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
