"""One prompt-tuning run, written out top to bottom. Knows nothing of Ray or MLflow: it reports through a callable."""

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ptx.data import iterate_batches
from ptx.errors import PtxError
from ptx.evaluate import bf16_autocast, score_prompts
from ptx.fields import Range
from ptx.prompt import SoftPrompt

log = logging.getLogger(__name__)
LABEL_LOSSES = ("label_words", "full_vocab")


@dataclass(frozen=True)
class TrainSettings:
    # types and ranges are checked where values enter (spec loader, CLI options): ptx.fields.check_value
    steps: Annotated[int, Range(ge=1)] = 1000  # optimizer steps
    batch_size: Annotated[int, Range(ge=1)] = 16  # the paper's batch size
    # the paper's RoBERTa-base rate (1e-4 RoBERTa-large, 5e-3 T5-base); the bound is far above any useful rate, far
    # below where AdamW's fp32 step size overflows (3e37)
    lr: Annotated[float, Range(gt=0, le=1e6)] = 1e-3
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    warmup_steps: Annotated[int, Range(ge=0)] = 0  # linear warm-up, then constant (the paper used a constant rate)
    max_grad_norm: Annotated[float, Range(gt=0)] | None = None  # clip the prompt's gradient norm when set
    eval_every: Annotated[int, Range(ge=1)] = 100  # steps between dev evaluations (also the report/checkpoint cadence)
    eval_batch_size: Annotated[int, Range(ge=1)] = 64
    patience: Annotated[int, Range(ge=1)] | None = None  # stop after this many evaluations without a dev improvement
    seed: Annotated[int, Range(ge=0, lt=2**32)] = 0  # numpy's seed range
    bf16: bool = True  # autocast to bf16 on CUDA; ignored on CPU
    # torch.compile the training forward (dynamic shapes). Off by default: it pays on a GPU, where a small step is
    # bound by kernel launches (1.6x on an H200, roberta-large, batch 16; benchmarks/RESULTS.md), and costs
    # minutes of compilation on CPU for a 16% gain there
    compile: bool = False
    # The backbone's own dropout during prompt updates (train mode), never while scoring (eval mode). The paper's
    # code (thunlp/Prompt-Transferability, tools/train_tool.py) called model.train() before its training epochs
    # and model.eval() only inside validation, so the frozen PLM's dropout was active while the prompt learned.
    dropout: bool = True
    # Classification loss: "label_words" is a softmax over the task's label words at the scoring position;
    # "full_vocab" is the LM's cross-entropy over its whole vocabulary at that position, gold = the label word's
    # token (what the paper's T5 code optimised: labels=<label word> in T5's own LM loss)
    label_loss: str = "label_words"
    # prompts trained together in one stacked pass by a sweep (ptx.train_group); None or "auto": the sweep's rule
    # (on GPUs the largest group that fits the memory, ptx.config.gpu_plans; 1 on CPU). Checked by ptx.config.
    # How runs are executed, not what they compute: left out of a run's config hash
    group_size: int | str | None = None


@dataclass
class TrainResult:
    prompt: torch.Tensor  # the best dev checkpoint [n_tokens, d_model]
    best_step: int
    best_metric: float
    metric: str
    curve: list = field(default_factory=list)  # [{step, dev_metric, train_loss}], step 0 = the init
    steps_done: int = 0
    stopped: str = "max_steps"  # max_steps | early_stop | nonfinite_loss
    seconds: float = 0.0


Report = Callable[..., None]  # report(metrics: dict, step: int, state: dict | None = None)


def train_prompt(backbone, spec, init: torch.Tensor, train_data, dev_data, settings: TrainSettings,
                 report: Report | None = None, resume: dict | None = None, progress: bool = False) -> TrainResult:
    """Tune a soft prompt in front of a frozen backbone; keep the best dev checkpoint."""
    device = backbone.device
    if len(train_data) == 0:
        raise PtxError(f"task '{spec.name}': the training split is empty")
    if not torch.isfinite(init).all():  # its step-0 score would make it the "best" prompt
        raise PtxError(f"the initial prompt holds NaN or inf values (shape {list(init.shape)})")
    if settings.label_loss not in LABEL_LOSSES:
        raise PtxError(f"train.label_loss: expected one of {list(LABEL_LOSSES)}, found {settings.label_loss!r}")
    torch.manual_seed(settings.seed)
    prompt = SoftPrompt(init).to(device)
    opt = torch.optim.AdamW([prompt.weight], lr=settings.lr, weight_decay=settings.weight_decay)
    warm = max(1, settings.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if settings.warmup_steps else 1.0)
    generation = spec.kind == "generation"
    label_ids = None if generation else backbone.label_ids(spec.label_words(backbone.kind)).to(device)
    if label_ids is not None and settings.label_loss == "full_vocab":
        gold_ids, label_ids = label_ids, torch.arange(backbone.model.get_output_embeddings().weight.shape[0],
                                                      device=device)
    else:
        gold_ids = None
    label_logits = torch.compile(backbone.label_logits, dynamic=True) if settings.compile else backbone.label_logits

    def evaluate() -> float:
        backbone.model.eval()  # scoring never sees dropout
        return score_prompts(backbone, prompt.weight.detach(), spec, dev_data, settings.eval_batch_size)[0]

    start, curve, best, best_step, stale = 0, [], -math.inf, 0, 0
    best_prompt = prompt.weight.detach().clone()
    if resume:  # continue a run from its last checkpoint (a retried or resumed trial)
        prompt.weight.data.copy_(resume["prompt"].to(device))
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start, curve, best, best_step = resume["step"], list(resume["curve"]), resume["best_metric"], resume["best_step"]
        best_prompt, stale = resume["best_prompt"].to(device), resume.get("stale", 0)
    else:
        best = evaluate()
        curve.append({"step": 0, "dev_metric": best, "train_loss": None})
        if report:
            report({f"dev_{spec.metric}": best, "best_dev_metric": best}, 0, None)

    # a resumed run skips the batches it already saw: from here on it sees what an uninterrupted run would
    batches = iterate_batches(train_data, settings.batch_size, backbone.pad_id, seed=settings.seed, epochs=None,
                              skip=start)
    t0, losses, stopped, step = time.perf_counter(), [], "max_steps", start
    bar = tqdm(total=settings.steps, initial=start, disable=not progress, desc=f"tuning {spec.name}")
    for step in range(start + 1, settings.steps + 1):
        batch = next(batches)
        backbone.model.train(settings.dropout)  # evaluate() switches back to eval mode
        if settings.dropout:
            torch.manual_seed(step_seed(settings.seed, step))
        with bf16_autocast(backbone) if settings.bf16 else torch.autocast(device.type, enabled=False):
            if generation:
                loss = backbone.seq2seq_loss(prompt.weight, batch)
            else:
                logits = label_logits(prompt.weight, batch, label_ids)
                gold = batch["labels"].to(device)
                loss = F.cross_entropy(logits.float(), gold if gold_ids is None else gold_ids[gold])
        if not torch.isfinite(loss):
            stopped, step = "nonfinite_loss", step - 1
            log.error("non-finite loss %s at step %d; keeping the best checkpoint (step %d)", loss.item(), step + 1,
                      best_step)
            break
        loss.backward()
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([prompt.weight], settings.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(prompt.weight).all():  # a diverged update: its dev score must never become "best"
            stopped, step = "nonfinite_loss", step - 1
            log.error("non-finite prompt after the update of step %d; keeping the best checkpoint (step %d)",
                      step + 1, best_step)
            break
        losses.append(loss.item())
        bar.update(1)
        if step % settings.eval_every == 0 or step == settings.steps:
            dev = evaluate()
            train_loss = sum(losses) / len(losses)
            losses = []
            curve.append({"step": step, "dev_metric": dev, "train_loss": train_loss})
            if dev > best:
                best, best_step, stale = dev, step, 0
                best_prompt = prompt.weight.detach().clone()
            else:
                stale += 1
            bar.set_postfix(loss=f"{train_loss:.3f}", dev=f"{dev:.3f}", best=f"{best:.3f}")
            if report:
                # copies: on CPU .cpu() aliases the live tensors, which the next steps update in place
                state = {"prompt": prompt.weight.detach().cpu().clone(), "optimizer": copy.deepcopy(opt.state_dict()),
                         "scheduler": sched.state_dict(), "step": step, "curve": list(curve), "best_metric": best,
                         "best_step": best_step, "best_prompt": best_prompt.cpu(), "stale": stale}
                report({f"dev_{spec.metric}": dev, "train_loss": train_loss, "best_dev_metric": best}, step, state)
            if settings.patience is not None and stale >= settings.patience:
                stopped = "early_stop"
                break
    bar.close()
    backbone.model.eval()  # backbones are shared (actor pools, the CLI): leave them as loaded
    return TrainResult(prompt=best_prompt.cpu(), best_step=best_step, best_metric=best, metric=spec.metric,
                       curve=curve, steps_done=step, stopped=stopped, seconds=time.perf_counter() - t0)


def step_seed(seed: int, step: int) -> int:
    """The dropout RNG seed of one step: a resumed run draws the masks an uninterrupted run would have drawn."""
    return (seed * 1_000_003 + step) % (2 ** 63)


def settings_dict(settings: TrainSettings) -> dict:
    """Settings as a plain dict (for params and hashes)."""
    return asdict(settings)


def save_checkpoint(state: dict, directory) -> None:
    """Write a training state (from `report`) as safetensors + JSON: no pickle."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    opt = state["optimizer"]
    tensors = {"prompt": state["prompt"], "best_prompt": state["best_prompt"]}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            tensors[f"opt.{pid}.{key}"] = value.detach().cpu() if torch.is_tensor(value) else torch.tensor(value)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "state.safetensors"))
    meta = {k: state[k] for k in ("step", "curve", "best_metric", "best_step", "stale")}
    meta.update(param_groups=opt["param_groups"], scheduler=state["scheduler"],
                extra={k: v for k, v in state.items() if k.startswith("mlflow") or k.startswith("ptx")})
    (directory / "state.json").write_text(json.dumps(meta, sort_keys=True, default=str))


def load_checkpoint(directory) -> dict:
    """Read a state written by `save_checkpoint` back into the dict `train_prompt(resume=...)` takes."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(str(directory / "state.safetensors"))
    meta = json.loads((directory / "state.json").read_text())
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    state = {k: meta[k] for k in ("step", "curve", "best_metric", "best_step", "stale")}
    state.update(prompt=tensors["prompt"], best_prompt=tensors["best_prompt"], scheduler=meta["scheduler"],
                 optimizer={"state": opt_state, "param_groups": meta["param_groups"]}, **meta.get("extra", {}))
    return state
