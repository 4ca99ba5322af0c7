"""The prompt bank: which finished prompt runs a study reads, and their artifacts loaded as one `Bank`.

Free functions over a store (any `ptx.track.Tracker`: they use only its queries and `download`), so the bank is
written once for every tracker and every stage; nothing here knows MLflow. A run's artifact has one local home,
`<workdir>/prompts/<run id>` (`prompt_dir`), where a run trained in that workdir saved it already and where
`fetch_prompt` downloads it otherwise.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ptx.errors import PtxError
from ptx.prompt import PromptArtifact, load_prompt

KIND_PROMPT = "prompt"  # ptx.kind of a prompt run (trained, imported, TPT or projected-init)
PROMPT_ARTIFACT = "prompt"  # the artifact sub-directory that holds a prompt run's prompt artifact
SOURCE_MODES = ("all", "best")  # transfer.sources: every vanilla prompt, or the best one per task


@dataclass(frozen=True)
class Bank:
    """Prompts of a bank in one order: their run ids, tasks and loaded artifacts (tensor + prompt.json)."""

    ids: tuple[str, ...]
    tasks: tuple[str, ...]
    artifacts: tuple[PromptArtifact, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def prompts(self) -> list[torch.Tensor]:
        """Each prompt [n_tokens, d_model], in the bank's order."""
        return [a.prompt for a in self.artifacts]

    @property
    def metas(self) -> list[dict]:
        return [a.meta for a in self.artifacts]

    @property
    def insertion(self) -> str:
        """The one insertion mode of the bank's prompts ("prepend" for an empty bank); PtxError when they differ."""
        modes = {m.get("insertion", "prepend") for m in self.metas}
        if len(modes) > 1:
            raise PtxError(f"prompt bank: insertion modes differ {sorted(modes)}; one backbone layout per bank")
        return modes.pop() if modes else "prepend"

    def by_run(self) -> dict:
        """{run id: PromptArtifact} in the bank's order (what the transfer matrix scores)."""
        return dict(zip(self.ids, self.artifacts, strict=True))


def is_vanilla(run) -> bool:
    """A prompt trained from scratch or imported: not a TPT or projected-init prompt (a later stage's result,
    never a bank source or the best prompt of its task)."""
    tags = run.tags
    return not tags.get("ptx.source_run") and tags.get("ptx.init") not in ("artifact", "projected") \
        and not tags.get("ptx.tpt")


def best_of(runs):
    """The run with the highest `best_dev_metric` (the first of equals), or None when no run has one."""
    scored = [r for r in runs if "best_dev_metric" in r.metrics]
    return max(scored, key=lambda r: r.metrics["best_dev_metric"]) if scored else None


def prompt_dir(workdir: str | Path, run_id: str) -> Path:
    """The one local home of a prompt run's artifact: `<workdir>/prompts/<run id>`."""
    return Path(workdir).resolve() / "prompts" / run_id


def prompt_runs(store, task: str | None = None, backbone: str | None = None, all_experiments: bool = True) -> list:
    """Finished prompt runs (any origin), newest first, optionally filtered by task and backbone."""
    ids = store.all_experiment_ids() if all_experiments else None
    return store.find_runs({"ptx.kind": KIND_PROMPT, "ptx.task": task, "ptx.backbone": backbone},
                           order_by=["attributes.start_time DESC"], experiment_ids=ids)


def bank_runs(store, backbone: str | None = None, tasks=None, experiment_ids: list | None = None,
              task: str | None = None) -> list:
    """The bank: finished vanilla prompt runs (trained from scratch or imported, see `is_vanilla`) on `backbone`, of
    `task` or of the tasks in `tasks` (None: any), oldest first; the store's experiment unless `experiment_ids`
    says otherwise."""
    runs = store.find_runs({"ptx.kind": KIND_PROMPT, "ptx.backbone": backbone, "ptx.task": task},
                           order_by=["attributes.start_time ASC"], experiment_ids=experiment_ids)
    return [r for r in runs if is_vanilla(r) and (tasks is None or r.tags.get("ptx.task") in tasks)]


def best_prompt_run(store, task: str, backbone: str, all_experiments: bool = True, experiment_ids=None):
    """The finished vanilla prompt run with the best dev metric for (task, backbone), or a PtxError; searched in
    `experiment_ids` when given, else every experiment (or the store's own one)."""
    ids = experiment_ids or (store.all_experiment_ids() if all_experiments else None)
    best = best_of(bank_runs(store, backbone, task=task, experiment_ids=ids))
    if best is None:
        raise PtxError(f"no finished prompt run for task '{task}' on backbone '{backbone}' in {store.uri}")
    return best


def select_runs(store, backbone: str, tasks=None, mode: str = "all", experiment_ids: list | None = None) -> list:
    """The bank's source prompts: every run of `bank_runs`, or (mode 'best') the best one per task: the run tagged
    ptx.best=true, else the one with the best dev metric, else (an imported prompt only) the oldest."""
    runs = bank_runs(store, backbone, tasks, experiment_ids)
    if mode == "all":
        return runs
    if mode != "best":
        raise PtxError(f"transfer.sources: expected 'all' or 'best', found {mode!r}")
    by_task: dict = {}
    for r in runs:
        by_task.setdefault(r.tags["ptx.task"], []).append(r)
    return [next((r for r in rs if r.tags.get("ptx.best") == "true"), None) or best_of(rs) or rs[0]
            for rs in by_task.values()]


def tag_best(store, pairs) -> None:
    """Tag the best finished vanilla prompt run per (task, backbone) of the store's experiment with ptx.best=true
    (others false); imported prompts are not ranked.

    Vanilla only: a TPT or projected-init run (a `ptx.source_run`, init artifact/projected, a `ptx.tpt` tag) is a
    result of a later stage and never takes the tag from the prompt that stage started from."""
    for task, backbone in pairs:
        runs = [r for r in store.find_runs({"ptx.kind": KIND_PROMPT, "ptx.task": task, "ptx.backbone": backbone})
                if "best_dev_metric" in r.metrics and r.tags.get("ptx.origin") != "imported"]
        for r in runs:
            if not is_vanilla(r):
                store.log(r.run_id, tags={"ptx.best": "false"})
        best = best_of(r for r in runs if is_vanilla(r))
        if best is None:
            continue
        for r in runs:
            if is_vanilla(r):
                store.log(r.run_id, tags={"ptx.best": "true" if r.run_id == best.run_id else "false"})


def download_prompt(store, run_id: str, out_dir: str | Path) -> Path:
    """Download a prompt run's artifact into `out_dir` (must not exist or be empty)."""
    kind = store.get_run(run_id).tags.get("ptx.kind")
    if kind != KIND_PROMPT:
        raise PtxError(f"run '{run_id}' is not a prompt run (ptx.kind={kind!r})")
    return store.download(run_id, PROMPT_ARTIFACT, out_dir)


def fetch_prompt(store, run_id: str, workdir: str | Path) -> Path:
    """The local copy of a prompt run: `<workdir>/prompts/<run id>` (where a run trained in this workdir saved it
    already), downloaded through the store when missing; a partial copy (an interrupted fetch) is replaced."""
    local = prompt_dir(workdir, run_id)
    if (local / "prompt.json").is_file():
        return local
    if local.exists():
        shutil.rmtree(local, ignore_errors=True)
    try:
        return download_prompt(store, run_id, local)
    except PtxError:
        if (local / "prompt.json").is_file():  # another process fetched it a moment ago
            return local
        raise


def _bank(ids, arts) -> Bank:
    return Bank(tuple(ids), tuple((a.meta.get("task") or {}).get("name") for a in arts), tuple(arts))


def load_bank(store, runs, workdir) -> Bank:
    """The artifacts of prompt runs (fetched to `<workdir>/prompts/<run id>`), as one `Bank` in the runs' order."""
    ids = [r.run_id for r in runs]
    return _bank(ids, [load_prompt(fetch_prompt(store, rid, workdir)) for rid in ids])


def local_bank(workdir, ids) -> Bank:
    """A bank whose artifacts are in `<workdir>/prompts/<run id>` already (no store asked)."""
    return _bank(ids, [load_prompt(prompt_dir(workdir, rid)) for rid in ids])
