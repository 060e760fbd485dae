"""Metrics per task (lora_cli/run/evaluate.py) equal a hand computation over the whole
set, however it is split into batches; the training loss marks ignored rows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_cli.run.evaluate import IGNORE, evaluate, ignore_rows, loss_fn, loss_items, macro_f1


class Fixed(nn.Module):
    """Returns the precomputed outputs of the rows it is given (inputs are row ids)."""

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.outputs = outputs

    def forward(self, ids):
        return self.outputs[ids]


def split(n: int, sizes: list[int]):
    start = 0
    for s in sizes:
        yield torch.arange(start, min(n, start + s))
        start += s


def run(outputs, targets, task, sizes, **kw):
    model = Fixed(outputs)
    return evaluate(model, ((ids, targets[ids]) for ids in split(len(targets), sizes)), task, **kw)


def test_regression_metrics_are_those_of_the_whole_set():
    g = torch.Generator().manual_seed(0)
    pred, y = torch.randn(23, 1, generator=g), torch.randn(23, generator=g) * 2 + 1
    m = run(pred, y, "regression", [5, 7, 11])
    p, t = pred.squeeze(1).tolist(), y.tolist()
    mse = sum((a - b) ** 2 for a, b in zip(p, t)) / 23
    mean = sum(t) / 23
    var = sum((b - mean) ** 2 for b in t) / 23
    assert m["n"] == 23
    assert m["mse"] == pytest.approx(mse, rel=1e-5) and m["loss"] == m["mse"]
    assert m["mae"] == pytest.approx(sum(abs(a - b) for a, b in zip(p, t)) / 23, rel=1e-5)
    assert m["r2"] == pytest.approx(1 - mse / var, rel=1e-4)


def test_classification_metrics_equal_a_hand_count():
    g = torch.Generator().manual_seed(1)
    k, n = 3, 31
    logits, y = torch.randn(n, k, generator=g), torch.randint(0, k, (n,), generator=g)
    m = run(logits, y, "classification", [4, 4, 23], num_classes=k)
    pred = logits.argmax(-1).tolist()
    truth = y.tolist()
    nll = sum(math.log(sum(math.exp(v) for v in row)) - row[c] for row, c in zip(logits.tolist(), truth)) / n
    f1s = []
    for c in range(k):
        tp = sum(p == c and t == c for p, t in zip(pred, truth))
        fp = sum(p == c and t != c for p, t in zip(pred, truth))
        fn = sum(p != c and t == c for p, t in zip(pred, truth))
        prec, rec = (tp / (tp + fp) if tp + fp else 0.0), (tp / (tp + fn) if tp + fn else 0.0)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    assert m["n"] == n and m["loss"] == pytest.approx(nll, rel=1e-5)
    assert m["accuracy"] == sum(p == t for p, t in zip(pred, truth)) / n
    assert m["macro_f1"] == pytest.approx(sum(f1s) / k, rel=1e-9)
    assert sum(map(sum, m["confusion"])) == n
    assert [m["confusion"][c][c] for c in range(k)] == [sum(p == t == c for p, t in zip(pred, truth))
                                                        for c in range(k)]


def test_macro_f1_of_a_perfect_and_of_an_empty_class():
    assert macro_f1(torch.tensor([[3, 0], [0, 5]])) == 1.0
    assert macro_f1(torch.tensor([[4, 0, 0], [0, 0, 0], [1, 0, 0]])) == pytest.approx((2 * 0.8 * 1 / 1.8) / 3)


def test_causal_lm_perplexity_counts_only_the_labelled_tokens():
    g = torch.Generator().manual_seed(2)
    b, t, v = 5, 6, 7
    logits, labels = torch.randn(b, t, v, generator=g), torch.randint(0, v, (b, t), generator=g)
    labels[:, :2] = IGNORE                      # prompt tokens
    labels[3, 4:] = IGNORE                      # padding
    m = run(logits, labels, "causal_lm", [2, 3])
    nll, count, correct = 0.0, 0, 0
    for row, lab in zip(logits.tolist(), labels.tolist()):
        for scores, c in zip(row, lab):
            if c == IGNORE:
                continue
            nll += math.log(sum(math.exp(s) for s in scores)) - scores[c]
            correct += max(range(v), key=lambda i: scores[i]) == c
            count += 1
    assert m["n"] == count == b * (t - 2) - 2
    assert m["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert m["token_accuracy"] == correct / count


def test_evaluation_restores_the_training_mode_and_needs_no_grad():
    model = Fixed(torch.randn(4, 1))
    model.train()
    seen = []
    model.register_forward_hook(lambda mod, i, o: seen.append((mod.training, torch.is_grad_enabled())))
    run_ = evaluate(model, [(torch.arange(4), torch.zeros(4))], "regression")
    assert seen == [(False, False)] and model.training and run_["n"] == 4


@pytest.mark.parametrize("task", ["regression", "classification", "causal_lm"])
def test_ignored_rows_count_for_nothing_and_the_sum_is_the_mean_times_the_items(task):
    g = torch.Generator().manual_seed(3)
    if task == "regression":
        out, y = torch.randn(6, 1, generator=g), torch.randn(6, generator=g)
    elif task == "classification":
        out, y = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    else:
        out, y = torch.randn(6, 3, 5, generator=g), torch.randint(0, 5, (6, 3), generator=g)
    keep = torch.tensor([True, False, True, True, False, True])
    masked = ignore_rows(task, y, keep)
    assert loss_items(task, masked) == loss_items(task, y[keep])
    torch.testing.assert_close(loss_fn(task, out, masked), loss_fn(task, out[keep], y[keep]))
    torch.testing.assert_close(loss_fn(task, out, masked, reduction="sum"),
                               loss_fn(task, out[keep], y[keep]) * loss_items(task, y[keep]))
    assert ignore_rows(task, y, torch.ones(6, dtype=torch.bool)) is y         # nothing to mask: no copy
