"""Samplers as coefficient tables, and the one denoising loop that applies them.

A leaf package (numpy, config and errors only): the runtime, every backend and the int8
calibration import it; it imports none of them.

    settings.py   which settings and how many steps each sampler runs with (scheduler_for, max_steps)
    plan.py       SamplerPlan (the tables), History, step (one update in numpy)
    tables.py     make_plan: checks, the training schedule, assembling a builder's rows
    builders.py   one function per sampler: its coefficient rows, from its paper's formulas
    denoise.py    the Denoiser contract, its numpy reference, guidance, the device step table
"""
from ldmrt.config import SAMPLERS
from ldmrt.sampling.denoise import (MAX_HISTORY, STEP_TABLE_COLUMNS, DenoiseJob, DenoiseResult, Denoiser,
                                    NumpyDenoiser, StepCallback, guide, step_table)
from ldmrt.sampling.plan import History, SamplerPlan, step
from ldmrt.sampling.settings import CLASS_SAMPLER_DEFAULTS, SAMPLER_CLASSES, max_steps, scheduler_for
from ldmrt.sampling.tables import make_plan, training_alphas_cumprod

__all__ = ["SAMPLERS", "SAMPLER_CLASSES", "CLASS_SAMPLER_DEFAULTS", "SamplerPlan", "History", "step",
           "make_plan", "max_steps", "scheduler_for", "training_alphas_cumprod", "DenoiseJob",
           "DenoiseResult", "Denoiser", "NumpyDenoiser", "StepCallback", "guide", "MAX_HISTORY",
           "STEP_TABLE_COLUMNS", "step_table"]
