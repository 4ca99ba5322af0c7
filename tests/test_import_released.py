"""Import the paper's 44 released prompts into a real MLflow store; refuse wrong widths and unsafe files.

The roberta files were trained with the paper's <mask>-slot layout, so they are imported with
`--insertion paper`; `roberta-base/random.pt` is the authors' random baseline, not a task: it is imported
with no --task and `--name random`.
"""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import invoke_cli, user_error
from mlflow.tracking import MlflowClient
from support import NO_REFERENCE, REFERENCE

from ptx.prompt import load_prompt

pytestmark = pytest.mark.usefixtures("no_env_uri")  # each test names its store (conftest.py)
RELEASED = REFERENCE / "prompts"  # the fixture lives in the shared reference folder beside the repository, not in it
if not RELEASED.is_dir():
    pytest.skip(NO_REFERENCE, allow_module_level=True)
WIDTH = {"roberta-base": 768, "roberta-large": 1024, "t5-base": 768}
COUNT = {"roberta-base": 14, "roberta-large": 13, "t5-base": 17}


def import_args(file: Path) -> list:
    backbone = file.parent.name
    args = ["prompts", "import", file, "--backbone", backbone]
    args += ["--name", "random"] if file.stem == "random" else ["--task", file.stem]
    if backbone.startswith("roberta"):
        args += ["--insertion", "paper"]
    return args


def test_all_released_prompts_import(wd, tmp_path):
    files = sorted(RELEASED.glob("*/*.pt"))
    assert len(files) == 44
    for file in files:
        code, out, err = invoke_cli(*import_args(file), "--workdir", wd)
        assert code == 0, (file, err)
    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    exp = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp, "tags.`ptx.origin` = 'imported' and attributes.status = 'FINISHED'",
                              max_results=1000)
    assert len(runs) == 44
    by_file = {(r.data.tags["ptx.backbone"], r.data.tags["ptx.name"]): r for r in runs}
    assert {b: sum(k[0] == b for k in by_file) for b in WIDTH} == COUNT
    for file in files:
        run = by_file[(file.parent.name, file.stem)]
        tags = run.data.tags
        assert tags["ptx.kind"] == "prompt" and tags["ptx.imported_from"] == file.name
        assert tags.get("ptx.task") == (None if file.stem == "random" else file.stem)
        assert tags["ptx.insertion"] == ("paper" if file.parent.name.startswith("roberta") else "prepend")
        assert tags["ptx.backbone_kind"] == ("seq2seq" if file.parent.name == "t5-base" else "masked_lm")
        local = load_prompt(wd / "prompts" / run.info.run_id)
        assert local.meta["backbone"]["d_model"] == WIDTH[file.parent.name]
    # one round trip through MLflow, byte-exact to the released tensor
    file = RELEASED / "t5-base" / "squad.pt"
    got = tmp_path / "squad"
    assert invoke_cli("prompts", "get", by_file[("t5-base", "squad")].info.run_id, "-o", got,
               "--workdir", wd)[0] == 0
    assert torch.equal(load_prompt(got).prompt, torch.load(file, weights_only=True))
    # the bank lists them; the random baseline shows its name in place of a task
    code, out, _ = invoke_cli("prompts", "list", "--backbone", "roberta-base", "--format", "json",
                       "--workdir", wd)
    rows = json.loads(out)
    assert len(rows) == 14 and {r["origin"] for r in rows} == {"imported"}
    assert "(random)" in {r["task"] for r in rows}
    # importing the same file again (even from another path) reuses its run
    copy = tmp_path / "copy" / "roberta-large" / "mnli.pt"
    copy.parent.mkdir(parents=True)
    shutil.copy(RELEASED / "roberta-large" / "mnli.pt", copy)
    code, out, _ = invoke_cli(*import_args(copy), "--workdir", wd)
    assert code == 0 and "already imported" in out
    assert by_file[("roberta-large", "mnli")].info.run_id in out


def test_wrong_width_and_layout_are_refused(wd):
    large = RELEASED / "roberta-large" / "sst2.pt"
    err = user_error(invoke_cli("prompts", "import", large, "--backbone", "roberta-base", "--task",
                         "sst2", "--insertion", "paper", "--workdir", wd))
    assert "[100, 1024]" in err and "768" in err and "roberta-base" in err
    err = user_error(invoke_cli("prompts", "import", RELEASED / "t5-base" / "sst2.pt", "--backbone",
                         "t5-base", "--task", "sst2", "--insertion", "paper", "--workdir", wd))
    assert "paper" in err and "seq2seq" in err
    err = user_error(invoke_cli("prompts", "import", large, "--backbone", "acme/unknown-model",
                         "--task", "sst2", "--workdir", wd))
    assert "--d-model" in err
    err = user_error(invoke_cli("prompts", "import", large, "--backbone", "roberta-large",
                         "--task", "no_such_task", "--workdir", wd))
    assert "no_such_task" in err
    assert not (wd / "prompts").exists()


class _WritesMarker:
    """A pickle that creates a file when loaded with plain pickle (what weights_only=True must refuse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_unsafe_and_non_tensor_files_are_refused(wd, tmp_path):
    not_tensor = tmp_path / "dict.pt"
    torch.save({"a": 1}, not_tensor)
    err = user_error(invoke_cli("prompts", "import", not_tensor, "--backbone", "roberta-base",
                         "--task", "sst2", "--workdir", wd))
    assert "dict" in err and "tensor" in err

    # the payload is real: an unsafe load of the same kind of file runs its code
    probe_marker = tmp_path / "probe-ran"
    probe = tmp_path / "probe.pt"
    torch.save(_WritesMarker(probe_marker), probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "evil-ran"
    evil = tmp_path / "evil.pt"
    torch.save(_WritesMarker(marker), evil)
    err = user_error(invoke_cli("prompts", "import", evil, "--backbone", "roberta-base", "--task",
                         "sst2", "--workdir", wd))
    assert "weights_only" in err and str(evil) in err
    assert not marker.exists()

    raw_pickle = tmp_path / "raw.pkl"  # a plain pickle, not a torch zip file
    raw_pickle.write_bytes(pickle.dumps(_WritesMarker(marker)))
    user_error(invoke_cli("prompts", "import", raw_pickle, "--backbone", "roberta-base", "--task",
                   "sst2", "--workdir", wd))
    assert not marker.exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    user_error(invoke_cli("prompts", "import", garbage, "--backbone", "roberta-base", "--task", "sst2",
                   "--workdir", wd))
    user_error(invoke_cli("prompts", "import", tmp_path / "missing.pt", "--backbone", "roberta-base",
                   "--task", "sst2", "--workdir", wd))
    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_refused_raw_pickle_draws_no_warning_beside_its_error(tmp_path):
    """Outside pytest's warning capture (a user's terminal) torch warns about a raw pickle's protocol before the
    weights_only load refuses it; the import says only its one-line error."""
    import warnings

    from ptx.errors import PtxError
    from ptx.prompt import import_torch_prompt

    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps(_WritesMarker(tmp_path / "never"), protocol=4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(PtxError, match="not a plain tensor file loadable with weights_only=True"):
            import_torch_prompt(raw_pickle, 16, "tiny-bert")
    assert [str(w.message) for w in seen] == []
    assert not (tmp_path / "never").exists()
