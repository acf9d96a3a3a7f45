"""Recognition metrics against values computed by hand, scikit-learn and the VOC devkit's AP."""

import importlib

import pytest
import torch

from zoo.metrics import average_precision, mean_average_precision, recognition, top_k_accuracy


def voc2012_ap(scores, targets):
    """Test-only reference: the VOC 2010-2012 devkit's VOCap (all-point interpolation) for one class, written
    from its description: rank by score, cumulate hits, make precision non-increasing, sum over recall steps."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tp = fp = 0
    recall, precision = [0.0], [0.0]
    for i in order:
        tp, fp = tp + targets[i], fp + 1 - targets[i]
        recall.append(tp / sum(targets))
        precision.append(tp / (tp + fp))
    recall.append(1.0)
    precision.append(0.0)
    for k in range(len(precision) - 2, -1, -1):
        precision[k] = max(precision[k], precision[k + 1])
    return sum((recall[k + 1] - recall[k]) * precision[k + 1] for k in range(len(recall) - 1))


# ---- top-k accuracy ----------------------------------------------------------------------------------------


def test_top_k_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.0],    # label 1 first
                           [0.4, 0.3, 0.2, 0.1],    # label 2 third
                           [0.3, 0.3, 0.1, 0.0]])   # label 1 tied for first: counts as second
    hits = top_k_accuracy(scores, torch.tensor([1, 2, 1]), ks=(1, 2, 3))
    torch.testing.assert_close(hits, torch.tensor([[1.0, 1, 1], [0, 0, 1], [0, 1, 1]]))
    torch.testing.assert_close(top_k_accuracy(scores, torch.tensor([1, 2, 1]), ks=2), hits[:, 1:2])


def test_top_k_matches_scikit_learn():
    metrics = importlib.import_module("sklearn.metrics")
    scores, labels = torch.randn(300, 12), torch.randint(0, 12, (300,))
    hits = top_k_accuracy(scores, labels, ks=(1, 5))
    for column, k in enumerate((1, 5)):
        expected = metrics.top_k_accuracy_score(labels.numpy(), scores.numpy(), k=k, labels=list(range(12)))
        torch.testing.assert_close(hits[:, column].mean(), torch.tensor(expected, dtype=torch.float))


# ---- average precision -------------------------------------------------------------------------------------


def column(*values):
    return torch.tensor(values)[:, None]


def test_average_precision_by_hand():
    scores = column(0.9, 0.8, 0.7)
    targets = column(0, 1, 1)
    # precision at the two positives: 1/2 and 2/3; interpolated, both become max(1/2, 2/3)
    torch.testing.assert_close(average_precision(scores, targets), torch.tensor([(1 / 2 + 2 / 3) / 2]))
    torch.testing.assert_close(average_precision(scores, targets, interpolated=True), torch.tensor([2 / 3]))


def test_equal_scores_enter_together():
    # one threshold holding a positive and a negative: precision 1/2 for the positive, whatever the sort order
    for targets in (column(1, 0), column(0, 1)):
        torch.testing.assert_close(average_precision(column(0.5, 0.5), targets), torch.tensor([0.5]))
        torch.testing.assert_close(average_precision(column(0.5, 0.5), targets, interpolated=True),
                                   torch.tensor([0.5]))


def test_difficult_entries_are_ignored():
    scores, targets = column(0.9, 0.8, 0.7), column(0, 1, 1)
    difficult = column(1, 0, 0)  # the top-ranked negative no longer counts: AP 1
    torch.testing.assert_close(average_precision(scores, targets, difficult), torch.tensor([1.0]))
    difficult = column(0, 1, 0)  # nor does the first positive: precision 1/2 at the remaining one
    torch.testing.assert_close(average_precision(scores, targets, difficult), torch.tensor([0.5]))


def test_class_without_positives_is_nan_and_left_out_of_the_mean():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.6]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 1]])
    difficult = torch.tensor([[0, 0, 0], [0, 0, 1]])  # the only positive of class 2 is difficult
    ap = average_precision(scores, targets, difficult)
    assert ap[0] == 1 and ap[1:].isnan().all()
    torch.testing.assert_close(mean_average_precision(scores, targets, difficult), torch.tensor(1.0))
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(scores, torch.zeros_like(targets))


def test_average_precision_matches_scikit_learn():
    metrics = importlib.import_module("sklearn.metrics")
    scores = (torch.randn(120, 6) * 2).round() / 2  # many ties
    targets = (torch.rand(120, 6) < 0.3).long()
    difficult = (torch.rand(120, 6) < 0.1).long()
    expected = []
    for c in range(6):
        keep = difficult[:, c] == 0  # scikit-learn has no "difficult": drop those entries
        expected.append(metrics.average_precision_score(targets[keep, c].numpy(), scores[keep, c].numpy()))
    expected = torch.tensor(expected, dtype=torch.float)
    torch.testing.assert_close(average_precision(scores, targets, difficult), expected)
    # scikit-learn's "macro" average is our mAP when every class has positives
    torch.testing.assert_close(mean_average_precision(scores, targets),
                               torch.tensor(metrics.average_precision_score(targets, scores), dtype=torch.float))


def test_interpolated_average_precision_matches_the_voc_devkit():
    scores = torch.randn(80, 5)  # no ties: the devkit ranks tied scores in sort order, we keep them together
    targets = (torch.rand(80, 5) < 0.4).long()
    expected = torch.tensor([voc2012_ap(scores[:, c].tolist(), targets[:, c].tolist()) for c in range(5)])
    torch.testing.assert_close(average_precision(scores, targets, interpolated=True), expected)
    assert (average_precision(scores, targets, interpolated=True) >= average_precision(scores, targets)).all()


# ---- what training and the harness report -----------------------------------------------------------------


def test_recognition_reports_the_metrics_of_the_labels_in_percent():
    metrics = importlib.import_module("sklearn.metrics")
    scores, labels = torch.randn(200, 8), torch.randint(0, 8, (200,))
    expected = {f"top{k}": 100 * metrics.top_k_accuracy_score(labels, scores, k=k, labels=list(range(8)))
                for k in (1, 5)}
    assert recognition(scores, labels) == pytest.approx(expected, rel=1e-5)
    assert set(recognition(scores[:, :3], labels % 3)) == {"top1"}  # fewer than five classes: no top-5
    targets = (torch.rand(200, 8) < 0.3).long()
    expected = {"mAP": 100 * metrics.average_precision_score(targets.numpy(), scores.numpy())}
    assert recognition(scores, targets) == pytest.approx(expected, rel=1e-5)


# ---- inputs ------------------------------------------------------------------------------------------------


def test_bad_inputs_are_named():
    scores = torch.rand(4, 3)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        top_k_accuracy(scores, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        top_k_accuracy(scores, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(ValueError, match=r"integer tensor \[4\]"):
        top_k_accuracy(scores, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"ks must be integers in \[1, 3\]"):
        top_k_accuracy(scores, torch.tensor([0, 1, 2, 0]), ks=(1, 5))
    with pytest.raises(ValueError, match="NaN"):
        top_k_accuracy(torch.full((4, 3), float("nan")), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"targets must be a tensor \[4, 3\]"):
        average_precision(scores, torch.ones(4, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        average_precision(scores, torch.full((4, 3), 2))
    with pytest.raises(ValueError, match=r"difficult must be a tensor \[4, 3\]"):
        average_precision(scores, torch.ones(4, 3), difficult=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"float tensor \[N, C\]"):
        average_precision(torch.rand(4), torch.ones(4))
