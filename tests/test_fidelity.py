"""Scientific fidelity (docs/fidelity.md): per-task inits, displacement and within-seed indicators, the paper's
verbalizers, generation metrics over every full reference, dropout, the T5 loss, position limits. Each test fails
on the code before these protocols."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ptx import indicators as ind
from ptx.errors import PtxError
from ptx.metrics import METRICS
from ptx.prompt import init_prompt, init_record, init_seed, reconstruct_init
from ptx.tasks import list_tasks, load_task, load_task_file
from ptx.train import TrainSettings, train_prompt

PAPER_TASKS = ("imdb", "sst2", "laptop", "restaurant", "movie_rationales", "tweet_eval_sentiment", "mnli", "qnli",
               "snli", "ethics_deontology", "ethics_justice", "qqp", "mrpc")


# ---- 2. inits seeded by (seed, task); displacement and within-seed indicators -------------------------------
@pytest.mark.parametrize("mode", ["random", "vocab"])
def test_inits_differ_between_tasks_and_are_reproducible(tiny, mode):
    bb = tiny("tiny-bert")
    a, b = init_prompt(bb, 6, mode, seed=0, task="sst2"), init_prompt(bb, 6, mode, seed=0, task="mnli")
    assert not torch.equal(a, b)  # before: both tasks of seed 0 started from one prompt
    assert torch.equal(a, init_prompt(bb, 6, mode, seed=0, task="sst2"))
    assert not torch.equal(a, init_prompt(bb, 6, mode, seed=1, task="sst2"))
    # no task: the seed alone, as before (random baselines, released prompts)
    assert torch.equal(init_prompt(bb, 6, mode, seed=3), init_prompt(bb, 6, mode, seed=init_seed(3)))
    # prompt.json's init record rebuilds the start exactly
    meta = {"n_tokens": 6, "seed": 0, "init": init_record(mode, 0, "sst2")}
    assert torch.equal(reconstruct_init(meta, bb), a)
    legacy = {"n_tokens": 6, "seed": 5, "init": {"mode": mode, "source": None}}  # written before per-task seeds
    assert torch.equal(reconstruct_init(legacy, bb), init_prompt(bb, 6, mode, seed=5))
    assert reconstruct_init({"n_tokens": 6, "init": {"mode": "imported"}}, bb) is None


def test_run_prompt_records_a_rebuildable_per_task_init(tiny, tmp_path):
    from ptx.prompt import load_prompt
    from ptx.prompt_runs import PromptRequest, run_prompt

    bb = tiny("tiny-llama")
    settings = TrainSettings(steps=1, batch_size=4, eval_every=1, eval_batch_size=8)
    arts = {}
    for task in ("tweet_sentiment", "drug_sentiment"):
        req = PromptRequest(task=task, backbone="tiny-llama", prompt_length=4, train_limit=8, dev_limit=8,
                            settings=settings)
        arts[task] = load_prompt(run_prompt(req, tmp_path, backbone=bb).artifact)
    inits = {t: reconstruct_init(a.meta, bb) for t, a in arts.items()}
    assert arts["tweet_sentiment"].meta["init"]["seed"] == init_seed(0, "tweet_sentiment")
    assert torch.equal(inits["tweet_sentiment"], init_prompt(bb, 4, "random", seed=0, task="tweet_sentiment"))
    assert not torch.equal(inits["tweet_sentiment"], inits["drug_sentiment"])


def test_shared_init_inflates_raw_similarity_not_displacement():
    """Two prompts of different tasks from one init: raw similarity is high, displacement similarity is zero."""
    g = torch.Generator().manual_seed(0)
    shared, other = torch.randn(4, 8, generator=g) * 3, torch.randn(4, 8, generator=g) * 3
    d1, d2, d3 = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(4, 8)
    d1[:, 0], d2[:, 1], d3[:, 2] = 0.5, 0.5, 0.5  # orthogonal updates: three unrelated tasks
    prompts = torch.stack([shared + d1, shared + d2, other + d3])
    inits = torch.stack([shared, shared, other])
    raw = ind.embedding_similarities(prompts)
    disp = ind.displacement_similarities(prompts, inits)
    assert raw["e_concat_cos"][0, 1] > 0.95 and abs(raw["e_concat_cos"][0, 2]) < 0.5  # the shared start shows
    assert disp["e_concat_cos_disp"][0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert disp["e_concat_cos_disp"][0, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert disp["mean_cos_disp"][0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert disp["e_concat_euclid_disp"][0, 1].item() == pytest.approx(1 / (1 + (d1 - d2).norm().item()), abs=1e-6)
    # ON: one shared init mask (4 of 8 neurons active); each training flips one other neuron
    m0 = torch.tensor([[[1, 1, 1, 1, 0, 0, 0, 0]]], dtype=torch.bool)
    flip1, flip2 = torch.zeros_like(m0), torch.zeros_like(m0)
    flip1[..., 4], flip2[..., 5] = True, True
    masks, init_masks = torch.cat([m0 ^ flip1, m0 ^ flip2]), torch.cat([m0, m0])
    from ptx.activations import overlap_matrices

    assert overlap_matrices(masks, k=1)["on"][0, 1].item() == pytest.approx(4 / 5)  # 4 shared of 5 and 5 active
    on_disp = ind.displacement_overlap(masks, init_masks)
    assert on_disp["on_disp"][0, 1].item() == 0.0 and on_disp["on_jaccard_disp"][0, 1].item() == 0.0
    assert on_disp["on_disp"][0, 0].item() == pytest.approx(1.0)


def test_within_seed_correlation(tmp_path):
    """Indicator = transfer inside a seed, its negation across seeds: within-seed rho is 1, pooled undefined."""
    tasks = ["t0", "t1", "t2", "t3"]
    runs = [(f"{t}-s{s}", t, str(s)) for s in (0, 1) for t in tasks]
    ids, run_tasks, seeds = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]
    g = np.array([[0, 1, 2, 3], [1, 0, 5, 4], [2, 5, 0, 6], [3, 4, 6, 0]], float)  # transfer by (source, target)
    rows = [{"source_prompt_run": rid, "source_task": t, "target_task": target, "split": "dev", "metric": "accuracy",
             "relative_value": g[tasks.index(t), tasks.index(target)]}
            for rid, t, _ in runs for target in tasks]
    table = pd.DataFrame(rows)
    mat = torch.tensor([[g[tasks.index(a[1]), tasks.index(b[1])] * (1 if a[2] == b[2] else -1) for b in runs]
                        for a in runs])
    ws = ind.within_seed(table, {"x": mat}, ids, run_tasks, seeds, ["x"], methods=("spearman",))
    assert ws.to_dict("records") == [{"indicator": "x", "method": "spearman", "within_seed": 1.0, "n_within_seed": 8}]
    tables = ind.analyse(table, {"e_concat_cos": mat}, ids, run_tasks, None, tmp_path, bootstrap=10, seeds=seeds)
    row = tables["correlations"].set_index(["indicator", "method"]).loc[("e_concat_cos", "spearman")]
    assert row["within_seed"] == 1.0 and row["n_within_seed"] == 8
    assert np.isnan(row["mean_over_targets"])  # averaged over both seeds' own prompts, the indicator is constant


def test_e_avg_euclid_is_one_over_one_plus_the_mean_distance():
    a = torch.tensor([[[0.0, 0.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # token-pair distances from prompt 0 to prompt 1: 0, 0, 5, 5 -> mean 2.5 -> 1 / 3.5 (not the mean of 1/(1+d): 0.583)
    assert ind.embedding_similarities(a)["e_avg_euclid"][0, 1].item() == pytest.approx(1 / 3.5)


# ---- 3. the paper's verbalizers ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["masked_lm", "seq2seq", "causal_lm"])
def test_paper_task_categories_share_no_label_word(kind):
    specs = {t.name: t for t in list_tasks() if t.name in PAPER_TASKS}
    assert set(specs) == set(PAPER_TASKS)
    words: dict = {}
    for spec in specs.values():
        words.setdefault(spec.category, set()).update(spec.label_words(kind))
    cats = sorted(words)
    assert cats == ["ethics", "nli", "paraphrase", "sentiment"]
    for i, a in enumerate(cats):
        for b in cats[i + 1:]:
            assert not words[a] & words[b], f"{kind}: {a} and {b} share {words[a] & words[b]}"


def test_paper_words_per_backbone_kind():
    # T5 keeps yes / neutral / no: the authors' T5 word "entailment" is four T5 pieces (see mnli.yaml)
    expect = {("mnli", "masked_lm"): ("yes", "neutral", "no"), ("mnli", "seq2seq"): ("yes", "neutral", "no"),
              ("qnli", "seq2seq"): ("yes", "no"), ("snli", "causal_lm"): ("yes", "neutral", "no"),
              ("ethics_justice", "seq2seq"): ("unacceptable", "acceptable"), ("qqp", "masked_lm"): ("false", "true"),
              ("tweet_eval_sentiment", "seq2seq"): ("negative", "moderate", "positive"),
              ("sst2", "masked_lm"): ("negative", "positive")}
    for (task, kind), words in expect.items():
        assert load_task(task).label_words(kind) == words, (task, kind)


def test_verbalizer_by_kind_sets_one_kinds_words_and_is_validated(tmp_path):
    import yaml

    from ptx.tasks import TASKS_DIR

    base = yaml.safe_load((TASKS_DIR / "qnli.yaml").read_text())
    path = tmp_path / "qnli.yaml"
    path.write_text(yaml.safe_dump({**base, "verbalizer_by_kind": {"seq2seq": ["entailment", "contradiction"]}}))
    spec = load_task_file(path)
    assert spec.label_words("seq2seq") == ("entailment", "contradiction")
    assert spec.label_words("masked_lm") == spec.verbalizer == ("yes", "no")
    for bad, msg in (({"seq2sq": ["a", "b"]}, r"verbalizer_by_kind\.seq2sq': unknown backbone kind; did you mean 'seq2seq'"),
                     ({"seq2seq": ["a"]}, r"verbalizer_by_kind\.seq2seq': expected 2 words"),
                     ({"seq2seq": ["a", "a"]}, "distinct")):
        path = tmp_path / "qnli.yaml"
        path.write_text(yaml.safe_dump({**base, "verbalizer_by_kind": bad}))
        with pytest.raises(PtxError, match=msg):
            load_task_file(path)


def test_minilm_tokenizer_has_every_paper_word_as_one_token():
    """WordPiece (uncased BERT family, the offline minilm-l6): every masked-LM label word is one token."""
    from transformers import AutoTokenizer

    from ptx.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6").path)
    words = {w for t in PAPER_TASKS for w in load_task(t).label_words("masked_lm")}
    split = {w: tok.tokenize(w) for w in words if len(tok.tokenize(w)) != 1}
    assert not split


# ---- 5. generation metrics ----------------------------------------------------------------------------------
def test_rouge_l_stems_and_ignores_punctuation():
    # rouge-score: "cats" stems to "cat", "mat." is "mat": LCS the-cat-sat-on-mat = 5 of 6 and 6 -> F 5/6
    assert METRICS["rouge_l"](["The cats sat on the mat."], ["the cat sat on a mat"]) == pytest.approx(5 / 6)


def _qa_task(tmp_path, answers: list[list[str]], budget: int = 6):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):  # distinct questions: a train row repeating a test input is dropped
        rows = [{"question": f"{split} question {i} about the film", "answers": a} for i, a in enumerate(answers)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec_file = tmp_path / "qa_tiny.yaml"
    spec_file.write_text(
        "name: qa_tiny\nversion: 1\ncategory: qa\nkind: generation\n"
        "source: {files: {train: train.jsonl, dev: dev.jsonl, test: test.jsonl}}\n"
        f"preprocess: answer_list\ntemplate: 'question: {{question}}'\ntarget_column: answers\n"
        f"metric: f1\nmax_length: 32\nmax_new_tokens: {budget}\n")
    return load_task_file(spec_file)


def test_generation_scores_against_every_full_reference(tiny, tmp_path):
    from ptx.data import encode_split, iterate_batches
    from ptx.evaluate import score_prompts

    bb = tiny("tiny-t5")
    long_ref = " ".join(["good"] * 100)
    spec = _qa_task(tmp_path / "a", [[long_ref, "x"] for _ in range(3)])
    enc = encode_split(spec, bb, "test", use_cache=False)
    row = enc[0]
    assert row["references"] == [long_ref, "x"] and len(row["target_ids"]) == 6  # budget cuts training targets only
    prompt = init_prompt(bb, 3, "random", seed=0)
    preds = [p for b in iterate_batches(enc, 8, bb.pad_id) for p in bb.generate(prompt, b, max_new_tokens=6)]
    assert preds == ["", "", ""]  # the random tiny T5 emits only <pad>: its answer is the empty string
    # the empty answer as the second of two references: F1 and EM are 1 (before: the first reference only, 0)
    spec2 = _qa_task(tmp_path / "b", [[long_ref, ""] for _ in preds])
    enc2 = encode_split(spec2, bb, "test", use_cache=False)
    assert score_prompts(bb, prompt, spec2, enc2)[0] == 1.0
    assert score_prompts(bb, prompt, dataclasses.replace(spec2, metric="exact_match"), enc2)[0] == 1.0
    assert score_prompts(bb, prompt, spec, enc)[0] == 0.0  # neither "good ... good" nor "x" is the answer


def test_generation_budgets_per_task():
    assert {t: load_task(t).max_new_tokens for t in ("squad", "nq_open", "samsum", "multi_news")} == {
        "squad": 32, "nq_open": 32, "samsum": 128, "multi_news": 512}


# ---- 7. dropout, the T5 loss, input lengths, position limits ---------------------------------------------
@pytest.fixture(scope="module")
def sentiment():
    return load_task("tweet_sentiment")


def _first_losses(bb, spec, data, **kw):
    seen = []
    settings = TrainSettings(steps=2, batch_size=8, lr=0.03, eval_every=1, eval_batch_size=16, **kw)
    result = train_prompt(bb, spec, init_prompt(bb, 4, "random", seed=0), data, data, settings,
                          report=lambda m, step, state=None: seen.append((step, m)))
    return [m.get("train_loss") for _, m in seen], result


def test_dropout_trains_in_train_mode_and_scores_in_eval_mode(tiny, sentiment, fixed_split):
    bb = tiny("tiny-bert")  # hidden dropout 0.1
    data = fixed_split(bb)
    on, res_on = _first_losses(bb, sentiment, data)  # the default: dropout on, as the paper's code
    off, res_off = _first_losses(bb, sentiment, data, dropout=False)
    assert TrainSettings().dropout is True
    assert on[0] is None and on[0] == off[0]
    assert res_on.curve[0]["dev_metric"] == res_off.curve[0]["dev_metric"]  # step 0 scored in eval mode both times
    assert on[1] != pytest.approx(off[1], abs=1e-7)  # dropout changed the training forward
    assert bb.model.training is False  # left in eval mode for whoever scores next
    again, _ = _first_losses(bb, sentiment, data)
    assert again == on  # per-step dropout seeds: reproducible


def test_resume_with_dropout_matches_an_uninterrupted_run(tiny, sentiment, fixed_split):
    bb = tiny("tiny-bert")
    data = fixed_split(bb)
    settings = TrainSettings(steps=4, batch_size=4, lr=0.05, eval_every=2, eval_batch_size=8, seed=2)
    states = {}
    whole = train_prompt(bb, sentiment, init_prompt(bb, 4, "random", seed=0), data, data, settings,
                         report=lambda m, step, state=None: states.__setitem__(step, state))
    resumed = train_prompt(bb, sentiment, init_prompt(bb, 4, "random", seed=9), data, data, settings, resume=states[2])
    torch.testing.assert_close(resumed.prompt, whole.prompt, rtol=0, atol=1e-6)


def test_full_vocab_loss_is_the_lm_cross_entropy(tiny, sentiment, fixed_split):
    bb = tiny("tiny-t5")
    data = fixed_split(bb)
    init = init_prompt(bb, 4, "random", seed=0)
    from ptx.data import iterate_batches

    batch = next(iterate_batches(data, 8, bb.pad_id, seed=0, epochs=None))
    vocab = bb.model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        logits = bb.label_logits(init, batch, torch.arange(vocab))
    gold = bb.label_ids(sentiment.verbalizer)[batch["labels"]]
    expected = F.cross_entropy(logits, gold).item()
    full, _ = _first_losses(bb, sentiment, data, dropout=False, label_loss="full_vocab")
    words, _ = _first_losses(bb, sentiment, data, dropout=False)
    assert full[1] == pytest.approx(expected, abs=1e-5)
    assert words[1] != pytest.approx(expected, abs=1e-3)  # the label-word softmax is another loss
    with pytest.raises(PtxError, match="train.label_loss: expected one of"):
        _first_losses(bb, sentiment, data, label_loss="vocab")


def test_new_settings_keep_the_hash_of_runs_made_before_them():
    from ptx.prompt_runs import PromptRequest

    legacy = PromptRequest(task="tweet_sentiment", backbone="tiny-bert", settings=TrainSettings(dropout=False))
    assert legacy.hash() == "7cdeba1f648f0a08"  # the hash of the default request before dropout/label_loss
    assert PromptRequest(task="tweet_sentiment", backbone="tiny-bert").hash() != legacy.hash()


def test_paper_input_lengths():
    assert {t: load_task(t).max_length for t in PAPER_TASKS} == dict.fromkeys(PAPER_TASKS, 128)


def test_prompt_past_the_position_table_is_a_clear_error(tiny):
    from ptx.data import collate

    bb = tiny("tiny-bert")  # 512 learned positions
    ids, score = bb.encode("a good film it was", ".", 64)
    batch = collate([{"input_ids": ids, "score_index": score}], bb.pad_id)
    prompt = torch.zeros(512 - len(ids) + 1, bb.d_model)
    label_ids = bb.label_ids(["good", "bad"])
    with pytest.raises(PtxError, match=rf"'tiny-bert' has 512 positions; a {len(prompt)}-token prompt \(prepend\) "
                                       rf"with {len(ids)} text tokens needs 513"):
        bb.label_logits(prompt, batch, label_ids)
    assert bb.label_logits(prompt[1:], batch, label_ids).shape == (1, 2)  # exactly full: fine
