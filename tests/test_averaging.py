"""Iterate averaging: the mean over the plateau windows, applied at a decay or the stop."""

import torch

from pyro_nf.fitting.averaging import IterateAverage


def run(average, params, values, events, window, name="p"):
    for value, event in zip(values, events, strict=True):
        params[name].fill_(value)
        average.add(params)
        average.end(event, window, params)


def test_an_improving_window_drops_the_earlier_means():
    param = torch.zeros(2)
    average = IterateAverage(patience=2)
    run(
        average, {"p": param}, [1.0, 3.0, 10.0, 20.0], ["improved", "improved", "stale", "decay"], 1
    )
    assert torch.equal(param, torch.full((2,), 15.0))  # only the plateau: 10 and 20


def test_only_the_last_patience_windows_count():
    param = torch.zeros(1)
    average = IterateAverage(patience=2)
    run(average, {"p": param}, [1.0, 2.0, 3.0, 5.0], ["stale", "stale", "stale", "stop"], 1)
    assert param.item() == 4.0  # windows 3 and 5
    assert average.window_means == []


def test_parameters_added_later_are_averaged_over_their_windows():
    first, params = torch.zeros(1), {}
    params["a"] = first
    average = IterateAverage(patience=3)
    run(average, params, [2.0], ["stale"], 1, name="a")
    params["b"] = torch.zeros(1)
    params["b"].fill_(6.0)
    run(average, params, [4.0], ["decay"], 1, name="a")
    assert first.item() == 3.0 and params["b"].item() == 6.0


def test_no_plateau_no_change():
    param = torch.zeros(1)
    average = IterateAverage(patience=2)
    run(average, {"p": param}, [1.0, 2.0], ["step", "stale"], 2)
    assert param.item() == 2.0 and len(average.window_means) == 1
