"""Issue 14 rows 6 and 18: the checkpoint's own scheduler (class, every config field) and one step
limit per sampler, against diffusers' schedulers as the oracle."""
from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest

from ldmrt.config import SAMPLERS, ModelConfig, PredictionType, SchedulerConfig, TimestepSpacing
from ldmrt.presets import preset
from ldmrt.errors import GenerationError
from ldmrt.sampling import make_plan, max_steps

from tests.test_samplers import compare_txt2img, feed_noise, oracle  # noqa: F401  (feed_noise: a fixture)

diffusers = pytest.importorskip("diffusers")

# --- row 18: one step limit per sampler --------------------------------------------------------

LIMIT_CASES = [(name, spacing, offset) for name in SAMPLERS for spacing in TimestepSpacing
               for offset in ((0, 1) if spacing == TimestepSpacing.LEADING else (1,))
               if name not in ("lcm", "dpmpp-2m-karras") or spacing == TimestepSpacing.LEADING]
# Every count up to the limit: ldmrt's rule (in range, no repeated timestep). Spot values:
EXPECTED_LIMITS = {("ddim", "leading", 1): 999, ("ddim", "leading", 0): 1000, ("euler", "leading", 1): 999,
                   ("dpmpp-2m", "leading", 1): 998, ("dpmpp-2m", "leading", 0): 999,
                   ("dpmpp-2m", "linspace", 1): 999, ("dpmpp-2m", "trailing", 1): 1000,
                   ("ddim", "trailing", 1): 1000, ("dpmpp-2m-karras", "leading", 1): 1000,
                   ("lcm", "leading", 1): 50}


@pytest.mark.parametrize("name, spacing, offset", LIMIT_CASES,
                         ids=[f"{n}-{s.value}-{o}" for n, s, o in LIMIT_CASES])
def test_each_sampler_runs_at_its_limit_and_refuses_one_more(name, spacing, offset, feed_noise):
    config = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset,
                             prediction_type=PredictionType.V_PREDICTION)
    limit = max_steps(name, config)
    expected = EXPECTED_LIMITS.get((name, spacing.value, offset))
    assert expected is None or limit == expected
    # runs and equals diffusers; ~1000 steps of stochastic samplers add up rounding: 6e-6 measured
    compare_txt2img(name, config, limit, feed_noise, seed=limit, rtol=2e-5)
    with pytest.raises(GenerationError, match=rf"^steps {limit + 1}: the '{name}' sampler takes at most "
                                              rf"{limit} steps here \(.+\); use at most {limit} steps$") as err:
        make_plan(name, config, limit + 1)
    assert err.value.field == "steps"


def test_one_more_step_than_the_limit_breaks_diffusers_too():
    """The limit is diffusers' own: one more leading step reaches timestep 1000 (an IndexError
    there), one more DPM-Solver step repeats a sigma (non-finite)."""
    config = SchedulerConfig()                                  # leading, steps_offset 1
    ddim = oracle("ddim", config)
    ddim.set_timesteps(max_steps("ddim", config) + 1)
    assert int(ddim.timesteps.max()) == config.num_train_timesteps
    dpm = oracle("dpmpp-2m", config, promote=False)
    dpm.set_timesteps(max_steps("dpmpp-2m", config) + 1)
    assert len(set(dpm.sigmas.tolist())) < len(dpm.sigmas)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp-2m"])
def test_trailing_spacing_has_exactly_the_steps_asked(name):
    """diffusers' float arange gives 62 of the counts 1..1000 an extra timestep -1; ldmrt takes
    the first N, which equal diffusers' first N."""
    config = SchedulerConfig(timestep_spacing=TimestepSpacing.TRAILING)
    odd = [n for n in range(1, 1001) if len(np.arange(1000, 0, -1000 / n)) != n]
    assert len(odd) == 62
    for num_steps in odd[:8]:
        reference = oracle(name, config)
        reference.set_timesteps(num_steps)
        plan = make_plan(name, config, num_steps)
        assert plan.num_evaluations == num_steps
        np.testing.assert_array_equal(plan.timesteps, reference.timesteps.numpy()[:num_steps])


def test_lcm_limit_follows_strength_and_original_steps():
    config = SchedulerConfig(original_inference_steps=30)
    assert max_steps("lcm", config) == 30 and max_steps("lcm", config, strength=0.5) == 15
    with pytest.raises(GenerationError, match=r"^steps 16: .*original_inference_steps \* strength = 30 \* 0.5"):
        make_plan("lcm", config, 16, strength=0.5)
    assert make_plan("lcm", config, 15, strength=0.5).num_evaluations == 15


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_steps=0), "steps"), (dict(num_steps=2.5), "steps"), (dict(eta=2.0), "eta"),
    (dict(strength=0.0), "strength"), (dict(original_inference_steps=0, name="lcm"), "original_inference_steps"),
])
def test_request_errors_name_their_field(kwargs, field):
    args = {"name": "ddim", "num_steps": 10, **kwargs}
    with pytest.raises(GenerationError) as err:
        make_plan(args.pop("name"), SchedulerConfig(), args.pop("num_steps"), **args)
    assert err.value.field == field and str(err.value).startswith(field)


# --- row 6: the checkpoint's own scheduler, every field honoured or refused ----------------------

from ldmrt.checkpoints import schedule as schedule_module  # noqa: E402
from ldmrt.checkpoints.schedule import scheduler_from_diffusers  # noqa: E402
from ldmrt.config import SAMPLER_FIELDS  # noqa: E402
from ldmrt.errors import CheckpointError  # noqa: E402
from ldmrt.sampling import CLASS_SAMPLER_DEFAULTS, SAMPLER_CLASSES, scheduler_for  # noqa: E402
from tests.reference import DIFFUSERS_SCHEDULERS  # noqa: E402

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# Checkpoint schedulers (class, arguments), each with settings off its class's defaults
FOLDERS = {
    "euler-v-trailing": ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction",
                                                        timestep_spacing="trailing")),
    "ddim-clip-0.5": ("DDIMScheduler", dict(SD, clip_sample=True, clip_sample_range=0.5, steps_offset=1)),
    "ddpm-clip-0.5-v": ("DDPMScheduler", dict(SD, clip_sample_range=0.5, prediction_type="v_prediction")),
    "pndm-sd": ("PNDMScheduler", dict(SD, steps_offset=1, skip_prk_steps=True)),
    "euler-a-leading": ("EulerAncestralDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1)),
    "dpm-karras": ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True)),
    "dpm-inert-options": ("DPMSolverMultistepScheduler", dict(SD, lower_order_final=False, euler_at_final=True,
                                                              sample_max_value=3.0, timestep_spacing="trailing")),
    "euler-inert-sigmas": ("EulerDiscreteScheduler", dict(SD, sigma_min=0.3, sigma_max=8.0)),
    "ddim-inert-threshold-options": ("DDIMScheduler", dict(SD, dynamic_thresholding_ratio=0.9,
                                                           sample_max_value=2.0, clip_sample=False)),
    "lcm-own-settings": ("LCMScheduler", dict(original_inference_steps=30, timestep_scaling=5.0,
                                              clip_sample=True, clip_sample_range=0.8)),
}


def saved_config(class_name: str, kwargs: dict, folder) -> dict:
    """scheduler_config.json as diffusers' save_pretrained writes it."""
    getattr(diffusers, class_name)(**kwargs).save_pretrained(folder)
    return json.loads((folder / "scheduler_config.json").read_text())


def loaded(class_name: str, kwargs: dict, folder):
    """(ldmrt's SchedulerConfig, diffusers' scheduler) from one saved folder."""
    config = saved_config(class_name, kwargs, folder)
    ours, _ = scheduler_from_diffusers(config, str(folder / "scheduler_config.json"))
    return ours, getattr(diffusers, class_name).from_pretrained(folder)


@pytest.mark.parametrize("case", list(FOLDERS))
def test_default_sampler_is_the_checkpoints_own_scheduler(case, tmp_path, feed_noise):
    """The default run of a folder equals its own diffusers scheduler's run."""
    class_name, kwargs = FOLDERS[case]
    ours, reference = loaded(class_name, kwargs, tmp_path)
    assert ours.scheduler_class == class_name
    assert SAMPLER_CLASSES[ours.default_sampler] == class_name
    steps = 13 if ours.default_sampler != "lcm" else 6
    compare_txt2img(ours.default_sampler, ours, steps, feed_noise, reference=reference)


def test_clip_sample_range_is_honoured(tmp_path, feed_noise):
    ours, reference = loaded("DDIMScheduler", dict(SD, clip_sample=True, clip_sample_range=0.5), tmp_path)
    assert ours.clip_sample_range == 0.5 and make_plan("ddim", ours, 8).clip_range == 0.5
    half = compare_txt2img("ddim", ours, 8, feed_noise, seed=5, reference=reference)
    whole = compare_txt2img("ddim", dataclasses.replace(ours, clip_sample_range=1.0), 8, feed_noise, seed=5)
    assert np.linalg.norm(half - whole) > 1e-3 * np.linalg.norm(whole), "the range made no difference"


SOURCES = ["pndm-sd", "ddim-clip-0.5", "euler-v-trailing", "lcm-own-settings", "dpm-karras"]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("source", SOURCES)
def test_another_sampler_takes_the_fields_diffusers_from_config_carries(source, name, tmp_path, feed_noise):
    """--sampler NAME == diffusers' NameClass.from_config(checkpoint scheduler.config, variant)."""
    class_name, kwargs = FOLDERS[source]
    ours, own = loaded(class_name, kwargs, tmp_path)
    target, variant = DIFFUSERS_SCHEDULERS[name]
    if "use_karras_sigmas" in inspect.signature(getattr(diffusers, target).__init__).parameters:
        # the sampler's name says whether it runs Karras sigmas: the option does not carry
        variant = {**variant, "use_karras_sigmas": name == "dpmpp-2m-karras"}
    reference = getattr(diffusers, target).from_config(own.config, **variant)
    resolved = scheduler_for(name, ours)
    for key in set(SAMPLER_FIELDS) & set(reference.config):
        value = getattr(resolved, key)
        assert (value.value if hasattr(value, "value") else value) == reference.config[key], key
    compare_txt2img(name, ours, 6, feed_noise, seed=11, reference=reference)


def test_unset_fields_take_the_running_class_defaults():
    """A PNDM config without clip_sample / timestep_spacing: ddim clips (DDIM's default), euler
    spaces linspace (Euler's), plms keeps PNDM's leading; as from_config gives them."""
    ours, notes = scheduler_from_diffusers({"_class_name": "PNDMScheduler", "skip_prk_steps": True, **SD},
                                           "s.json")
    assert {"clip_sample", "timestep_spacing"} <= set(ours.defaulted_fields)
    assert scheduler_for("ddim", ours).clip_sample and not scheduler_for("lcm", ours).clip_sample
    assert scheduler_for("euler", ours).timestep_spacing == TimestepSpacing.LINSPACE
    assert scheduler_for("plms", ours).timestep_spacing == TimestepSpacing.LEADING
    assert any("not set" in note for note in notes)
    explicit, _ = scheduler_from_diffusers({"_class_name": "PNDMScheduler", "skip_prk_steps": True,
                                            "clip_sample": False, **SD}, "s.json")    # SD 1.5's file
    assert not scheduler_for("ddim", explicit).clip_sample


def test_use_default_values_count_as_unset():
    instance = diffusers.PNDMScheduler(skip_prk_steps=True, **SD)     # in-memory config lists them
    ours, _ = scheduler_from_diffusers({**instance.config, "_class_name": "PNDMScheduler"}, "config")
    assert "timestep_spacing" in ours.defaulted_fields


# Every option of the classes ldmrt runs, at a value ldmrt cannot run: refused by name.
REFUSED = [
    ("DDIMScheduler", "thresholding", True), ("DDIMScheduler", "rescale_betas_zero_snr", True),
    ("DDPMScheduler", "variance_type", "fixed_large"), ("DDPMScheduler", "variance_type", "learned_range"),
    ("DDPMScheduler", "thresholding", True), ("PNDMScheduler", "skip_prk_steps", False),
    ("EulerDiscreteScheduler", "use_karras_sigmas", True), ("EulerDiscreteScheduler", "use_exponential_sigmas", True),
    ("EulerDiscreteScheduler", "use_beta_sigmas", True), ("EulerDiscreteScheduler", "interpolation_type", "log_linear"),
    ("EulerDiscreteScheduler", "timestep_type", "continuous"), ("EulerDiscreteScheduler", "final_sigmas_type", "sigma_min"),
    ("EulerDiscreteScheduler", "rescale_betas_zero_snr", True),
    ("EulerAncestralDiscreteScheduler", "rescale_betas_zero_snr", True),
    ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
    ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver"),
    ("DPMSolverMultistepScheduler", "solver_order", 3), ("DPMSolverMultistepScheduler", "solver_type", "heun"),
    ("DPMSolverMultistepScheduler", "final_sigmas_type", "sigma_min"),
    ("DPMSolverMultistepScheduler", "lambda_min_clipped", -5.1), ("DPMSolverMultistepScheduler", "use_lu_lambdas", True),
    ("DPMSolverMultistepScheduler", "variance_type", "learned_range"),
    ("DPMSolverMultistepScheduler", "use_flow_sigmas", True), ("DPMSolverMultistepScheduler", "thresholding", True),
    ("DPMSolverMultistepScheduler", "use_dynamic_shifting", True),
    ("LCMScheduler", "thresholding", True), ("LCMScheduler", "rescale_betas_zero_snr", True),
    ("UniPCMultistepScheduler", "thresholding", True), ("HeunDiscreteScheduler", "use_karras_sigmas", True),
]


@pytest.mark.parametrize("class_name, field, value", REFUSED, ids=[f"{c}-{f}-{v}" for c, f, v in REFUSED])
def test_a_field_ldmrt_cannot_run_fails_by_name(class_name, field, value, tmp_path):
    config = {**saved_config(class_name, {}, tmp_path), field: value}
    where = str(tmp_path / "scheduler_config.json")
    with pytest.raises(CheckpointError) as err:
        scheduler_from_diffusers(config, where)
    message = str(err.value)
    assert message.startswith(where) and f"{field}={json.dumps(value)} is not supported" in message
    assert "only" in message                                   # ... what ldmrt runs


def test_the_option_tables_cover_every_field_of_the_installed_diffusers():
    """Each class ldmrt runs: every __init__ field is training schedule, a SAMPLER_FIELD or a
    listed option (refused off its value, or inert), with diffusers' defaults."""
    for class_name, options in schedule_module._OPTIONS.items():
        defaults = {k: p.default for k, p in inspect.signature(getattr(diffusers, class_name).__init__)
                    .parameters.items() if k != "self"}
        sampler_fields = CLASS_SAMPLER_DEFAULTS[class_name]
        training = {**schedule_module._TRAINING_DEFAULTS, **schedule_module._TRAINING_OVERRIDES.get(class_name, {})}
        ours = {**training, **sampler_fields, **options}
        assert set(ours) == set(defaults), class_name
        for key, value in ours.items():
            assert (value.value if hasattr(value, "value") else value) == defaults[key], (class_name, key)
        assert set(defaults) & set(SAMPLER_FIELDS) == set(sampler_fields), class_name
        for key in options:
            assert key in schedule_module._RUNS_ONLY or key in schedule_module._INERT, (class_name, key)


@pytest.mark.parametrize("class_name", ["UniPCMultistepScheduler", "HeunDiscreteScheduler",
                                        "DPMSolverSinglestepScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_a_class_without_an_ldmrt_sampler_gets_the_nearest_loudly(class_name, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        ours, notes = scheduler_from_diffusers(saved_config(class_name, SD, tmp_path), "s.json")
    assert ours.scheduler_class == class_name
    assert ours.default_sampler == schedule_module._NEAREST[class_name]
    assert any(f"no sampler of {class_name}" in note for note in notes)
    assert f"no sampler of {class_name}" in caplog.text


def test_a_class_outside_the_ddpm_family_is_refused_by_name():
    with pytest.raises(CheckpointError, match="s.json: scheduler class 'FlowMatchEulerDiscreteScheduler' is "
                                              "not supported"):
        scheduler_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "s.json")


def test_trained_betas_are_honoured_when_they_are_a_known_schedule(tmp_path):
    reference = diffusers.DDIMScheduler(**SD)
    config = {**saved_config("DDIMScheduler", {}, tmp_path), "trained_betas": reference.betas.tolist()}
    ours, notes = scheduler_from_diffusers(config, "s.json")
    assert (ours.beta_schedule.value, ours.beta_start, ours.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert any("trained_betas" in note for note in notes)


def test_the_manifest_records_class_and_settings_and_old_manifests_load(tmp_path):
    from ldmrt.manifest import load_manifest
    from tests.test_manifest import make_bundle

    ours, _ = scheduler_from_diffusers(saved_config(*FOLDERS["lcm-own-settings"], tmp_path / "s"), "s.json")
    config = dataclasses.replace(preset("tiny"), scheduler=ours)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config      # as the manifest
    make_bundle(tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    data = json.loads(path.read_text())
    new_fields = ("clip_sample_range", "original_inference_steps", "timestep_scaling", "default_sampler",
                  "scheduler_class", "defaulted_fields")
    assert set(new_fields) <= set(data["config"]["scheduler"])
    for key in new_fields:                            # a bundle written before these fields existed
        del data["config"]["scheduler"][key]
    path.write_text(json.dumps(data))
    old = load_manifest(tmp_path / "b").config.scheduler
    assert old == preset("tiny").scheduler and old.default_sampler == "ddim" and old.clip_sample_range == 1.0


@pytest.mark.parametrize("field, value", [("default_sampler", "heun"), ("clip_sample_range", 0.0),
                                          ("timestep_scaling", float("nan")), ("original_inference_steps", 0),
                                          ("steps_offset", 1000), ("defaulted_fields", ("beta_start",))])
def test_bad_scheduler_values_are_config_errors(field, value):
    from ldmrt.errors import ConfigError
    with pytest.raises(ConfigError, match=f"SchedulerConfig.{field}"):
        SchedulerConfig(**{field: value})


# --- row 6 end to end: export a diffusers folder, generate with its own scheduler ---------------

@pytest.fixture(scope="module")
def euler_v_trailing_bundle(tmp_path_factory):
    """A diffusers SD folder whose scheduler is Euler, v-prediction, trailing; and its ldmrt bundle."""
    import transformers

    from ldmrt.checkpoints import checkpoint_source
    from ldmrt.export.bundle import ExportOptions, export_bundle
    from ldmrt.synthetic_tokenizer import write_synthetic_clip_assets
    from tests.pipeline_reference import GOLDEN_CONFIGS, GOLDEN_RANGES, golden_model

    root = tmp_path_factory.mktemp("euler-v-trailing")
    config = GOLDEN_CONFIGS["sd1"]
    model = golden_model(config, seed=3)
    write_synthetic_clip_assets(root / "assets", config.conditioner.vocab_size)
    scheduler = diffusers.EulerDiscreteScheduler(**FOLDERS["euler-v-trailing"][1])
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "assets",
                                                           model_max_length=config.conditioner.max_length)
    diffusers.StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, unet=model.unet, scheduler=scheduler,
        tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(root / "folder")
    bundle = export_bundle(checkpoint_source(root / "folder"), root / "bundle",
                           ExportOptions(shape_ranges=GOLDEN_RANGES)).path
    return root / "folder", bundle


def test_an_exported_folder_runs_its_own_scheduler_by_default(euler_v_trailing_bundle):
    from ldmrt.manifest import load_manifest
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline
    from tests.pipeline_reference import StepNoiseRecorder, run_reference

    folder, bundle = euler_v_trailing_bundle
    recorded = load_manifest(bundle).config.scheduler
    assert (recorded.scheduler_class, recorded.default_sampler) == ("EulerDiscreteScheduler", "euler")
    assert (recorded.prediction_type, recorded.timestep_spacing) == (PredictionType.V_PREDICTION,
                                                                     TimestepSpacing.TRAILING)
    pipeline = Pipeline.load(bundle, "onnxruntime", threads=1)
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    request = GenerationRequest(prompt="a red cat", negative_prompt="blurry", steps=5, guidance=7.5,
                                height=32, width=32, latents=latents)
    with StepNoiseRecorder() as recorder:
        found = pipeline.generate(request)                    # sampler=None: the bundle's default
    own = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                            requires_safety_checker=False)
    own.set_progress_bar_config(disable=True)
    assert type(own.scheduler).__name__ == "EulerDiscreteScheduler"
    expected = run_reference(own, request, recorder.noises)
    assert np.abs(found.images - expected).mean() <= 1 / 255       # design.md ladder 5
    ddim = pipeline.generate(dataclasses.replace(request, sampler="ddim"))     # what ran before
    assert np.abs(ddim.images - expected).mean() > 4 / 255, "the default sampler made no difference"


def test_too_many_steps_fail_before_any_model_runs(euler_v_trailing_bundle):
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

    _, bundle = euler_v_trailing_bundle
    pipeline = Pipeline.load(bundle, "onnxruntime", threads=1)
    calls = []       # runners replaced by recorders (without .spec: touching one fails too)
    for name, runner in list(pipeline.runners.items()):
        pipeline.runners[name] = lambda feeds, _run=runner, _name=name: calls.append(_name) or _run(feeds)
    pipeline.denoiser = lambda job, on_step=None: calls.append("denoiser")
    limit = max_steps("dpmpp-2m", pipeline.config.scheduler)
    request = GenerationRequest(prompt="a cat", steps=limit + 1, sampler="dpmpp-2m", height=32, width=32)
    with pytest.raises(GenerationError, match=rf"^steps {limit + 1}: the 'dpmpp-2m' sampler takes at most "
                                              rf"{limit} steps") as err:
        pipeline.generate(request)
    assert err.value.field == "steps" and calls == []


def test_a_strength_that_leaves_no_step_is_blamed_on_strength():
    """img2img with too small a strength keeps no step: the error names `strength` (CLI --strength,
    Triton 400), not an internal field, and lcm says to raise it rather than 'use at most 0 steps'."""
    from ldmrt.config import SchedulerConfig
    from ldmrt.errors import GenerationError
    from ldmrt.sampling import make_plan

    for name, steps, strength in (("ddim", 10, 0.05), ("lcm", 1, 0.01)):
        with pytest.raises(GenerationError) as info:
            make_plan(name, SchedulerConfig(), steps, strength=strength)
        assert info.value.field == "strength", (name, str(info.value))
        assert str(info.value).startswith("strength "), str(info.value)
        assert "at most 0" not in str(info.value)
