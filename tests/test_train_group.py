"""Grouped training: K prompts in one stacked pass give each prompt exactly its own run."""

import dataclasses

import pytest
import torch

from ptx.data import collate, encode_split
from ptx.errors import PtxError
from ptx.prompt import init_prompt
from ptx.tasks import load_task
from ptx.train import TrainSettings, train_prompt
from ptx.train_group import GroupMember, _passes, score_stacked, train_group

N_TOK = 4
# tiny-llama takes the CPU prompt-once path, tiny-roberta the paper layout, tiny-t5 the encoder-decoder one
CONFIGS = [("tiny-bert", "prepend"), ("tiny-roberta", "paper"), ("tiny-t5", "prepend"), ("tiny-llama", "prepend")]


def _batch(backbone, spec, data, rows):
    return collate([data[i] for i in rows], backbone.pad_id)


@pytest.mark.parametrize(("name", "insertion"), CONFIGS)
def test_stacked_logits_equal_separate_calls(tiny, name, insertion):
    backbone = tiny(name, insertion)
    tweets, topics = load_task("tweet_sentiment"), load_task("bbc_topic")
    a = encode_split(tweets, backbone, "train", limit=8)
    b = encode_split(topics, backbone, "train", limit=8)
    batch_a, batch_b = _batch(backbone, tweets, a, range(3)), _batch(backbone, topics, b, range(2, 7))
    assert batch_a["input_ids"].shape[1] != batch_b["input_ids"].shape[1]  # the stack really pads one of them
    two = torch.stack([init_prompt(backbone, N_TOK, "random", seed=s) for s in (1, 2)])
    one = init_prompt(backbone, N_TOK, "random", seed=3)
    ids_a, ids_b = backbone.label_ids(tweets.verbalizer), backbone.label_ids(topics.verbalizer)
    with torch.no_grad():
        stacked = backbone.stacked_label_logits([(two, batch_a), (one, batch_b)], [ids_a, ids_b])
        alone_a = backbone.label_logits(two, batch_a, ids_a)
        alone_b = backbone.label_logits(one, batch_b, ids_b)
    assert stacked[0].shape == (2, 3, 3) and stacked[1].shape == (1, 5, 5)
    torch.testing.assert_close(stacked[0], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stacked[1][0], alone_b, atol=1e-5, rtol=1e-4)


def _members(backbone, lrs=(0.05, 0.02, 0.08)):
    """Three runs: two seeds of one task (own data orders and rates) and a 5-class task with early stopping."""
    tweets, topics = load_task("tweet_sentiment"), load_task("bbc_topic")
    tw_train, tw_dev = encode_split(tweets, backbone, "train", limit=24), encode_split(tweets, backbone, "dev", limit=12)
    tp_train, tp_dev = encode_split(topics, backbone, "train", limit=24), encode_split(topics, backbone, "dev", limit=10)
    base = TrainSettings(steps=6, batch_size=4, eval_every=2, eval_batch_size=8, bf16=False, dropout=False)
    return [
        GroupMember(tweets, init_prompt(backbone, N_TOK, "random", seed=0), tw_train, tw_dev,
                    dataclasses.replace(base, lr=lrs[0], seed=0), name="tweets/s0"),
        GroupMember(tweets, init_prompt(backbone, N_TOK, "random", seed=1), tw_train, tw_dev,
                    dataclasses.replace(base, lr=lrs[1], seed=1, eval_every=3, steps=5), name="tweets/s1"),
        GroupMember(topics, init_prompt(backbone, N_TOK, "random", seed=2), tp_train, tp_dev,
                    dataclasses.replace(base, lr=lrs[2], seed=2, eval_every=1, patience=2), name="topics/s2"),
    ]


class Last:
    """A report callable that keeps the last checkpoint state (its live prompt, not only the best one)."""

    state = None

    def __call__(self, metrics, step, state=None):
        self.state = state if state is not None else self.state


def _recorded(members):
    return [dataclasses.replace(m, report=Last()) for m in members]


def _alone(backbone, m):
    last = Last()
    result = train_prompt(backbone, m.spec, m.init, m.train_data, m.dev_data, m.settings, report=last)
    result.last = last.state
    return result


def _same(group, alone, last=None):
    assert (group.stopped, group.steps_done, group.best_step) == (alone.stopped, alone.steps_done, alone.best_step)
    assert [p["step"] for p in group.curve] == [p["step"] for p in alone.curve]
    assert [p["dev_metric"] for p in group.curve] == [p["dev_metric"] for p in alone.curve]
    for g, a in zip(group.curve[1:], alone.curve[1:], strict=True):
        assert g["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(group.prompt, alone.prompt, atol=1e-5, rtol=1e-4)
    if last is not None:  # the live prompt and AdamW moments at the last evaluation
        assert last.state["step"] == alone.last["step"]
        torch.testing.assert_close(last.state["prompt"], alone.last["prompt"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(last.state["optimizer"]["state"][0]["exp_avg_sq"],
                                   alone.last["optimizer"]["state"][0]["exp_avg_sq"], atol=1e-9, rtol=1e-4)


# per_pass: None is the CPU rule (one member per backbone pass); 2 stacks two members in a pass and the third alone
@pytest.mark.parametrize(("name", "insertion", "per_pass"), [("tiny-llama", "prepend", None), ("tiny-roberta", "paper", 2)])
def test_group_of_three_equals_the_three_alone(tiny, name, insertion, per_pass):
    backbone = tiny(name, insertion)
    members = _recorded(_members(backbone))
    grouped = train_group(backbone, members, per_pass=per_pass)
    for m, g in zip(members, grouped, strict=True):
        _same(g, _alone(backbone, m), m.report)
    # the runs differ from each other (own seeds, rates, tasks) and really trained
    assert [g.steps_done for g in grouped][:2] == [6, 5]
    assert not torch.allclose(members[0].report.state["prompt"], members[0].init, atol=1e-3)
    assert grouped[0].curve[1]["train_loss"] != grouped[1].curve[1]["train_loss"]


def test_a_diverging_member_fails_alone(tiny):
    backbone = tiny("tiny-llama")
    # member 1's first update makes its prompt NaN; per_pass=2: it shares its backbone pass with member 0
    members = _recorded(_members(backbone, lrs=(0.05, float("inf"), 0.08)))
    grouped = train_group(backbone, members, per_pass=2)
    assert grouped[1].stopped == "nonfinite_loss" and grouped[1].steps_done == 0 and grouped[1].best_step == 0
    torch.testing.assert_close(grouped[1].prompt, members[1].init)  # its best (the init) is kept, finite
    _same(grouped[1], _alone(backbone, members[1]))
    for i in (0, 2):  # the others train on as if it had never been there
        _same(grouped[i], _alone(backbone, members[i]), members[i].report)


def test_a_resumed_group_continues_every_member_where_it_stopped(tiny):
    backbone = tiny("tiny-llama")
    states: dict = {}

    def keeper(i):
        def report(metrics, step, state=None):
            if state is not None and step <= 2 - i // 2:  # member 2 at step 1, before its early stop
                states[i] = state
        return report

    members = [dataclasses.replace(m, report=keeper(i)) for i, m in enumerate(_members(backbone))]
    whole = train_group(backbone, members)
    assert sorted(states) == [0, 2] and (states[0]["step"], states[2]["step"]) == (2, 1)  # member 1 first evaluates at step 3
    resumed = [dataclasses.replace(m, report=None, resume=states.get(i)) for i, m in enumerate(members)]
    again = train_group(backbone, resumed)
    for w, a in zip(whole, again, strict=True):
        _same(a, w)


def test_stacked_dev_scores_equal_score_prompts(tiny):
    from ptx.evaluate import score_prompts

    backbone = tiny("tiny-bert")
    members = _members(backbone)
    items = [(m.init, m.spec, m.dev_data, 4) for m in members]
    want = [score_prompts(backbone, m.init, m.spec, m.dev_data, 4)[0] for m in members]
    # one pass for all, the CPU rule (one prompt per pass: the shared tweets split is split), and 2 + 1
    for per_pass in (3, None, 2):
        assert score_stacked(backbone, items, per_pass) == want, per_pass


def test_passes_split_segments_into_at_most_per_pass_prompts():
    """The members of a step (or the prompts of a dev split) in passes of at most per_pass prompts, in order."""
    two, one = torch.arange(2.0)[:, None, None].expand(2, 3, 1), torch.full((1, 3, 1), 2.0)
    segments = [(two, "batch a"), (one, "batch b")]

    def layout(per_pass):
        return [[(p[:, 0, 0].tolist(), b, i) for (p, b), i in zip(chunk, owners, strict=True)]
                for chunk, owners in _passes(segments, per_pass)]

    assert layout(3) == [[([0.0, 1.0], "batch a", 0), ([2.0], "batch b", 1)]]
    assert layout(2) == [[([0.0, 1.0], "batch a", 0)], [([2.0], "batch b", 1)]]
    assert layout(1) == [[([0.0], "batch a", 0)], [([1.0], "batch a", 0)], [([2.0], "batch b", 1)]]


def test_a_group_refuses_mixed_prompt_lengths_and_generation_tasks(tiny):
    backbone = tiny("tiny-bert")
    members = _members(backbone)
    longer = dataclasses.replace(members[1], init=init_prompt(backbone, N_TOK + 1, "random", seed=1))
    with pytest.raises(PtxError, match=r"group tweets/s1: prompt length 5; .* length 4"):
        train_group(backbone, [members[0], longer])
    squad = dataclasses.replace(members[0], spec=load_task("squad"))
    with pytest.raises(PtxError, match=r"task 'squad' is a generation task"):
        train_group(backbone, [squad])


def test_group_dropout_trains_in_train_mode_and_scores_in_eval_mode(tiny):
    """train.dropout applies to groups as to single runs: masks change the losses, scoring and the end are eval mode."""
    backbone = tiny("tiny-bert")
    members = _members(backbone)[:2]
    on = [dataclasses.replace(m, settings=dataclasses.replace(m.settings, dropout=True)) for m in members]
    modes = []
    real_eval = backbone.model.eval

    def spy_eval():  # record the mode each scoring pass switched away from
        modes.append(backbone.model.training)
        return real_eval()

    backbone.model.eval = spy_eval
    try:
        with_dropout = train_group(backbone, on)
    finally:
        del backbone.model.eval
    without = train_group(backbone, members)
    assert True in modes  # training ran in train mode before an evaluation switched to eval
    assert backbone.model.training is False
    assert with_dropout[0].curve[1]["train_loss"] != pytest.approx(without[0].curve[1]["train_loss"])
    mixed = [on[0], members[1]]
    with pytest.raises(PtxError, match=r"train.dropout=False; a group runs one pass in one mode"):
        train_group(backbone, mixed)
