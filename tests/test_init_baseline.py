"""The untrained-init baseline (issue 32): each task's own prompts' starts scored beside the tuned prompts and the
seeded random prompts, and the paired own-vs-baselines verdict that reads them."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ptx import verdicts
from ptx.data import encode_split
from ptx.evaluate import score_prompts
from ptx.findings import Verdict
from ptx.prompt import backbone_meta, init_prompt, init_record
from ptx.tasks import load_task
from ptx.transfer import INIT, RANDOM, init_sources, transfer_matrix

TEXT = "Read the text and answer with one word: {labels}."


@pytest.fixture(scope="module")
def llama(tiny):
    return tiny("tiny-llama")


def _trained(bb, task, seed, mode="text_noise"):
    """A bank prompt as the train stage leaves it: a tensor that moved away from its recorded start."""
    text = load_task(task).instruction(TEXT) if mode == "text_noise" else None
    start = init_prompt(bb, 6, mode, seed=seed, text=text, task=task)
    meta = {"backbone": backbone_meta(bb), "task": {"name": task}, "insertion": "prepend", "n_tokens": 6,
            "seed": seed, "init": init_record(mode, seed, task, text)}
    moved = start + torch.randn(start.shape, generator=torch.Generator().manual_seed(99 + seed)) * 0.5
    return (moved, meta), start


def _bank(bb):
    (tw0, s0), (tw1, s1), (dr, _) = (_trained(bb, "tweet_sentiment", 0), _trained(bb, "tweet_sentiment", 1),
                                     _trained(bb, "drug_sentiment", 0, mode="random"))
    imported = (tw0[0] * 2, {**tw0[1], "init": {"mode": None, "source": "imported"}})
    return {"tw0": tw0, "tw1": tw1, "dr": dr, "imp": imported}, {"tw0": s0, "tw1": s1}


def test_init_sources_are_the_targets_own_prompts_rebuilt_starts(llama):
    bank, starts = _bank(llama)
    got = init_sources(llama, bank, "tweet_sentiment")
    # the other task's prompt is not tweet's baseline; the imported one has no start to rebuild
    assert [s.name for s in got] == ["init:tw0", "init:tw1"]
    assert all(s.task == INIT and s.category == INIT for s in got)
    assert torch.equal(got[0].prompt, starts["tw0"]) and torch.equal(got[1].prompt, starts["tw1"])
    assert [s.name for s in init_sources(llama, bank, "drug_sentiment")] == ["init:dr"]


def test_matrix_scores_the_starts_in_the_predictions_only(llama):
    """The starts' per-example answers reproduce their own score (worked out by scoring each start alone); the
    matrix itself keeps its rows and values (its consumers read every non-random row as a bank prompt)."""
    bank, starts = _bank(llama)
    preds, plain_preds = [], []
    df = transfer_matrix(llama, bank, ["tweet_sentiment"], ("dev",), 12, seed=3, predictions=preds,
                         init_baseline=True).to_pandas()
    plain = transfer_matrix(llama, bank, ["tweet_sentiment"], ("dev",), 12, seed=3,
                            predictions=plain_preds).to_pandas()
    assert df.equals(plain)
    p = pd.DataFrame(preds)
    assert sorted(set(p.source_prompt_run) - set(pd.DataFrame(plain_preds).source_prompt_run)) == ["init:tw0",
                                                                                                 "init:tw1"]
    spec = load_task("tweet_sentiment")
    encoded = encode_split(spec, llama, "dev", limit=12)
    for name, start in starts.items():
        alone = score_prompts(llama, start, spec, encoded)[0]
        mine = p[p.source_prompt_run == f"init:{name}"]
        assert len(mine) == 12 and (mine.pred == mine.label).mean() == pytest.approx(alone)
    assert RANDOM in set(df.source_prompt_run) and not any(df.source_prompt_run.str.startswith(INIT))


def test_stage_chunk_scores_the_starts_of_its_own_task_prompts(llama):
    """The transfer stage's Ray task body, called in-process (it is a plain function): a chunk holding own-task
    prompts scores their starts when the stage asks for the init baseline, and not otherwise."""
    from ptx.stages.transfer import run_chunk

    bank, _ = _bank(llama)
    chunk = {"backbone": "tiny-llama", "insertion": "prepend", "target": "tweet_sentiment", "seed": 0,
             "splits": ["dev"], "limits": {"dev": 8}, "prompts": {k: bank[k] for k in ("tw1", "dr")},
             "random_tokens": None, "random_prompts": 0, "prompts_per_pass": 4, "batch_size": 8,
             "init_baseline": True}
    got = run_chunk(chunk)
    assert sorted({n for n, _, _ in got["scores"]}) == ["dr", "init:tw1", "tw1"]
    assert sorted({r["source_prompt_run"] for r in got["predictions"]}) == ["init:tw1", "tw1"]
    without = run_chunk({**chunk, "init_baseline": False})
    assert sorted({n for n, _, _ in without["scores"]}) == ["dr", "tw1"]


def test_transfer_init_baseline_keeps_every_existing_spec_hash():
    from ptx.config import load_study

    for name, digest in (("paper_roberta_base", "42245179e84bb4d0"), ("demo", "4192067e4ec169a8"),
                         ("smoke", "1633420312e376a5")):
        spec = load_study(f"experiments/{name}.yaml")
        assert spec.transfer.init_baseline is False and spec.hash() == digest
        assert load_study(f"experiments/{name}.yaml", ["transfer.init_baseline=true"]).hash() != digest


def _answers(labels, wrong_at):
    out = labels.copy()
    out[list(wrong_at)] = 1 - out[list(wrong_at)]
    return out


def test_report_tests_each_prompt_against_its_start_and_every_baseline():
    """bbc_topic's own prompt (wrong on 2 of 80) beats both random prompts and its start (wrong on 30: own right
    on 28 discordant examples, the start on none); drug_sentiment's equals its start answer for answer (no
    discordant example: p = 1), so it beats the random prompts' family or not but never every baseline."""
    from ptx.report import _init_paragraph
    from ptx.report_data import own_vs_random

    labels = np.array([0, 1] * 40)
    answers = {("bbc_topic", "run-b"): _answers(labels, range(0, 2)),
               ("bbc_topic", "random:0"): _answers(labels, range(2, 22)),
               ("bbc_topic", "random:1"): _answers(labels, range(40, 60)),
               ("bbc_topic", "init:run-b"): _answers(labels, range(0, 30)),
               ("drug_sentiment", "run-d"): _answers(labels, range(0, 10)),
               ("drug_sentiment", "random:0"): _answers(labels, range(5, 17)),
               ("drug_sentiment", "init:run-d"): _answers(labels, range(0, 10))}
    preds = pd.DataFrame([{"target_task": t, "split": "test", "source_prompt_run": r, "example": i, "pred": int(v),
                           "label": int(labels[i])} for (t, r), a in answers.items() for i, v in enumerate(a)])
    rows = []
    for target, run in (("bbc_topic", "run-b"), ("drug_sentiment", "run-d")):
        acc = {r: float((a == labels).mean()) for (t, r), a in answers.items() if t == target}
        rand = [v for r, v in acc.items() if r.startswith("random:")]
        rows += [{"source_prompt_run": run, "source_task": target, "target_task": target, "metric": "accuracy",
                  "value": acc[run], "split": "test", "n_examples": 80},
                 {"source_prompt_run": "random", "source_task": "random", "target_task": target,
                  "metric": "accuracy", "value": sum(rand) / len(rand), "split": "test", "n_examples": 80}]
    got = {o["target_task"]: o for o in own_vs_random(pd.DataFrame(rows), "test", preds)}
    bbc, drug = got["bbc_topic"], got["drug_sentiment"]
    assert bbc["init"] == pytest.approx(50 / 80) and drug["init"] == pytest.approx(70 / 80)
    assert bbc["init_finding"].estimate == pytest.approx(78 / 80 - 50 / 80)
    assert bbc["init_finding"].p_value == pytest.approx(2 / 2 ** 28)  # 28 discordant, all the own prompt's
    assert bbc["init_finding"].verdict is Verdict.YES and bbc["baselines"] is Verdict.YES
    assert "untrained start" in bbc["init_finding"].test
    assert drug["init_finding"].verdict is Verdict.INCONCLUSIVE and drug["init_finding"].p_value == 1.0
    assert drug["baselines"] is Verdict.INCONCLUSIVE
    text = _init_paragraph("smollm2-135m", {"split": "test"}, list(got.values()))[0]
    assert "Did tuning improve on the untrained start? Partly" in text
    assert "1 of 2 own-task prompts beat their own untrained start" in text and "1 of 2 beat every baseline" in text
    # a transfer run without the starts: no init keys, no paragraph
    bare = own_vs_random(pd.DataFrame(rows), "test", preds[~preds.source_prompt_run.str.startswith("init:")])
    assert all("init_finding" not in o for o in bare) and _init_paragraph("b", {"split": "test"}, bare) == []


def test_own_vs_baselines_is_yes_only_when_every_family_is_beaten():
    def f(v):
        return verdicts.Finding(0.0, math.nan, math.nan, 0.0, v, "t", 1)

    Y, N, I = Verdict.YES, Verdict.NO, Verdict.INCONCLUSIVE  # noqa: E741
    assert verdicts.own_vs_baselines([f(Y), f(Y)]) is Y
    assert verdicts.own_vs_baselines([f(Y), f(I)]) is I
    assert verdicts.own_vs_baselines([f(Y), f(N)]) is I
    assert verdicts.own_vs_baselines([f(N), f(N)]) is N
    assert verdicts.own_vs_baselines([]) is I
