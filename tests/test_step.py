"""The step, the LR schedule and evaluation of step.py, unit by unit (eager, small tensors)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastalex.config import TrainConfig


def test_lr_schedules():
    from fastalex.step import lr_factor, peak_lr

    reference = TrainConfig(
        recipe="reference", lr=0.02, batch_size=128, lr_schedule="step", epochs=30
    )
    assert peak_lr(reference) == pytest.approx(0.01)
    assert [lr_factor(reference, 10, s) for s in (0, 69, 70, 139, 140)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )
    fast = TrainConfig(epochs=4, warmup_epochs=1)
    factors = [lr_factor(fast, 10, s) for s in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(1 / 30)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def eager_cpu_runtime():
    from fastalex.runtime import resolve_runtime

    return resolve_runtime(TrainConfig(device="cpu", compile=False, amp="off"))


class FirstRow(torch.nn.Module):
    """A stand-in model whose logits are the top row of the first channel, (N, W): it tells left
    from right and top from bottom."""

    def forward(self, images):
        return images[:, 0, 0, :]


def test_evaluate_counts_top5_among_the_five_best_of_ten_classes():
    from fastalex.loaders import Batch
    from fastalex.step import evaluate

    logits = torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
    order = logits.argsort(dim=1, descending=True)
    ranks = torch.arange(40) % 10  # each label is the (rank + 1)-th best class: ranks 0..9, 4 each
    labels = order[torch.arange(40), ranks]
    images = logits[:, None, None, :].expand(40, 3, 1, 10)  # FirstRow reads the logits back
    batches = [Batch(images[i : i + 16], labels[i : i + 16]) for i in range(0, 40, 16)]
    result = evaluate(FirstRow(), batches, eager_cpu_runtime(), flip_tta=False)
    assert result["samples"] == 40
    assert result["top1"] == pytest.approx(100 * 4 / 40)  # rank 0
    assert result["top5"] == pytest.approx(100 * 20 / 40)  # ranks 0-4
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def test_flip_tta_averages_the_logits_of_the_image_and_its_left_right_mirror():
    from fastalex.loaders import Batch
    from fastalex.step import evaluate

    images = torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 6
    top_row = images[:, 0, 0, :]  # (N, 6); its left-right mirror is top_row.flip(1)
    expected = (top_row + top_row.flip(1)) / 2
    result = evaluate(FirstRow(), [Batch(images, labels)], eager_cpu_runtime(), flip_tta=True)
    assert result["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(expected, labels).item(), rel=1e-6
    )
    assert result["top1"] == pytest.approx(
        100 * (expected.argmax(1) == labels).float().mean().item()
    )
    plain = evaluate(FirstRow(), [Batch(images, labels)], eager_cpu_runtime(), flip_tta=False)
    assert plain["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(top_row, labels).item(), rel=1e-6
    )


def smoothed_cross_entropy(logits, labels, smoothing):
    """Label-smoothed cross-entropy from its definition: targets (1 - e) one-hot + e / classes."""
    classes = logits.shape[1]
    targets = torch.full_like(logits, smoothing / classes)
    targets[torch.arange(len(labels)), labels] += 1 - smoothing
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def test_train_step_descends_the_label_smoothed_loss_of_the_recipe():
    from fastalex.step import make_train_step

    cfg = TrainConfig(device="cpu", compile=False, amp="off")
    assert cfg.recipe == "fast" and cfg.label_smoothing > 0  # the fast recipe smooths labels
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    reference = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    reference.load_state_dict(model.state_dict())
    images, labels = torch.randn(8, 3, 2, 2), torch.arange(8) % 5
    loss = smoothed_cross_entropy(reference(images), labels, cfg.label_smoothing)
    loss.backward()
    lr = 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = make_train_step(model, optimizer, scaler, cfg, eager_cpu_runtime())
    loss_sum, correct = step(images, labels)
    assert loss_sum.item() == pytest.approx(8 * loss.item(), rel=1e-5)
    assert correct.item() == (reference(images).argmax(1) == labels).sum().item()
    for param, before in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(param.detach(), before.detach() - lr * before.grad)


def test_peak_lr_scales_with_the_global_batch_whatever_the_process_count():
    from fastalex.step import peak_lr

    cfg = TrainConfig(lr=0.02, batch_size=128)  # per 256 images; 128 across all processes
    assert [peak_lr(dataclasses.replace(cfg, batch_size=b)) for b in (128, 256, 1024)] == (
        pytest.approx([0.01, 0.02, 0.08])
    )
