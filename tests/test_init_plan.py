"""The findings study's init plan: every (seed, task) prompt starts from its own tensor (issue 32), and the
text_noise init mode that gives it those starts."""

import dataclasses
from pathlib import Path

import pytest
import torch

from ptx.config import load_study
from ptx.prompt import (
    TEXT_NOISE_SCALE,
    init_plan,
    init_prompt,
    init_record,
    init_seed,
    reconstruct_init,
    shared_starts,
)

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ROOT / "experiments" / "findings_cpu.yaml"


def plan_tensors(plan, backbone):
    return [e.tensor(backbone) for e in plan]


def test_findings_plan_gives_every_seed_and_task_its_own_start(tiny):
    spec = load_study(FINDINGS)
    plan = init_plan(spec)
    assert len(plan) == len(spec.backbones) * len(spec.tasks) * len(spec.seeds)
    assert {(e.seed, e.task) for e in plan} == {(s, t) for s in spec.seeds for t in spec.tasks}
    assert shared_starts(plan) == []
    # the tensors themselves, on a small backbone (the recipe is the backbone's: same calls, smaller table)
    tensors = plan_tensors(plan, tiny("tiny-llama"))
    assert shared_starts(plan, tensors) == []
    # and no two are merely close: the smallest distance between two starts is a sizeable share of a start's norm
    flat = torch.stack([t.flatten() for t in tensors])
    dist = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert float(dist.min()) > 0.2 * float(flat.norm(dim=1).min())


def test_the_old_text_init_shares_one_start_and_the_check_sees_it(tiny):
    """`init: text` ignores seed and task: the three seeds of a task share a tensor, and tweet_sentiment and
    drug_sentiment (the same label words) share one too: 6 sentiment prompts from one tensor."""
    spec = dataclasses.replace(load_study(FINDINGS), init="text")
    plan = init_plan(spec)
    tensors = plan_tensors(plan, tiny("tiny-llama"))
    pairs = {frozenset([(a.seed, a.task), (b.seed, b.task)]) for a, b in shared_starts(plan, tensors)}
    assert pairs == {frozenset(p) for p in _expected_text_pairs(spec)}
    assert {frozenset([(a.seed, a.task), (b.seed, b.task)]) for a, b in shared_starts(plan)} == pairs


def _expected_text_pairs(spec):
    """Worked out by hand from the tasks' label words: same task, any two seeds; tweet_sentiment and
    drug_sentiment across seeds too (both "negative, neutral or positive")."""
    sentiment = [(s, t) for t in ("tweet_sentiment", "drug_sentiment") for s in spec.seeds]
    groups = [sentiment] + [[(s, t) for s in spec.seeds] for t in spec.tasks if t not in ("tweet_sentiment",
                                                                                          "drug_sentiment")]
    return [(a, b) for g in groups for i, a in enumerate(g) for b in g[i + 1:]]


def test_text_noise_is_the_instruction_plus_seeded_noise(tiny):
    bb = tiny("tiny-llama")
    text = "Read the text and answer with one word: bad or good."
    base = init_prompt(bb, 12, "text", text=text)
    a = init_prompt(bb, 12, "text_noise", seed=1, text=text, task="t1")
    again = init_prompt(bb, 12, "text_noise", seed=1, text=text, task="t1")
    other_task = init_prompt(bb, 12, "text_noise", seed=1, text=text, task="t2")
    other_seed = init_prompt(bb, 12, "text_noise", seed=2, text=text, task="t1")
    assert torch.equal(a, again)
    assert not torch.equal(a, other_task) and not torch.equal(a, other_seed)
    noise = a - base
    emb_sd = float(bb.input_embeddings().detach().float().std())
    expected = torch.randn(12, bb.d_model, generator=torch.Generator().manual_seed(init_seed(1, "t1")))
    torch.testing.assert_close(noise, expected * TEXT_NOISE_SCALE * emb_sd, rtol=1e-5, atol=1e-6)


def test_text_noise_start_is_rebuilt_from_its_record(tiny):
    bb = tiny("tiny-llama")
    text = "Answer: bad or good."
    start = init_prompt(bb, 7, "text_noise", seed=3, text=text, task="some_task")
    meta = {"n_tokens": 7, "seed": 3, "init": init_record("text_noise", 3, "some_task", text)}
    assert meta["init"] == {"mode": "text_noise", "source": None, "seed": init_seed(3, "some_task"), "text": text}
    assert torch.equal(reconstruct_init(meta, bb), start)
    assert reconstruct_init({"n_tokens": 7, "init": {"mode": "text_noise", "text": text}}, bb) is None


def test_text_noise_needs_a_text(tiny):
    from ptx.errors import PtxError

    with pytest.raises(PtxError, match="init mode 'text_noise' needs --init-text"):
        init_prompt(tiny("tiny-llama"), 4, "text_noise", seed=0)
