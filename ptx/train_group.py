"""Many prompts, one backbone: K prompt-tuning runs trained together, one stacked backbone pass per step.

Each member is a whole run of `train_prompt` (its own task, data order, AdamW state and rate, evaluation cadence,
best-dev checkpoint, early stop and report callable); only the frozen backbone's forward and backward are shared.
A step takes the next batch of every live member, runs them as one stacked batch and sums the members' mean
losses: a member's prompt touches only its own rows, so its gradient is exactly the one its own run would get.
A member that finishes or stops early leaves the stack; one whose loss or prompt turns non-finite is failed alone.

How many members share one backbone pass (`members_per_pass`): all of them on a GPU, where a batch-16 step is
launch-bound; one at a time on CPU, where time follows FLOPs, so a wider pass buys no speed but keeps every member's
activations for one backward (measured: minilm-l6, K=8 in one pass ran 0.89x one-at-a-time at 6.6x the peak memory;
benchmarks/RESULTS.md). Passes only split the step: each member's gradient is the same either way.
"""

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ptx.data import iterate_batches
from ptx.errors import PtxError
from ptx.evaluate import bf16_autocast
from ptx.metrics import METRICS
from ptx.prompt import SoftPrompt
from ptx.train import Report, TrainResult, TrainSettings, step_seed

log = logging.getLogger(__name__)


@dataclass
class GroupMember:
    """One run of a group: what `train_prompt` takes for it (init [n_tokens, d_model], encoded splits, settings)."""

    spec: object
    init: torch.Tensor
    train_data: object
    dev_data: object
    settings: TrainSettings
    report: Report | None = None
    resume: dict | None = None
    name: str = ""  # for log lines: e.g. "sst2/s0"


@dataclass
class _Run:
    """A member's live state: the variables train_prompt keeps in its locals."""

    member: GroupMember
    prompt: SoftPrompt
    opt: torch.optim.Optimizer
    sched: object
    label_ids: torch.Tensor
    batches: object = None
    step: int = 0
    curve: list = field(default_factory=list)
    best: float = -math.inf
    best_step: int = 0
    best_prompt: torch.Tensor | None = None
    stale: int = 0
    losses: list = field(default_factory=list)
    stopped: str | None = None  # None while it trains

    @property
    def settings(self) -> TrainSettings:
        return self.member.settings


def _check(backbone, members: list[GroupMember]) -> None:
    """Refuse a group that cannot share one pass, naming the member and the field."""
    if not members:
        raise PtxError("a prompt group needs at least one member; found none")
    n_tok = members[0].init.shape[0]
    for i, m in enumerate(members):
        label = m.name or f"member {i}"
        if m.spec.kind == "generation":
            raise PtxError(f"group {label}: task '{m.spec.name}' is a generation task; grouped training scores label "
                           "words only (train it alone)")
        if len(m.train_data) == 0:
            raise PtxError(f"group {label}: task '{m.spec.name}': the training split is empty")
        if len(m.dev_data) == 0:
            raise PtxError(f"group {label}: task '{m.spec.name}': the evaluation split is empty")
        if not torch.isfinite(m.init).all():
            raise PtxError(f"group {label}: the initial prompt holds NaN or inf values (shape {list(m.init.shape)})")
        if m.init.shape[0] != n_tok:
            raise PtxError(f"group {label}: prompt length {m.init.shape[0]}; every member of a group needs the "
                           f"first member's length {n_tok}")
        if m.settings.bf16 != members[0].settings.bf16:
            raise PtxError(f"group {label}: train.bf16={m.settings.bf16}; a group runs one pass, so every member "
                           f"needs the first member's bf16={members[0].settings.bf16}")
        if m.settings.dropout != members[0].settings.dropout:
            raise PtxError(f"group {label}: train.dropout={m.settings.dropout}; a group runs one pass in one mode, so "
                           f"every member needs the first member's dropout={members[0].settings.dropout}")
        if m.settings.label_loss != "label_words":
            raise PtxError(f"group {label}: train.label_loss={m.settings.label_loss!r}; grouped training scores the "
                           "label words only (train a full-vocabulary run alone)")


def _start(backbone, m: GroupMember) -> _Run:
    """A member's prompt, optimizer and schedule, exactly as train_prompt builds them (or restored from `resume`)."""
    s = m.settings
    prompt = SoftPrompt(m.init).to(backbone.device)
    opt = torch.optim.AdamW([prompt.weight], lr=s.lr, weight_decay=s.weight_decay)
    warm = max(1, s.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm) if s.warmup_steps else 1.0)
    run = _Run(m, prompt, opt, sched, backbone.label_ids(m.spec.label_words(backbone.kind)).to(backbone.device),
               best_prompt=prompt.weight.detach().clone())
    if m.resume:
        r = m.resume
        prompt.weight.data.copy_(r["prompt"].to(backbone.device))
        opt.load_state_dict(r["optimizer"])
        sched.load_state_dict(r["scheduler"])
        run.step, run.curve, run.best, run.best_step = r["step"], list(r["curve"]), r["best_metric"], r["best_step"]
        run.best_prompt, run.stale = r["best_prompt"].to(backbone.device), r.get("stale", 0)
        # a checkpoint taken at the member's last evaluation: it had stopped there (train_prompt's trial ended)
        if run.step >= s.steps:
            run.stopped = "max_steps"
        elif s.patience is not None and run.stale >= s.patience:
            run.stopped = "early_stop"
    # a resumed member skips the batches it already saw, as train_prompt does
    run.batches = iterate_batches(m.train_data, s.batch_size, backbone.pad_id, seed=s.seed, epochs=None, skip=run.step)
    return run


def members_per_pass(backbone, n: int) -> int:
    """Members per backbone pass for a group of n on this backbone's device: n on a GPU, 1 on CPU (module doc)."""
    return 1 if backbone.device.type == "cpu" else max(1, n)


def _passes(segments: list, per_pass: int):
    """Split (prompts [P, n, d], batch) segments into passes of at most per_pass prompts: yields (pass, [(segment
    index, P in this pass)])."""
    chunk, owners, room = [], [], per_pass
    for i, (prompts, batch) in enumerate(segments):
        lo = 0
        while lo < prompts.shape[0]:
            take = min(room, prompts.shape[0] - lo)
            chunk.append((prompts[lo:lo + take], batch))
            owners.append(i)
            lo, room = lo + take, room - take
            if room == 0:
                yield chunk, owners
                chunk, owners, room = [], [], per_pass
    if chunk:
        yield chunk, owners


def group_backward(backbone, parts: list, per_pass: int, autocast=None) -> list[torch.Tensor]:
    """Each (prompt [n, d], batch, label ids) part's mean loss, with the gradients of the finite ones accumulated.

    The parts run through the backbone per_pass at a time; each pass sums its finite losses and runs its own backward,
    so a prompt gets d(its loss)/d(prompt) whatever it shares a pass with. Returns the losses, detached.
    """
    autocast = autocast or contextlib.nullcontext()
    losses = []
    for lo in range(0, len(parts), per_pass):
        chunk = parts[lo:lo + per_pass]
        with autocast:
            logits = backbone.stacked_label_logits([(w, b) for w, b, _ in chunk], [ids for _, _, ids in chunk])
            out = [F.cross_entropy(x[0].float(), b["labels"].to(backbone.device))
                   for x, (_, b, _) in zip(logits, chunk, strict=True)]
        finite = [loss for loss in out if torch.isfinite(loss)]
        if finite:
            torch.stack(finite).sum().backward()
        losses += [loss.detach() for loss in out]
    return losses


@torch.no_grad()
def score_stacked(backbone, items: list, per_pass: int | None = None) -> list[float]:
    """Dev metric of each (prompt [n, d], spec, encoded split, batch size) item, all scored in stacked passes.

    Items on the same split share its text rows (one segment of several prompts); the splits advance in lockstep,
    one batch of each per pass, so K members cost one pass per dev batch of the longest split (or more passes of at
    most `per_pass` prompts each; default: members_per_pass).
    """
    per_pass = per_pass or members_per_pass(backbone, len(items))
    segs: dict = {}  # split identity -> [indices of items]
    for i, (_, spec, data, _) in enumerate(items):
        segs.setdefault((id(data), spec.name), []).append(i)
    keys = list(segs)
    iters = {k: iterate_batches(items[segs[k][0]][2], items[segs[k][0]][3], backbone.pad_id, seed=None) for k in keys}
    labels = {k: backbone.label_ids(items[segs[k][0]][1].verbalizer) for k in keys}
    preds: dict = {k: [] for k in keys}
    golds: dict = {k: [] for k in keys}
    live = list(keys)
    while live:
        batches = {}
        for k in list(live):
            batch = next(iters[k], None)
            if batch is None:
                live.remove(k)
            else:
                batches[k] = batch
        if not batches:
            break
        order = list(batches)
        segments = [(torch.stack([items[i][0] for i in segs[k]]).to(backbone.device), batches[k]) for k in order]
        pieces: dict = {k: [] for k in order}
        for chunk, owners in _passes(segments, per_pass):
            with bf16_autocast(backbone):
                part = backbone.stacked_label_logits(chunk, [labels[order[i]] for i in owners])
            for i, out in zip(owners, part, strict=True):
                pieces[order[i]].append(out)
        logits = [torch.cat(pieces[k]) for k in order]
        for k, out in zip(order, logits, strict=True):
            preds[k].append(out.argmax(-1).cpu())
            golds[k].append(batches[k]["labels"])
    scores = [0.0] * len(items)
    for k in keys:
        pred, gold = torch.cat(preds[k], dim=1), torch.cat(golds[k]).tolist()
        metric = METRICS[items[segs[k][0]][1].metric]
        for row, i in enumerate(segs[k]):
            scores[i] = float(metric(pred[row].tolist(), gold))
    return scores


def _evaluate(backbone, runs: list[_Run], per_pass: int | None = None) -> list[float]:
    backbone.model.eval()  # scoring never sees dropout
    return score_stacked(backbone, [(r.prompt.weight.detach(), r.member.spec, r.member.dev_data,
                                     r.settings.eval_batch_size) for r in runs], per_pass)


def _state(run: _Run) -> dict:
    """The checkpoint train_prompt would report at this point (copies: the live tensors change in place)."""
    return {"prompt": run.prompt.weight.detach().cpu().clone(), "optimizer": copy.deepcopy(run.opt.state_dict()),
            "scheduler": run.sched.state_dict(), "step": run.step, "curve": list(run.curve), "best_metric": run.best,
            "best_step": run.best_step, "best_prompt": run.best_prompt.cpu(), "stale": run.stale}


def _fail(run: _Run, why: str) -> None:
    run.stopped, run.step = "nonfinite_loss", run.step - 1
    log.error("member %s: %s at step %d; keeping its best checkpoint (step %d)", run.member.name or run.member.spec.name,
              why, run.step + 1, run.best_step)


def train_group(backbone, members: list[GroupMember], progress: bool = False,
                on_evaluated: Callable[[], None] | None = None, per_pass: int | None = None) -> list[TrainResult]:
    """Tune K soft prompts in one loop on a frozen backbone; one TrainResult per member, in order.

    `on_evaluated()` runs after each step that evaluated a member (once its report has run): the sweep writes the
    group's checkpoint there. `per_pass`: members per backbone pass (default: members_per_pass).
    """
    _check(backbone, members)
    if per_pass is not None and (not isinstance(per_pass, int) or per_pass < 1):
        raise PtxError(f"train_group: per_pass: expected a whole number >= 1 or None, found {per_pass!r}")
    per_pass = per_pass or members_per_pass(backbone, len(members))
    runs = [_start(backbone, m) for m in members]
    fresh = [r for r in runs if not r.member.resume]
    if fresh:  # the step-0 evaluations of every new member, in one stacked pass
        for run, dev in zip(fresh, _evaluate(backbone, fresh, per_pass), strict=True):
            run.best = dev
            run.curve.append({"step": 0, "dev_metric": dev, "train_loss": None})
            if run.member.report:
                run.member.report({f"dev_{run.member.spec.metric}": dev, "best_dev_metric": dev}, 0, None)
    for run in runs:
        if run.step >= run.settings.steps:
            run.stopped = run.stopped or "max_steps"
    t0 = time.perf_counter()
    total = sum(r.settings.steps for r in runs)
    bar = tqdm(total=total, initial=sum(r.step for r in runs), disable=not progress, desc=f"tuning {len(runs)} prompts")
    autocast = bf16_autocast(backbone) if members[0].settings.bf16 else torch.autocast(backbone.device.type, enabled=False)
    while live := [r for r in runs if r.stopped is None]:
        batches = []
        for run in live:
            run.step += 1
            batches.append(next(run.batches))
        # the backbone's dropout as train_prompt uses it (on while prompts learn, off while scoring); one mask draw
        # for the stacked batch, seeded by the first live member's step so a resumed group draws the same masks
        backbone.model.train(members[0].settings.dropout)
        if members[0].settings.dropout:
            torch.manual_seed(step_seed(live[0].settings.seed, live[0].step))
        # a member's prompt reaches only its own rows, so d(sum)/d(prompt_k) = d(loss_k)/d(prompt_k)
        losses = group_backward(backbone, [(r.prompt.weight, b, r.label_ids) for r, b in zip(live, batches, strict=True)],
                                per_pass, autocast)
        ok = []
        for run, loss in zip(live, losses, strict=True):
            if torch.isfinite(loss):
                ok.append((run, loss))
            else:
                _fail(run, f"non-finite loss {loss.item()}")
        if not ok:
            continue
        due = []
        for run, loss in ok:
            if run.settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([run.prompt.weight], run.settings.max_grad_norm)
            run.opt.step()
            run.sched.step()
            run.opt.zero_grad(set_to_none=True)
            if not torch.isfinite(run.prompt.weight).all():  # a diverged update must never become its "best"
                _fail(run, "non-finite prompt after the update")
                continue
            run.losses.append(loss.item())
            if run.step % run.settings.eval_every == 0 or run.step == run.settings.steps:
                due.append(run)
            elif run.step >= run.settings.steps:
                run.stopped = "max_steps"
        bar.update(len(ok))
        if due:
            for run, dev in zip(due, _evaluate(backbone, due, per_pass), strict=True):
                _record(run, dev)
            if on_evaluated:
                on_evaluated()
    bar.close()
    backbone.model.eval()  # backbones are shared: leave them as loaded
    seconds = time.perf_counter() - t0
    return [TrainResult(prompt=r.best_prompt.cpu(), best_step=r.best_step, best_metric=r.best, metric=r.member.spec.metric,
                        curve=r.curve, steps_done=r.step, stopped=r.stopped, seconds=seconds) for r in runs]


def _record(run: _Run, dev: float) -> None:
    """One member's evaluation: curve point, best checkpoint, report, early stop (train_prompt's order)."""
    train_loss = sum(run.losses) / len(run.losses)
    run.losses = []
    run.curve.append({"step": run.step, "dev_metric": dev, "train_loss": train_loss})
    if dev > run.best:
        run.best, run.best_step, run.stale = dev, run.step, 0
        run.best_prompt = run.prompt.weight.detach().clone()
    else:
        run.stale += 1
    if run.member.report:
        run.member.report({f"dev_{run.member.spec.metric}": dev, "train_loss": train_loss, "best_dev_metric": run.best},
                          run.step, _state(run))
    if run.settings.patience is not None and run.stale >= run.settings.patience:
        run.stopped = "early_stop"
    elif run.step >= run.settings.steps:
        run.stopped = "max_steps"
