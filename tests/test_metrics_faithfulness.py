"""Metrics against values computed by hand."""

import torch

from evaluation.metrics import average_drop, average_gain, average_increase

ON_IMAGE = torch.tensor([0.5, 0.8, 0.2, 0.4])
ON_MASKED = torch.tensor([0.25, 0.8, 0.6, 0.1])


def test_average_drop_by_hand():
    # drops: 0.25/0.5 = 0.5, 0, 0 (a gain), 0.3/0.4 = 0.75 -> mean 0.3125
    torch.testing.assert_close(average_drop(ON_IMAGE, ON_MASKED), torch.tensor(31.25))


def test_average_gain_by_hand():
    # gains: 0, 0, 0.4/0.8 = 0.5, 0 -> mean 0.125
    torch.testing.assert_close(average_gain(ON_IMAGE, ON_MASKED), torch.tensor(12.5))


def test_average_increase_is_strict():
    # only the third image increases; equal probabilities do not count
    torch.testing.assert_close(average_increase(ON_IMAGE, ON_MASKED), torch.tensor(25.0))
