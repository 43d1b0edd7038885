"""Schedule and its run state: windows, plateaus, decays, the stop and the anneal."""

import math

import pytest

from pyro_nf.fitting.schedule import Schedule


def test_a_plateau_decays_then_stops():
    state = Schedule(window=4, patience=2, num_decays=1, decay=0.5).start(1.0)
    improving = [10.0 - 0.1 * i for i in range(8)]
    flat = [9.5, 9.6, 9.4, 9.5]  # mean 9.5, above the best window mean 9.45
    events = [state.record(loss) for loss in improving]
    assert events[3] == "improved" and events[7] == "improved"
    events = [state.record(loss) for loss in flat * 4]
    assert events[3] == "stale" and events[7] == "decay"
    assert state.decays == 1 and state.lr(0.0) == 0.5
    assert events[11] == "stale" and events[15] == "stop" and state.converged


def test_noise_within_the_threshold_is_no_improvement():
    state = Schedule(window=4, patience=1, threshold=1.0).start(1.0)
    [state.record(v) for v in (1.0, 2.0, 1.0, 2.0)]
    events = [state.record(v) for v in (0.9, 2.0, 1.0, 2.0)]  # mean 1.475 vs 1.5, se 0.27
    assert events[-1] == "decay"


def test_anneal_covers_the_last_fraction_of_the_budget():
    schedule = Schedule(anneal_fraction=0.25, anneal_to=0.01)
    assert schedule.anneal_factor(0.75) == 1.0
    assert math.isclose(schedule.anneal_factor(0.875), 0.1)
    assert math.isclose(schedule.anneal_factor(2.0), 0.01)  # past the budget: no lower
    assert Schedule(anneal_fraction=0.0).anneal_factor(1.0) == 1.0


def test_a_schedule_serves_many_runs():
    schedule = Schedule(window=2, patience=1, num_decays=0)
    first = schedule.start(1.0)
    [first.record(v) for v in (1.0, 1.0, 1.0, 1.0)]
    assert first.converged and not schedule.start(1.0).converged


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(window=1), ValueError, "window must be an integer >= 2, got 1"),
        (dict(window=2.5), TypeError, "window must be an integer >= 2, got 2.5"),
        (dict(patience=True), TypeError, "patience must be an integer >= 1, got True"),
        (dict(num_decays=-1), ValueError, "num_decays must be an integer >= 0, got -1"),
        (dict(decay=0.0), ValueError, "decay must be in"),
        (dict(anneal_to=2.0), ValueError, "anneal_to must be in"),
        (dict(anneal_fraction=-0.1), ValueError, "anneal_fraction must be in"),
        (dict(threshold=float("nan")), ValueError, "threshold must be finite"),
    ],
)
def test_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        Schedule(**kwargs)


def test_a_minibatch_loss_gets_windows_of_whole_epochs():
    state = Schedule(window=100).start(1.0)
    state.subsampled(epoch_steps=30)
    assert state.window == 120 and state.epoch_steps == 30
    state = Schedule(window=100).start(1.0)
    state.subsampled(epoch_steps=250)  # one epoch is longer than the window
    assert state.window == 250


def test_on_a_minibatch_loss_a_plateau_waits_for_the_parameters():
    state = Schedule(window=2, patience=1, num_decays=1).start(1.0)
    state.subsampled(epoch_steps=2)
    drifts = iter([None, 0.6, 0.05, 0.05])  # unknown, moving, then at rest twice
    events = [state.record(v, lambda: next(drifts)) for v in (1.0, 1.0) * 4]
    assert events == ["step", "improved", "step", "moving", "step", "decay", "step", "stop"]
    assert state.last_drift == 0.05 and state.converged


def test_a_full_batch_loss_ignores_the_drift():
    state = Schedule(window=2, patience=1, num_decays=0).start(1.0)
    events = [state.record(v, lambda: 0.9) for v in (1.0, 1.0, 1.0, 1.0)]
    assert events == ["step", "improved", "step", "stop"] and state.last_drift is None


def test_after_a_decay_moving_parameters_hold_a_plateau_off_for_a_while_only():
    schedule = Schedule(window=2, patience=1, num_decays=2, drift_patience=2)
    state = schedule.start(1.0)
    state.subsampled(epoch_steps=2)
    moving = lambda: 0.9  # noqa: E731 - the parameters never stop
    events = [state.record(1.0, moving) for _ in range(26)][1::2]
    # the first rate waits 4 x 2 windows, the next 2; a plateau of one window each time
    assert events == ["improved", *["moving"] * 7, "decay", "moving", "decay", "moving", "stop"]
