"""Schedules: values at known steps, computed by hand, and every construction error."""

import dataclasses
import math

import pytest

from lightning_kd.schedules import (
    Constant,
    Cosine,
    Exponential,
    Linear,
    Schedule,
    Step,
    as_schedule,
)


def values(schedule, total, steps):
    return [schedule(s, total) for s in steps]


# -- shapes at known steps ------------------------------------------------------------------------
def test_constant():
    assert values(Constant(3.0), 10, [0, 5, 9, 10, 100]) == [3.0] * 5
    assert Constant(2).start == 2.0 and isinstance(Constant(2)(0, 1), float)


def test_linear():
    s = Linear(4.0, 1.0)
    assert values(s, 10, [0, 1, 5, 9, 10]) == pytest.approx([4.0, 3.7, 2.5, 1.3, 1.0])
    # endpoints exactly, even where start + (end - start) would round: 0.1 + (0.3 - 0.1) != 0.3
    assert Linear(0.1, 0.3)(0, 7) == 0.1 and Linear(0.1, 0.3)(7, 7) == 0.3


def test_cosine():
    s = Cosine(4.0, 0.0)
    # 2 * (1 + cos(pi * p)): p = 1/4 -> 2 + sqrt(2), p = 1/2 -> 2, p = 3/4 -> 2 - sqrt(2)
    assert values(s, 8, [0, 2, 4, 6, 8]) == pytest.approx([4.0, 2 + math.sqrt(2), 2.0, 2 - math.sqrt(2), 0.0])
    assert Cosine(1.0, 3.0)(5, 10) == pytest.approx(2.0)  # increasing works too


def test_exponential():
    s = Exponential(8.0, 0.5)  # ratio 1/16 over 4 steps: halves each step
    assert values(s, 4, [0, 1, 2, 3, 4]) == pytest.approx([8.0, 4.0, 2.0, 1.0, 0.5])
    assert Exponential(1.0, 100.0)(1, 2) == pytest.approx(10.0)
    assert s(4, 4) == 0.5  # exact end


def test_step_fraction_milestones():
    s = Step([4.0, 2.0, 1.0], milestones=[0.3, 0.6])
    # progress 0.3 is step 3 of 10, progress 0.6 is step 6
    assert values(s, 10, range(11)) == [4.0] * 3 + [2.0] * 3 + [1.0] * 5


def test_step_int_milestones():
    s = Step([1.0, 0.5, 0.25], milestones=[2, 5])
    assert values(s, 10, range(8)) == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert s.value_range() == (0.25, 1.0)


def test_step_int_milestones_count_from_end_of_warmup():
    s = Step([1.0, 0.0], milestones=[2], warmup=2, warmup_start=0.5)
    assert values(s, 10, range(6)) == [0.5, 0.75, 1.0, 1.0, 0.0, 0.0]


# -- horizon, clamping ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule", [Constant(2.0), Linear(4.0, 1.0), Cosine(4.0, 1.0), Exponential(4.0, 1.0), Step([4.0, 1.0], [0.5])]
)
def test_clamped_outside_the_horizon(schedule):
    assert schedule(-5, 10) == schedule(0, 10) == schedule.start
    assert schedule(10, 10) == schedule(11, 10) == schedule(10**9, 10) == schedule.end


def test_own_total_overrides_the_callers_and_then_holds_end():
    s = Linear(4.0, 0.0, total=4)
    assert values(s, 1000, [0, 1, 2, 4, 500]) == [4.0, 3.0, 2.0, 0.0, 0.0]
    assert s(2) == 2.0  # no caller total needed


# -- warm-up --------------------------------------------------------------------------------------
def test_int_warmup_ramps_then_runs_over_the_rest():
    s = Linear(4.0, 1.0, warmup=2, warmup_start=0.0)
    # warm-up 0 -> 4 over steps 0, 1; then linear 4 -> 1 over the remaining 6 steps (2..8)
    assert values(s, 8, [0, 1, 2, 4, 5, 8]) == pytest.approx([0.0, 2.0, 4.0, 3.0, 2.5, 1.0])


def test_warmup_defaults_to_holding_start():
    s = Cosine(2.0, 1.0, warmup=4)
    assert values(s, 12, [0, 3, 4]) == [2.0, 2.0, 2.0]
    assert s(8, 12) == pytest.approx(1.5)  # middle of the cosine part (4..12)


def test_fraction_warmup_is_rounded_to_steps():
    s = Linear(1.0, 0.0, warmup=0.3, warmup_start=0.4)  # 0.3 * 10 = 3.0000000000000004 -> 3 steps
    assert s.warmup_steps(10) == 3
    assert values(s, 10, [0, 1, 2, 3, 10]) == pytest.approx([0.4, 0.6, 0.8, 1.0, 0.0])
    assert s(3, 10) == 1.0  # exactly start at the boundary, not still in warm-up
    assert Linear(1.0, 0.0, warmup=0.25).warmup_steps(100) == 25


def test_constant_with_warmup_is_a_linear_ramp():
    s = Constant(1.0, warmup=20, warmup_start=0.0)  # DKD's KD-weight warm-up
    assert values(s, 240, [0, 5, 10, 19, 20, 239]) == pytest.approx([0.0, 0.25, 0.5, 0.95, 1.0, 1.0])


def test_warmup_as_long_as_the_horizon():
    s = Linear(1.0, 0.0, warmup=5, warmup_start=0.0)
    assert values(s, 5, [0, 4, 5, 6]) == pytest.approx([0.0, 0.8, 0.0, 0.0])


# -- value_range ----------------------------------------------------------------------------------
def test_value_range():
    assert Linear(4.0, 1.0).value_range() == (1.0, 4.0)
    assert Cosine(1.0, 4.0).value_range() == (1.0, 4.0)
    assert Linear(4.0, 1.0, warmup=3, warmup_start=0.5).value_range() == (0.5, 4.0)
    assert Linear(4.0, 1.0, warmup=3, warmup_start=9.0).value_range() == (1.0, 9.0)
    # warmup_start is irrelevant without a warm-up
    assert Constant(1.0, warmup_start=-3.0).value_range() == (1.0, 1.0)
    assert Step([2.0, 5.0, 1.0], [1, 2]).value_range() == (1.0, 5.0)


@pytest.mark.parametrize(
    "schedule",
    [Linear(4.0, 1.0, warmup=0.2, warmup_start=0.5), Cosine(0.0, 1.0, warmup=3), Exponential(8.0, 0.1)],
)
def test_value_range_bounds_the_trajectory(schedule):
    low, high = schedule.value_range()
    trajectory = values(schedule, 17, range(20))
    assert low <= min(trajectory) and max(trajectory) <= high


# -- helpers, repr, equality ----------------------------------------------------------------------
def test_as_schedule():
    s = Linear(1.0, 0.0)
    assert as_schedule(s) is s
    assert as_schedule(4) == Constant(4.0)
    assert as_schedule(0.5)(3, 10) == 0.5
    for bad in ("4", None, True, [1.0]):
        with pytest.raises(TypeError, match="Expected a number or a Schedule, but got"):
            as_schedule(bad)


def test_repr_and_eq():
    assert repr(Linear(4, 1)) == "Linear(start=4.0, end=1.0, warmup=0, warmup_start=None, total=None)"
    assert repr(Cosine(4.0, 1.0, warmup=5, warmup_start=0.0, total=100)) == (
        "Cosine(start=4.0, end=1.0, warmup=5, warmup_start=0.0, total=100)"
    )
    assert repr(Step([2.0, 1.0], [0.5])) == (
        "Step(values=(2.0, 1.0), milestones=(0.5,), warmup=0, warmup_start=None, total=None)"
    )
    assert repr(Constant(1.0, warmup=0.1)) == "Constant(value=1.0, warmup=0.1, warmup_start=None, total=None)"
    assert Linear(1.0, 0.0) == Linear(1, 0) and Linear(1.0, 0.0) != Cosine(1.0, 0.0)
    assert Linear(1.0, 0.0) != Linear(1.0, 0.0, total=3)
    assert Step([2, 1], [0.5]) == Step((2.0, 1.0), (0.5,))  # lists become tuples
    assert eval(repr(Cosine(4.0, 1.0, warmup=0.1, total=7))) == Cosine(4.0, 1.0, warmup=0.1, total=7)


def test_frozen_and_hashable():
    s = Linear(4.0, 1.0, warmup=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.start = 2.0
    assert {s: "T", Constant(1): "w"}[Linear(4, 1, warmup=2)] == "T"
    assert hash(Step([2.0, 1.0], [1])) == hash(Step([2, 1], [1]))
    shorter = dataclasses.replace(s, total=10)  # a variant, validated like any other
    assert shorter == Linear(4.0, 1.0, warmup=2, total=10) and shorter(10) == 1.0 and s.total is None
    with pytest.raises(ValueError, match="Expected `total` to be an int >= 1 or None, but got 0"):
        dataclasses.replace(s, total=0)


def test_base_class_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Schedule()


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"warmup": -1}, ValueError, r"Expected `warmup` to be an int >= 0 \(steps\), but got -1"),
        ({"warmup": 1.0}, ValueError, r"Expected `warmup` to be a float in \[0, 1\) .*, but got 1.0"),
        ({"warmup": -0.1}, ValueError, r"Expected `warmup` to be a float in \[0, 1\)"),
        ({"warmup": "5"}, TypeError, r"Expected `warmup` to be an int >= 0 \(steps\) or a float .* but got '5'"),
        ({"warmup": True}, TypeError, "Expected `warmup` to be an int"),
        ({"total": 0}, ValueError, r"Expected `total` to be an int >= 1 or None, but got 0"),
        ({"total": 10.0}, TypeError, r"Expected `total` to be an int >= 1 or None, but got 10.0 of type float"),
        ({"warmup_start": "0"}, TypeError, "Expected `warmup_start` to be a real number, but got '0'"),
        ({"start": math.nan}, ValueError, "Expected `start` to be finite, but got nan"),
        ({"end": math.inf}, ValueError, "Expected `end` to be finite, but got inf"),
        ({"start": None}, TypeError, "Expected `start` to be a real number, but got None"),
    ],
)
def test_construction_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Linear(**{"start": 1.0, "end": 0.0, **kwargs})


def test_constant_value_error():
    with pytest.raises(TypeError, match="Expected `value` to be a real number, but got '1'"):
        Constant("1")


@pytest.mark.parametrize(("start", "end", "name"), [(0.0, 1.0, "start"), (1.0, -2.0, "end")])
def test_exponential_needs_positive_endpoints(start, end, name):
    with pytest.raises(ValueError, match=f"Expected `{name}` of Exponential to be > 0, but got"):
        Exponential(start, end)


@pytest.mark.parametrize(
    ("values_", "milestones", "error", "match"),
    [
        ([1.0, 0.0], [0.5, 0.7], ValueError, r"Expected `values` to have len\(milestones\) \+ 1 = 3 entries, but got"),
        ([1.0, 0.0], [], ValueError, "Expected `values` to have len"),
        ([1.0], [], ValueError, "Expected at least one milestone"),
        ([1.0, 0.0, 2.0], [0.6, 0.4], ValueError, r"Expected `milestones` to be strictly increasing, but got \[0.6,"),
        ([1.0, 0.0, 2.0], [3, 3], ValueError, "Expected `milestones` to be strictly increasing"),
        ([1.0, 0.0], [1.0], ValueError, r"Expected `milestones` to be all ints >= 1 .* or all floats in \(0, 1\)"),
        ([1.0, 0.0], [0], ValueError, r"Expected `milestones` to be all ints >= 1"),
        ([1.0, 0.0, 2.0], [0.5, 3], TypeError, r"Expected `milestones` to be all ints >= 1 .* but got \[0.5, 3\]"),
        ([1.0, 0.0], "1", TypeError, "Expected `milestones` to be a sequence of ints or floats"),
        (1.0, [0.5], TypeError, "Expected `values` to be a sequence of numbers"),
        ([1.0, "0"], [0.5], TypeError, r"Expected `values\[1\]` to be a real number"),
    ],
)
def test_step_errors(values_, milestones, error, match):
    with pytest.raises(error, match=match):
        Step(values_, milestones)


def test_step_int_milestones_beyond_the_horizon():
    s = Step([1.0, 0.5, 0.0], milestones=[10, 30])  # e.g. epochs given to a per-step schedule
    assert s(0, 30) == 1.0
    with pytest.raises(ValueError, match=r"Expected the int `milestones` to be <= the 20 steps after warm-up"):
        s(0, 20)


@pytest.mark.parametrize("total", [None, math.inf, 0, -1])
def test_call_needs_a_finite_horizon(total):
    match = "Expected a horizon" if total is None else "Expected `total` to be a finite number of steps >= 1"
    with pytest.raises(ValueError, match=match):
        Linear(1.0, 0.0)(0, total)
