"""Every backbone kind on the tiny models: prompt insertion, scoring position, exact label-row head, paper layout."""

import pytest
import torch

from ptx.backbones import BackboneKind, Insertion, load_backbone
from ptx.data import collate
from ptx.errors import PtxError
from ptx.prompt import init_prompt

VERBALIZER = ["negative", "neutral", "positive"]
# (text before the mask, text after it): lengths differ so every batch is padded
TEXTS = [("the movie was great . it was", "."),
         ("bad", "."),
         ("a long and winding review of a film that nobody liked at all , said the man . it was", "!")]
CONFIGS = [("tiny-bert", "prepend"), ("tiny-roberta", "prepend"), ("tiny-roberta", "paper"),
           ("tiny-t5", "prepend"), ("tiny-llama", "prepend")]
N_TOK = 5


def make_batch(backbone, texts=TEXTS, max_length=64):
    rows = []
    for before, after in texts:
        ids, score = backbone.encode(before, after, max_length)
        rows.append({"input_ids": ids, "score_index": score, "label": 0})
    return collate(rows, backbone.pad_id), rows


def case(tiny, name, insertion, seed=None):
    """(backbone, the padded batch of TEXTS, the verbalizer's label ids, a random prompt of N_TOK rows when `seed`
    is given)."""
    backbone = tiny(name, insertion)
    batch, _ = make_batch(backbone)
    prompt = init_prompt(backbone, N_TOK, "random", seed=seed) if seed is not None else None
    return backbone, batch, backbone.label_ids(VERBALIZER), prompt


def reference_logits(backbone, prompt, batch, label_ids):
    """The whole PLM run on inputs_embeds built here (not by Backbone), full-vocabulary logits sliced to labels."""
    model, n = backbone.model, prompt.shape[0]
    ids, attn = batch["input_ids"], batch["attention_mask"]
    bsz = ids.shape[0]
    if backbone.insertion is Insertion.PAPER:
        mask_row = model.get_input_embeddings().weight[backbone.tokenizer.mask_token_id]
        prompt = torch.cat([mask_row[None], prompt[1:]])
    x = torch.cat([prompt.expand(bsz, -1, -1), model.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([torch.ones(bsz, n, dtype=attn.dtype), attn], dim=1)
    if backbone.kind is BackboneKind.SEQ2SEQ:
        start = torch.full((bsz, 1), model.config.decoder_start_token_id)
        logits = model(inputs_embeds=x, attention_mask=mask, decoder_input_ids=start).logits[:, 0]
    elif backbone.insertion is Insertion.PAPER:
        pad = model.config.pad_token_id  # RoBERTa: prompt slots at the padding index, text from pad + 1
        pos = torch.cat([torch.full((n,), pad), torch.arange(pad + 1, pad + 1 + ids.shape[1])]).expand(bsz, -1)
        logits = model(inputs_embeds=x, attention_mask=mask, position_ids=pos).logits[:, 0]
    else:
        logits = model(inputs_embeds=x, attention_mask=mask).logits
        where = batch["score_index"] if backbone.kind is BackboneKind.MASKED_LM else attn.sum(1) - 1
        logits = logits[torch.arange(bsz), n + where]
    return logits[:, label_ids]


@pytest.mark.parametrize(("name", "insertion"), CONFIGS)
def test_label_logits_equal_the_full_lm_head(tiny, name, insertion):
    """The label-rows-only head at the scoring position is exactly the full model's logits there."""
    backbone, batch, label_ids, prompt = case(tiny, name, insertion, seed=1)
    with torch.no_grad():
        got = backbone.label_logits(prompt, batch, label_ids)
    want = reference_logits(backbone, prompt, batch, label_ids)
    assert got.shape == (3, 3)
    assert want.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "insertion"), CONFIGS)
def test_prompt_gradients_equal_the_full_models(tiny, name, insertion):
    """Training backpropagates through label_logits: its gradient wrt the prompt is the full forward's."""
    backbone, batch, label_ids, _ = case(tiny, name, insertion)
    weights = torch.randn(3, len(VERBALIZER), generator=torch.Generator().manual_seed(0))
    grads = []
    for fn in (lambda p: backbone.label_logits(p, batch, label_ids), lambda p: reference_logits(backbone, p, batch, label_ids)):
        prompt = init_prompt(backbone, N_TOK, "random", seed=1).requires_grad_(True)
        with torch.enable_grad():
            (fn(prompt) * weights).sum().backward()
        grads.append(prompt.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize(("name", "insertion"), CONFIGS)
def test_padding_does_not_change_an_examples_logits(tiny, name, insertion):
    backbone = tiny(name, insertion)
    batch, rows = make_batch(backbone)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    label_ids = backbone.label_ids(VERBALIZER)
    prompt = init_prompt(backbone, N_TOK, "random", seed=2)
    with torch.no_grad():
        together = backbone.label_logits(prompt, batch, label_ids)
        alone = torch.cat([backbone.label_logits(prompt, collate([r], backbone.pad_id), label_ids) for r in rows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def _embedding_input(backbone):
    """The module that receives inputs_embeds: the encoder (seq2seq) or the base model."""
    model = backbone.model
    return model.get_encoder() if backbone.kind is BackboneKind.SEQ2SEQ else model.base_model


@pytest.mark.parametrize(("name", "insertion"), CONFIGS)
def test_the_model_receives_the_prompt_rows_first(tiny, name, insertion):
    backbone, batch, label_ids, prompt = case(tiny, name, insertion, seed=3)
    seen = []
    hook = _embedding_input(backbone).register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            backbone.label_logits(prompt, batch, label_ids)
    finally:
        hook.remove()
    tokens = backbone.input_embeddings()[batch["input_ids"]]
    if len(seen) == 2:  # decoder-only fast path: the prompt runs once, the texts run on its key/value cache
        assert name == "tiny-llama"
        torch.testing.assert_close(seen[0], prompt[None])
        torch.testing.assert_close(seen[1], tokens)
        return
    x = seen[0]
    assert len(seen) == 1 and x.shape == (3, N_TOK + batch["input_ids"].shape[1], backbone.d_model)
    torch.testing.assert_close(x[:, N_TOK:], tokens)
    if insertion == "paper":  # slot 0 is <mask>, the rest is the prompt
        mask_row = backbone.input_embeddings()[backbone.tokenizer.mask_token_id]
        torch.testing.assert_close(x[:, 0], mask_row.expand(3, -1))
        torch.testing.assert_close(x[:, 1:N_TOK], prompt[1:].expand(3, -1, -1))
    else:
        torch.testing.assert_close(x[:, :N_TOK], prompt.expand(3, -1, -1))


@pytest.mark.parametrize(("name", "insertion"), CONFIGS)
def test_the_prompt_changes_the_logits(tiny, name, insertion):
    backbone, batch, label_ids, _ = case(tiny, name, insertion)
    a, b = (init_prompt(backbone, N_TOK, "random", seed=s) for s in (4, 5))
    with torch.no_grad():
        diff = (backbone.label_logits(a, batch, label_ids) - backbone.label_logits(b, batch, label_ids)).abs()
    assert (diff.max(dim=1).values > 1e-6).all()  # every example sees the prompt


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta"])
def test_masked_lm_scores_at_the_mask(tiny, name):
    backbone = tiny(name)
    batch, _ = make_batch(backbone)
    rows = torch.arange(3)
    assert (batch["input_ids"][rows, batch["score_index"]] == backbone.tokenizer.mask_token_id).all()
    # the mask is right after the template's "it was"
    before = backbone.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, batch["score_index"][0] - 2:][:2])
    assert [t.lstrip("Ġ") for t in before] == ["it", "was"]


def test_causal_lm_scores_the_last_real_token_of_right_padded_rows(tiny):
    backbone = tiny("tiny-llama")
    batch, rows = make_batch(backbone)
    lengths = batch["attention_mask"].sum(1)
    assert (batch["score_index"] == lengths - 1).all()
    assert (batch["attention_mask"][:, 0] == 1).all()  # right padding: real tokens first
    was = backbone.tokenizer.convert_tokens_to_ids("was")
    assert batch["input_ids"][0, batch["score_index"][0]] == was  # nothing of the template follows the mask


def test_seq2seq_scores_the_first_decoder_step(tiny):
    """Changing the decoder start token changes the logits: they come from the decoder, step 0."""
    backbone = tiny("tiny-t5")
    batch, _ = make_batch(backbone)
    assert (batch["score_index"] == 0).all()
    label_ids = backbone.label_ids(VERBALIZER)
    prompt = init_prompt(backbone, N_TOK, "random", seed=6)
    seen = []
    hook = backbone.model.get_decoder().register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    try:
        with torch.no_grad():
            backbone.label_logits(prompt, batch, label_ids)
    finally:
        hook.remove()
    assert seen[0].tolist() == [[backbone.model.config.decoder_start_token_id]] * 3


def test_paper_layout_ignores_prompt_row_0_and_zeroes_prompt_positions(tiny):
    backbone = tiny("tiny-roberta", "paper")
    batch, _ = make_batch(backbone)
    label_ids = backbone.label_ids(VERBALIZER)
    prompt = init_prompt(backbone, N_TOK, "random", seed=7)
    row0 = prompt.clone()
    row0[0] = torch.randn(backbone.d_model) * 10
    row1 = prompt.clone()
    row1[1] = torch.randn(backbone.d_model) * 10
    positions = []
    hook = backbone.model.base_model.embeddings.position_embeddings.register_forward_hook(
        lambda mod, args, out: positions.append((args[0].clone(), out.detach().clone())))
    try:
        with torch.no_grad():
            base, changed0, changed1 = (backbone.label_logits(p, batch, label_ids) for p in (prompt, row0, row1))
    finally:
        hook.remove()
    torch.testing.assert_close(base, changed0, rtol=0, atol=0)  # slot 0 holds <mask> whatever row 0 is
    assert (base - changed1).abs().max() > 1e-6  # the other rows matter
    ids, added = positions[0]
    pad = backbone.model.config.pad_token_id
    assert (ids[:, :N_TOK] == pad).all()
    assert ids[0, N_TOK:].tolist() == list(range(pad + 1, pad + 1 + batch["input_ids"].shape[1]))
    assert added[:, :N_TOK].abs().max() == 0  # prompt positions get a zero position embedding
    assert added[:, N_TOK:].abs().amax(-1).min() > 0  # text positions get real ones
    # the text carries no <mask> of its own: logits are read at slot 0
    assert not (batch["input_ids"] == backbone.tokenizer.mask_token_id).any()


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama", "tiny-t5"])
def test_paper_layout_needs_a_zero_position_row(name, ptx_cache_dir):
    """BERT has no zero position embedding, Llama/T5 no <mask> slot: the paper layout is refused, not faked."""
    with pytest.raises(PtxError, match=f"insertion 'paper'.*'{name}'"):
        load_backbone(name, insertion="paper")


def test_unknown_insertion_is_an_error(ptx_cache_dir):
    with pytest.raises(PtxError, match=r"unknown insertion 'papr'.*prepend"):
        load_backbone("tiny-bert", insertion="papr")


@pytest.mark.parametrize(("name", "insertion"), CONFIGS)
def test_batched_prompts_equal_separate_calls(tiny, name, insertion):
    backbone, batch, label_ids, _ = case(tiny, name, insertion)
    prompts = torch.stack([init_prompt(backbone, N_TOK, "random", seed=s) for s in (8, 9, 10)])
    with torch.no_grad():
        together = backbone.label_logits(prompts, batch, label_ids)
        apart = torch.stack([backbone.label_logits(p, batch, label_ids) for p in prompts])
    assert together.shape == (3, 3, len(VERBALIZER))
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-4)
    assert (together[0] - together[1]).abs().max() > 1e-6  # the prompts really differ


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta", "tiny-t5", "tiny-llama"])
def test_verbalizer_words_must_be_one_known_token(tiny, name):
    backbone = tiny(name)
    ids = backbone.label_ids(VERBALIZER)
    assert ids.dtype == torch.long and ids.shape == (3,)
    assert [backbone.tokenizer.decode([i]).strip() for i in ids] == VERBALIZER
    with pytest.raises(PtxError, match=rf"verbalizer word 'very-good' is not one known token of backbone '{name}'"):
        backbone.label_ids(["bad", "very-good"])
    # a word outside the vocabulary is one <unk> token: still not a label word
    with pytest.raises(PtxError, match="verbalizer word 'xyzzyq'"):
        backbone.label_ids(["xyzzyq", "good"])
    with pytest.raises(PtxError, match="maps two labels to one token"):
        backbone.label_ids(["good", "GOOD"])  # the tiny tokenizers lowercase


def test_backbones_are_frozen_and_described(tiny):
    for name, width in [("tiny-bert", 32), ("tiny-roberta", 48), ("tiny-t5", 32), ("tiny-llama", 64)]:
        backbone = tiny(name)
        assert backbone.d_model == width and backbone.n_layers == 2
        assert not any(p.requires_grad for p in backbone.model.parameters())
        assert not backbone.model.training
        assert len(backbone.ffn_modules()) == backbone.n_layers


def test_describe_and_kind_of_need_no_weights(tiny, tmp_path, monkeypatch):
    """`describe` reads the config only; `kind_of` not even resolves the model (a shipped or local config.json,
    else the name); both agree with the loaded backbone."""
    from ptx import backbones

    expect = {}
    for name in ("tiny-bert", "tiny-t5", "tiny-llama"):
        b = tiny(name)
        expect[name] = {"name": name, "revision": b.revision, "kind": b.kind.value, "d_model": b.d_model,
                        "insertion": "prepend"}

    def no_weights(*_a, **_k):
        raise AssertionError("a weight-free lookup loaded a model")

    monkeypatch.setattr(backbones, "_from_pretrained", no_weights)
    for name, info in expect.items():
        assert backbones.describe(name) == info
    assert backbones.describe("tiny-bert", "paper")["insertion"] == "paper"
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text('{"model_type": "t5", "is_encoder_decoder": true}')
    assert backbones.kind_of(str(local)) is BackboneKind.SEQ2SEQ
    assert [backbones.kind_of(n) for n in ("org/some-t5-small", "org/roberta-x", "org/gpt-x")] == [
        BackboneKind.SEQ2SEQ, BackboneKind.MASKED_LM, BackboneKind.CAUSAL_LM]


def test_read_position_and_active_rule_per_kind(tiny):
    """The index read per example: score slot (n_tok + score_index) on masked LM and decoder-only, slot 0 in the
    paper layout, the last real token with `last` (and on a T5 encoder), decoder step 0 on a T5 decoder."""
    from ptx.backbones import Position

    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "score_index": torch.tensor([1, 4]),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])}
    bert, llama, roberta_paper, t5 = tiny("tiny-bert"), tiny("tiny-llama"), tiny("tiny-roberta", "paper"), tiny("tiny-t5")
    assert bert.read_index(batch, 3).tolist() == [4, 7] and llama.read_index(batch, 3).tolist() == [4, 7]
    assert roberta_paper.read_index(batch, 3).tolist() == [0, 0]
    assert bert.read_index(batch, 3, position=Position.LAST).tolist() == [5, 8]
    assert t5.read_index(batch, 3, "encoder").tolist() == [5, 8] and t5.read_index(batch, 3, "decoder").tolist() == [0, 0]
    assert bert.read_index(batch, 3, position=Position.MEAN) is None
    assert bert.active_neurons(torch.tensor([-1.0, 0.0, 0.5])).tolist() == [False, False, True]
    assert t5.active_rule == "wi / wi_0 output (before ReLU/GELU) > 0"
    assert {k.value for k in BackboneKind} == {"masked_lm", "seq2seq", "causal_lm"} and all(
        k.active_rule.endswith("> 0") for k in BackboneKind)
