"""Counting what a run reports: top-k hits at each k, on problems with more classes than k."""

from __future__ import annotations

import torch

from fastalex.metrics import count_topk, percent


def ranked_logits(label_ranks: list[int], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels where sample i's label is the (label_ranks[i] + 1)-th best class."""
    logits, labels = [], []
    for i, rank in enumerate(label_ranks):
        order = torch.roll(torch.arange(classes), i)  # best class first; varies with i
        row = torch.empty(classes)
        row[order] = torch.linspace(10.0, 0.0, classes)
        logits.append(row)
        labels.append(int(order[rank]))
    return torch.stack(logits), torch.tensor(labels)


def test_count_topk_counts_a_label_among_the_k_best_classes():
    label_ranks = [0, 1, 2, 4, 5, 9, 0, 3]  # where each label ranks (0 = the best logit)
    logits, labels = ranked_logits(label_ranks, classes=10)
    hits = count_topk(logits, labels, (1, 2, 5, 10))
    expected = [sum(rank < k for rank in label_ranks) for k in (1, 2, 5, 10)]
    assert expected == [2, 3, 6, 8]
    assert hits.tolist() == expected and hits.dtype == torch.int64


def test_count_topk_counts_every_sample_when_k_exceeds_the_classes():
    logits, labels = ranked_logits([0, 1, 2, 3], classes=4)
    assert count_topk(logits, labels, (1, 5)).tolist() == [1, 4]


def test_percent_is_a_ratio_of_counts():
    assert percent(3, 12) == 25.0
    assert percent(0, 0) != percent(0, 0)  # nan: no samples, no rate


def test_loader_wait_counts_the_time_spent_fetching_on_the_cpu():
    import time

    from fastalex.metrics import LoaderWait

    wait = LoaderWait(torch.device("cpu"))
    for _ in range(3):
        with wait:
            time.sleep(0.05)  # a loader that makes the model wait
    slow = wait.seconds()
    assert slow >= 0.15
    quick = LoaderWait(torch.device("cpu"))
    with quick:
        pass  # a batch that was ready
    assert quick.seconds() < slow
