"""A ptx prompt exported with `ptx prompts export-peft` loads in real PEFT and gives ptx's own label logits.

PEFT's prompt tuning prepends the virtual tokens to the input embeddings (encoder only with
num_transformer_submodules=1): that is ptx's `prepend` insertion for all three backbone kinds. The paper's
RoBERTa layout (slot 0 = <mask>, zero position embeddings for the prompt) has no PEFT equivalent.
"""

import json

import pytest
import torch
import transformers
from cli_runner import invoke_cli

peft = pytest.importorskip("peft")

from ptx import track  # noqa: E402
from ptx.assets import resolve_model  # noqa: E402
from ptx.data import collate, encode_split  # noqa: E402
from ptx.prompt import load_prompt  # noqa: E402
from ptx.prompt_runs import PromptRequest, run_prompt  # noqa: E402
from ptx.tasks import load_task  # noqa: E402
from ptx.train import TrainSettings  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_env_uri")  # each test names its store (conftest.py)
AUTO = {"causal_lm": transformers.AutoModelForCausalLM, "masked_lm": transformers.AutoModelForMaskedLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM}
TASK_TYPE = {"causal_lm": "CAUSAL_LM", "masked_lm": "FEATURE_EXTRACTION", "seq2seq": "SEQ_2_SEQ_LM"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_workdir):
    wd = new_workdir(tmp_path_factory.mktemp("peft") / "wd")
    return wd, track.MlflowTracker(track.resolve_tracking_uri(None, wd), workdir=wd)


def train(store, tiny, backbone: str, insertion: str = "prepend"):
    """A few real steps of ptx training (with a backbone from conftest's `tiny`), logged to the store."""
    wd, tracker = store
    req = PromptRequest(task="tweet_sentiment", backbone=backbone, insertion=insertion, prompt_length=5,
                        train_limit=32, dev_limit=16,
                        settings=TrainSettings(steps=3, batch_size=8, lr=0.3, eval_every=3))
    return run_prompt(req, wd, tracker=tracker, backbone=tiny(backbone, insertion))


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-bert", "tiny-roberta", "tiny-t5"])
def test_peft_gives_ptx_label_logits(store, tiny, backbone, tmp_path):
    run = train(store, tiny, backbone)
    export = tmp_path / "adapter"
    code, out, err = invoke_cli("prompts", "export-peft", run.run_id, "-o", export,
                         "--workdir", store[0])
    assert code == 0, err
    bb = tiny(backbone)
    prompt = load_prompt(run.artifact, backbone=bb).prompt
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["task_type"] == TASK_TYPE[bb.kind.value] and config["num_transformer_submodules"] == 1
    assert config["base_model_name_or_path"] == backbone and "revision" not in config  # an alias is not a hub revision

    spec = load_task("tweet_sentiment")
    data = encode_split(spec, bb, "dev", limit=12)
    batch = collate([data[i] for i in range(len(data))], bb.pad_id)  # right-padded, lengths differ
    assert batch["attention_mask"].sum(1).unique().numel() > 1
    label_ids = bb.label_ids(spec.verbalizer)
    with torch.no_grad():
        ours = bb.label_logits(prompt, batch, label_ids)

    base = AUTO[bb.kind.value].from_pretrained(resolve_model(backbone).path)
    model = peft.PeftModel.from_pretrained(base, str(export)).eval()
    assert torch.equal(model.get_prompt_embedding_to_save("default").cpu(), prompt)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = torch.arange(ids.shape[0])
    with torch.no_grad():
        if bb.kind.value == "seq2seq":  # the first decoder step, as ptx scores it
            start = torch.full((ids.shape[0], 1), base.config.decoder_start_token_id)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0]
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
            n = prompt.shape[0]
            if bb.kind.value == "causal_lm":  # the last real token of each example
                logits = logits[rows, n + mask.sum(1) - 1]
            else:  # the <mask> slot
                assert (ids[rows, batch["score_index"]] == bb.tokenizer.mask_token_id).all()
                logits = logits[rows, n + batch["score_index"]]
    theirs = logits[:, label_ids]
    assert theirs.shape == ours.shape == (len(data), len(spec.verbalizer))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert ours.std() > 0  # a real comparison, not of constants


def test_paper_layout_export_is_refused(store, tiny, tmp_path):
    run = train(store, tiny, "tiny-roberta", insertion="paper")
    assert load_prompt(run.artifact).meta["insertion"] == "paper"
    code, _, err = invoke_cli("prompts", "export-peft", run.run_id, "-o", tmp_path / "x",
                       "--workdir", store[0])
    assert code == 2 and err.count("\n") == 1
    assert "<mask>" in err and "PEFT" in err and "prepend" in err
    assert not (tmp_path / "x").exists()
