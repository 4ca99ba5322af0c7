"""CUDA checks: the same scores on the GPU as on the CPU, bf16 autocast close to fp32, the decoder-only
prompt-once path equal to one pass under bf16, and a bf16 training run on the GPU that learns.

CI has no GPU, so these never run there and are not counted as its coverage; run them on a GPU machine with
`pytest -m gpu tests/test_gpu.py` (benchmarks/gpu.sh runs them before the GPU benchmarks).
"""

import pytest
import torch

from ptx.backbones import load_backbone
from ptx.data import iterate_batches
from ptx.tasks import load_task
from ptx.train import TrainSettings, train_prompt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [("tiny-bert", "prepend"), ("tiny-roberta", "paper"), ("tiny-t5", "prepend"), ("tiny-llama", "prepend")]


@pytest.fixture(scope="module")
def spec():
    return load_task("tweet_sentiment")


def _pair(name, insertion):
    return load_backbone(name, insertion=insertion), load_backbone(name, insertion=insertion, device="cuda")


@pytest.mark.parametrize("name,insertion", CASES)
def test_label_logits_on_cuda_match_cpu(name, insertion, spec, fixed_split):
    cpu, gpu = _pair(name, insertion)
    batch = next(iterate_batches(fixed_split(cpu), 8, cpu.pad_id, seed=None))
    labels = cpu.label_ids(spec.verbalizer)
    prompts = torch.randn(2, 5, cpu.d_model, generator=torch.Generator().manual_seed(0)) * 0.5
    want = cpu.label_logits(prompts, batch, labels)
    fp32 = gpu.label_logits(prompts.cuda(), batch, labels).cpu()
    assert fp32.shape == want.shape == (2, 8, len(spec.verbalizer))
    torch.testing.assert_close(fp32, want, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = gpu.label_logits(prompts.cuda(), batch, labels).cpu()
    assert bf16.dtype == torch.float32  # label_logits hands back fp32 logits for the loss
    # bf16 keeps ~3 significant digits per op; tiny random models give small logits, so errors of a few per cent
    # of the largest logit are normal there, while a wrong cast or position would be off by the whole scale
    scale = want.abs().max().item() + 1e-3
    assert (bf16 - want).abs().max().item() < 0.15 * scale, (bf16 - want).abs().max().item()


def test_prompt_once_equals_one_pass_under_bf16(spec, fixed_split):
    gpu = load_backbone("tiny-llama", device="cuda")
    assert not gpu._prompt_once()  # one pass on CUDA (faster there); the prompt-once path stays correct there too
    batch = next(iterate_batches(fixed_split(gpu), 8, gpu.pad_id, seed=None))
    labels = gpu.label_ids(spec.verbalizer)
    base = torch.randn(2, 5, gpu.d_model, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * 0.5
    grads, logits = [], []
    for once in (True, False):
        prompts = base.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = gpu._hidden_prompt_once(prompts, batch) if once else gpu.hidden_at_score(prompts, batch)
            out = gpu._head(hidden, labels).float()
        out.sum().backward()
        logits.append(out.detach())
        grads.append(prompts.grad)
    scale = logits[1].abs().max().item() + 1e-3
    assert (logits[0] - logits[1]).abs().max().item() < 0.05 * scale
    gscale = grads[1].abs().max().item()
    assert gscale > 0 and (grads[0] - grads[1]).abs().max().item() < 0.05 * gscale


def _run(backbone, spec, data, bf16: bool):
    init = torch.randn(4, backbone.d_model, generator=torch.Generator().manual_seed(0)) * 0.5
    settings = TrainSettings(steps=12, batch_size=8, lr=0.03, eval_every=1, eval_batch_size=8, bf16=bf16)
    return train_prompt(backbone, spec, init, data, data, settings)


def test_training_on_cuda_matches_cpu_in_fp32_and_learns_in_bf16(spec, fixed_split):
    cpu, gpu = _pair("tiny-llama", "prepend")
    on_cpu = _run(cpu, spec, fixed_split(cpu), bf16=False)
    fp32 = _run(gpu, spec, fixed_split(gpu), bf16=False)
    cpu_losses = [c["train_loss"] for c in on_cpu.curve[1:]]
    gpu_losses = [c["train_loss"] for c in fp32.curve[1:]]
    assert len(cpu_losses) == 12
    torch.testing.assert_close(torch.tensor(gpu_losses), torch.tensor(cpu_losses), atol=1e-4, rtol=1e-4)
    bf16 = _run(gpu, spec, fixed_split(gpu), bf16=True)
    losses = [c["train_loss"] for c in bf16.curve[1:]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert bf16.prompt.device.type == "cpu" and bf16.prompt.dtype == torch.float32
    assert bf16.stopped == "max_steps" and bf16.steps_done == 12
