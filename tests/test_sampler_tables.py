"""make_plan against its own golden tables: every table, scalar and error of a grid of plans.

The golden file (tests/data/sampler_tables.npz) was written by the make_plan of commit 4a51034,
before the table builders were rewritten as flat functions; the rewrite must reproduce every
table to 1e-12 relative (a golden zero stays exactly zero), every scalar, and every error's
class, field and message. tests/test_samplers.py checks the same tables against diffusers; this
file pins them over many more options and step counts than that oracle can afford to run.

Regenerate (only for an intended change of behaviour, and say so in the commit):
    .venv/bin/python -m tests.test_sampler_tables --write
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from ldmrt.config import SAMPLERS, SchedulerConfig
from ldmrt.sampling import make_plan

GOLDEN = Path(__file__).parent / "data" / "sampler_tables.npz"
RTOL = 1e-12
ROW_TABLES = ("timesteps", "input_scale", "noise_coefs", "needs_noise", "clip_sample_coefs",
              "clip_output_coefs", "clip_coefs")               # (N,) each
LAG_TABLES = ("sample_coefs", "output_coefs")                  # (N, K) each
EXACT_FIELDS = ("name", "prediction_type", "num_steps", "strength", "eta", "start_step", "clip_range",
                "history", "num_evaluations")                  # compared by repr (value and type)
CLOSE_FIELDS = ("init_noise_sigma", "init_latent_coef", "init_noise_coef")

# --- the grid ------------------------------------------------------------------------------------

SD = {}                                                        # SchedulerConfig(): SD 1.x, leading + 1
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
COSINE = {"beta_schedule": "squaredcos_cap_v2"}
V = {"prediction_type": "v_prediction"}
SPACINGS = ({"timestep_spacing": "leading", "steps_offset": 1}, {"timestep_spacing": "leading", "steps_offset": 0},
            {"timestep_spacing": "linspace", "steps_offset": 0}, {"timestep_spacing": "trailing", "steps_offset": 0})
CLIP = {"clip_sample": True}
V_TRAILING_CLIPPED = {**V, **COSINE, "timestep_spacing": "trailing", "clip_sample": True, "clip_sample_range": 2.5}
EXTRA_SCHEDULES = (
    CLIP, V_TRAILING_CLIPPED, {**LINEAR, **CLIP, "set_alpha_to_one": True}, {"set_alpha_to_one": True},
    {**V, "timestep_spacing": "linspace", "set_alpha_to_one": True}, {"timestep_scaling": 1.0},
    {"timestep_scaling": 4.5, "original_inference_steps": 20}, {"original_inference_steps": 100},
    {"timestep_spacing": "trailing", "steps_offset": 1},
    {**LINEAR, "num_train_timesteps": 100, "original_inference_steps": 30},
    {**COSINE, **V, "num_train_timesteps": 100, "timestep_spacing": "trailing", "original_inference_steps": 100},
    # the checkpoint left these unset: each sampler takes its diffusers class's defaults instead
    {"timestep_spacing": "trailing", "steps_offset": 0, "clip_sample": True, "set_alpha_to_one": True,
     "defaulted_fields": ["timestep_spacing", "steps_offset", "clip_sample", "set_alpha_to_one"]},
)
# alpha_bar underflows in float32 near t = T-1: non-finite coefficients, refused as degenerate
DEGENERATE_SCHEDULES = tuple({**LINEAR, "num_train_timesteps": 20000, **spacing} for spacing in SPACINGS)


def _case(sampler, schedule, steps, **options) -> dict:
    return {"sampler": sampler, "schedule": schedule, "steps": steps, "options": options}


def grid() -> list[dict]:
    cases = []
    for beta in (LINEAR, SD, COSINE):
        for prediction in ({}, V):
            for spacing in SPACINGS:
                cases += [_case(s, {**beta, **prediction, **spacing}, n) for s in SAMPLERS for n in (1, 2, 3, 6)]
    cases += [_case(s, schedule, n) for schedule in EXTRA_SCHEDULES for s in SAMPLERS for n in (1, 4, 10)]
    cases += [_case(s, schedule, n) for schedule in DEGENERATE_SCHEDULES for s in SAMPLERS for n in (1, 2, 3)]
    for schedule in (SD, CLIP, V_TRAILING_CLIPPED):            # DDIM's eta, alone and with img2img
        cases += [_case("ddim", schedule, n, eta=eta) for eta in (0.25, 1.0) for n in (1, 3, 10)]
        cases += [_case("ddim", schedule, 10, eta=0.5, strength=0.45)]
    for schedule in (SD, V_TRAILING_CLIPPED):                  # img2img
        cases += [_case(s, schedule, n, strength=strength) for s in SAMPLERS for n in (2, 5, 10)
                  for strength in (0.3, 0.5, 0.8)]
        cases += [_case(s, schedule, 10, strength=0.1) for s in SAMPLERS]
    for schedule in (SD, V_TRAILING_CLIPPED):                  # LCM's original schedule
        cases += [_case("lcm", schedule, n, original_inference_steps=original, **strength)
                  for original in (1, 4, 10, 100, 1000) for n in (1, 3, 4, 10)
                  for strength in ({}, {"strength": 0.5})]
    # long schedules (999 and 1000 steps; 1000 is one too many with steps_offset 1)
    cases += [_case(s, SD, n) for s in SAMPLERS if s != "lcm" for n in (50, 999, 1000)]
    cases += [_case(s, V_TRAILING_CLIPPED, 1000) for s in ("ddim", "plms", "dpmpp-2m")]
    cases += [_case("lcm", V_TRAILING_CLIPPED, n, original_inference_steps=1000) for n in (999, 1000)]
    return cases + ERRORS


ERRORS = [
    *[_case("ddim", SD, steps) for steps in (0, -3, 2.5, True, "4", None)],
    _case("dpmpp-2m", {"steps_offset": 0}, 1000), _case("ddpm", {"timestep_spacing": "trailing"}, 1001),
    _case("lcm", SD, 51),
    *[_case("ddim", SD, 10, eta=eta) for eta in (-0.1, 1.5, math.nan, True, "0.5")],
    *[_case(s, SD, 10, eta=0.5) for s in ("ddpm", "plms", "euler-a", "lcm")],
    *[_case("euler", SD, 10, strength=strength) for strength in (0.0, -0.5, 1.5, math.nan, True)],
    *[_case(s, SD, 10, strength=0.05) for s in ("ddim", "euler", "dpmpp-2m-karras")],
    _case("lcm", SD, 1, strength=0.01),
    _case("ddim", SD, 10, original_inference_steps=20),
    *[_case("lcm", SD, 4, original_inference_steps=original) for original in (0, 1001, 2.5)],
    _case("ddpm", SD, 0, eta=0.5, strength=0.0),                # which check speaks first
    _case("heun", SD, 10),
]


def case_id(case: dict) -> str:
    return json.dumps(case, sort_keys=True)


def run(case: dict):
    """make_plan for one case (the plan, or the LdmrtError it raised)."""
    schedule = dict(case["schedule"])
    if "defaulted_fields" in schedule:
        schedule["defaulted_fields"] = tuple(schedule["defaulted_fields"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)        # the degenerate schedules overflow
        try:
            return make_plan(case["sampler"], SchedulerConfig(**schedule), case["steps"], **case["options"])
        except Exception as exc:                               # noqa: BLE001  (every error is recorded)
            return exc


def _error_record(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__module__}.{type(exc).__qualname__}", "field": getattr(exc, "field", None),
            "message": str(exc)}


# --- the golden file -----------------------------------------------------------------------------

def write_golden(path: Path = GOLDEN) -> None:
    index, columns = {}, {name: [] for name in ROW_TABLES + LAG_TABLES}
    rows = lags = 0
    for case in grid():
        outcome = run(case)
        if isinstance(outcome, BaseException):
            index[case_id(case)] = _error_record(outcome)
            continue
        record = {"row_offset": rows, "lag_offset": lags}
        record.update({name: repr(_field(outcome, name)) for name in EXACT_FIELDS})
        record.update({name: getattr(outcome, name) for name in CLOSE_FIELDS})
        for name in ROW_TABLES + LAG_TABLES:
            columns[name].append(getattr(outcome, name).ravel())
        rows += outcome.num_evaluations
        lags += outcome.num_evaluations * outcome.history
        index[case_id(case)] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, index=np.array(json.dumps(index)),
                        **{name: np.concatenate(parts) for name, parts in columns.items()})


def _field(plan, name: str):
    value = getattr(plan, name)
    return value.value if name == "prediction_type" else value


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing: write it with python -m tests.test_sampler_tables --write")
    with np.load(GOLDEN, allow_pickle=False) as data:
        return json.loads(str(data["index"])), {name: data[name] for name in ROW_TABLES + LAG_TABLES}


CASES = grid()


def test_the_golden_file_holds_exactly_this_grid(golden):
    index, _ = golden
    ids = [case_id(case) for case in CASES]
    assert len(set(ids)) == len(ids), "the grid repeats a case"
    assert set(index) == set(ids)
    plans = sum("error" not in record for record in index.values())
    assert plans >= 300 and len(index) - plans >= 40           # a few hundred plans, every kind of refusal


def test_the_grid_reaches_every_kind_of_error(golden):
    """The refusals the golden file pins: the caller's fields, the step limit, degenerate schedules."""
    index, _ = golden
    kinds = {(record["error"], record["field"]) for record in index.values() if "error" in record}
    assert kinds == {("ldmrt.errors.GenerationError", field)
                     for field in ("steps", "eta", "strength", "original_inference_steps")} \
        | {("ldmrt.errors.ConfigError", None)}
    assert any("repeats timesteps, which leaves non-finite" in record.get("message", "")
               for record in index.values())


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c['sampler']}-{c['steps']}" for i, c in enumerate(CASES)])
def test_make_plan_reproduces_the_golden_tables(case, golden):
    index, columns = golden
    expected = index[case_id(case)]
    outcome = run(case)
    if "error" in expected:
        assert isinstance(outcome, BaseException), f"expected {expected['error']}, got a plan"
        assert _error_record(outcome) == expected
        return
    assert not isinstance(outcome, BaseException), f"expected a plan, got {_error_record(outcome)}"
    plan = outcome
    assert {name: repr(_field(plan, name)) for name in EXACT_FIELDS} == \
        {name: expected[name] for name in EXACT_FIELDS}
    for name in CLOSE_FIELDS:
        assert isinstance(getattr(plan, name), float)
        assert getattr(plan, name) == pytest.approx(expected[name], rel=RTOL, abs=0), name
    n, k = plan.num_evaluations, plan.history
    for name in ROW_TABLES + LAG_TABLES:
        table = getattr(plan, name)
        offset, width = (expected["row_offset"], n) if name in ROW_TABLES else (expected["lag_offset"], n * k)
        assert table.shape == ((n,) if name in ROW_TABLES else (n, k)), name
        reference = columns[name][offset:offset + width].reshape(table.shape)
        assert table.dtype == reference.dtype, name
        assert not table.flags.writeable, f"{name} is writeable"
        if table.dtype == bool:
            np.testing.assert_array_equal(table, reference, err_msg=name)
        else:                                                  # a golden zero must stay exactly zero
            np.testing.assert_allclose(table, reference, rtol=RTOL, atol=0, err_msg=name)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_sampler_tables --write")
    write_golden()
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
