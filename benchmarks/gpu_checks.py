"""Every GPU check in one command; writes JSON under benchmarks/results/ (or --out).

    python benchmarks/gpu_checks.py                 # on a machine with a CUDA GPU
    python benchmarks/gpu_checks.py --smoke         # seconds, on CPU: checks the harness itself

Sections (each recorded, and a failure in one does not stop the rest):
  environment   GPU, driver, library versions; which optional backends are importable
  parity        torch CUDA vs CPU per component (fp32 and fp16 vs CPU fp32), the concat UNets too
  onnxruntime   ORT CUDA EP parity where onnxruntime-gpu is installed (else: says so)
  tensorrt      whether tensorrt / tensorrt_rtx import (engine runs need them on this machine)
  unet          SD 1.5-shaped UNet step (fp16, 512x512, CFG batch 2): ours eager, ours CUDA
                graph, diffusers eager, torch.compile
  pipeline      whole image at 512x512, 30 and 50 steps: ldmrt fused loop with and without
                CUDA graphs vs diffusers' StableDiffusionPipeline, same weights and latents;
                host overhead per step
Weights are random (none can be downloaded); speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldmrt.presets import preset  # noqa: E402
from ldmrt.engines.torch import FusedDenoiser  # noqa: E402
from ldmrt.models.components import ComponentGraph, example_inputs, to_torch  # noqa: E402
from ldmrt.iospec import Precision, ShapeRanges, component_specs  # noqa: E402
from ldmrt.models import build_model  # noqa: E402
from ldmrt.models.convert import autoencoder_from_diffusers, unet_from_diffusers  # noqa: E402
from ldmrt.sampling import DenoiseJob, make_plan  # noqa: E402


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).norm() / b.norm())


def stats(samples_s: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in samples_s)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
            "min_ms": ms[0], "n": len(ms)}


def timed(fn, device: torch.device, warmup: int, repeat: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return stats(samples)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Report:
    def __init__(self, path: Path):
        self.path, self.data = path, {"sections": {}}

    def section(self, name: str, fn) -> None:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = fn()
            status = "ok"
        except Exception as exc:  # recorded, the other sections still run
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            status = "error"
        result = {"status": status, "seconds": round(time.perf_counter() - start, 1), **result}
        self.data["sections"][name] = result
        print(json.dumps(result, indent=1, default=str)[:4000], flush=True)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def environment(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sm=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    for module in ("onnxruntime", "tensorrt", "tensorrt_rtx", "diffusers", "transformers", "cuda"):
        try:
            imported = __import__(module)
            info[module] = getattr(imported, "__version__", "importable")
        except Exception as exc:
            info[module] = f"not available ({type(exc).__name__})"
    try:
        import onnxruntime
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        pass
    return info


def parity(device: torch.device, smoke: bool) -> dict:
    """Our modules on the GPU vs the same modules on the CPU in fp32 (TF32 off: true fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {}
    # + the concat models' UNets (their maps concatenated in the graph) and the x4 decoder
    cases = [("tiny", None)] if smoke else [("tiny", None), ("sd15", {"unet", "vae_decoder", "text_encoder"}),
                                            ("sd15-inpaint", {"unet"}), ("sd-x4-upscaler", {"unet", "vae_decoder"}),
                                            ("ldm-semantic", {"unet"})]
    for name, only in cases:
        config = preset(name)
        model = build_model(config, seed=0)
        ranges = ShapeRanges(min_size=config.downsampling_factor * 8, opt_size=config.downsampling_factor * 16,
                             max_size=config.downsampling_factor * 32, max_batch=2)
        specs = component_specs(config, ranges, Precision.FP32)
        for component, spec in specs.items():
            if only and component not in only or component == "denoise_step":   # no torch module
                continue
            values = {"batch": 2, "latent_height": 16 if name == "tiny" else 32,
                      "latent_width": 12 if name == "tiny" else 24}
            arrays = example_inputs(config, spec, values, seed=3)
            cpu_graph = ComponentGraph(model, spec).eval()
            with torch.no_grad():
                ref = cpu_graph(*to_torch(arrays, spec, torch.float32))
                row = {}
                for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
                    graph = ComponentGraph(model, spec).to(device=device, dtype=dtype).eval()
                    inputs = tuple(t.to(device) for t in to_torch(arrays, spec, dtype))
                    row[f"{label}_rel_l2"] = rel_l2(graph(*inputs).float(), ref)
                    ComponentGraph(model, spec).to(device="cpu", dtype=torch.float32)
                model.to("cpu", torch.float32)
            row["bound"] = {"fp32": 1e-3, "fp16": 1e-2}
            row["pass"] = row["fp32_rel_l2"] <= 1e-3 and row["fp16_rel_l2"] <= 1e-2
            results[f"{name}/{component}"] = row
        del model
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {"cases": results, "all_pass": all(r["pass"] for r in results.values()), "tf32": False}


def onnxruntime_cuda(device: torch.device) -> dict:
    import onnxruntime as ort
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return {"available": False, "providers": providers,
                "note": "onnxruntime here is the CPU build; install onnxruntime-gpu for the CUDA EP"}
    return {"available": True, "providers": providers, "note": "CUDA EP present: run `ldmrt bench --backend onnxruntime`"}


def tensorrt_check() -> dict:
    found = {}
    for module in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        try:
            found[module] = __import__(module).__version__
        except Exception as exc:
            found[module] = f"not importable ({type(exc).__name__})"
    return {"modules": found, "note": "TensorRT engine execution is verified only where one imports"}


class SD15:
    """Our SD 1.5-shaped model and diffusers' with the same (random) weights, fp16 on `device`."""

    def __init__(self, device: torch.device, smoke: bool):
        from tests.reference import diffusers_autoencoder, diffusers_unet

        self.config = preset("tiny" if smoke else "sd15")
        self.device, self.dtype = device, torch.float16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        with torch.device(device):
            self.ref_unet = diffusers_unet(self.config.unet).to(self.dtype)
            self.ref_vae = diffusers_autoencoder(self.config.autoencoder).to(self.dtype)
        self.model = build_model(self.config, seed=0).to(device=device, dtype=self.dtype)
        self.model.unet.load_state_dict(unet_from_diffusers(self.ref_unet.state_dict(), self.config.unet))
        self.model.first_stage_model.load_state_dict(
            autoencoder_from_diffusers(self.ref_vae.state_dict(), self.config.autoencoder))
        if device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.ref_vae.config.scaling_factor = self.config.scale_factor
        # Text embeddings from our CLIP text encoder, shared by both pipelines.
        ids = torch.full((2, 77), self.config.conditioner.eos_token_id, dtype=torch.int32, device=device)
        ids[:, 0] = self.config.conditioner.bos_token_id
        ids[1, 1:6] = torch.tensor([320, 1125, 539, 320, 2368]) % self.config.conditioner.vocab_size
        with torch.no_grad():
            self.context = self.model.cond_stage_model(ids)                  # (2, 77, D): [uncond; cond]
        self.latent = self.config.default_image_size // self.config.downsampling_factor if smoke else 64


def capture_graph(fn) -> "torch.cuda.CUDAGraph":
    """Warm `fn` up on a side stream (autotuning, lazy init), then capture one call as a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def unet_step(sd: SD15, smoke: bool, warmup: int, repeat: int) -> dict:
    device, dtype = sd.device, sd.dtype
    h = sd.latent
    x = torch.randn(2, 4, h, h, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = sd.context.to(dtype)
    results = {"shape": {"sample": [2, 4, h, h], "context": list(ctx.shape)}, "dtype": str(dtype)}
    with torch.no_grad():
        ours = sd.model.unet
        results["parity_ours_vs_diffusers_rel_l2"] = rel_l2(ours(x, t, ctx).float(),
                                                            sd.ref_unet(x, t, encoder_hidden_states=ctx).sample.float())
        results["ours_eager"] = timed(lambda: ours(x, t, ctx), device, warmup, repeat)
        results["diffusers_eager"] = timed(lambda: sd.ref_unet(x, t, encoder_hidden_states=ctx), device, warmup, repeat)
        if device.type == "cuda":
            graph = capture_graph(lambda: ours(x, t, ctx))
            results["ours_cuda_graph"] = timed(graph.replay, device, warmup, repeat)
    # FLOP-based utilisation for context (design.md: ~0.68 TFLOP per latent per step at 64x64).
    results["ratio_diffusers_over_ours_graph"] = (results["diffusers_eager"]["median_ms"] /
                                                  results.get("ours_cuda_graph", results["ours_eager"])["median_ms"])
    return results


def torch_compile_unet(sd: SD15, warmup: int, repeat: int, budget_s: float) -> dict:
    device, dtype, h = sd.device, sd.dtype, sd.latent
    x = torch.randn(2, 4, h, h, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = sd.context.to(dtype)
    start = time.perf_counter()
    compiled = torch.compile(sd.model.unet, fullgraph=True)
    with torch.no_grad():
        compiled(x, t, ctx)
        sync(device)
        compile_s = time.perf_counter() - start
        result = {"compile_seconds": compile_s, "mode": "default"}
        result["compiled_eager"] = timed(lambda: compiled(x, t, ctx), device, warmup, repeat)
        if device.type == "cuda" and time.perf_counter() - start < budget_s:
            graph = capture_graph(lambda: compiled(x, t, ctx))
            result["compiled_cuda_graph"] = timed(graph.replay, device, warmup, repeat)
    sd.compiled_unet = compiled
    return result


def pipeline(sd: SD15, steps_list: tuple[int, ...], sampler: str, warmup: int, repeat: int) -> dict:
    """Whole image: text embeddings given, denoise (CFG 7.5), VAE decode. Same latents everywhere."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    device, dtype, h = sd.device, sd.dtype, sd.latent
    sched_cfg = sd.config.scheduler
    common = dict(num_train_timesteps=sched_cfg.num_train_timesteps, beta_start=sched_cfg.beta_start,
                  beta_end=sched_cfg.beta_end, beta_schedule=sched_cfg.beta_schedule.value,
                  prediction_type=sched_cfg.prediction_type.value, timestep_spacing=sched_cfg.timestep_spacing.value,
                  steps_offset=sched_cfg.steps_offset)
    scheduler = (DPMSolverMultistepScheduler(**common) if sampler.startswith("dpmpp")
                 else EulerDiscreteScheduler(**common))
    pipe = StableDiffusionPipeline(vae=sd.ref_vae, text_encoder=None, tokenizer=None, unet=sd.ref_unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    guidance = 7.5
    noise = np.random.default_rng(0).standard_normal((1, 4, h, h))
    uncond, cond = sd.context[:1].to(dtype), sd.context[1:].to(dtype)
    results = {"sampler": sampler, "guidance": guidance, "image": [h * 8, h * 8], "dtype": str(dtype)}
    def unet(sample, timestep, conditioning):     # as FusedDenoiser calls it
        return sd.model.unet(sample, timestep, conditioning["encoder_hidden_states"])
    graph_denoiser = FusedDenoiser(unet, device, dtype, use_cuda_graph=True)
    eager_denoiser = FusedDenoiser(unet, device, dtype, use_cuda_graph=False)
    vae = sd.model.first_stage_model

    for steps in steps_list:
        plan = make_plan(sampler, sched_cfg, steps)
        latents0 = plan.initial_latents(noise)
        row: dict = {}

        def ours(denoiser):
            with torch.no_grad():
                latents = run_denoiser(denoiser, plan, latents0, sd.context.to(dtype), guidance)
                images = vae.decode((latents / sd.config.scale_factor).to(dtype))
                return latents, images

        def diffusers_run():
            with torch.no_grad():
                return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                            guidance_scale=guidance, latents=torch.as_tensor(noise, device=device, dtype=dtype),
                            output_type="pt").images

        row["ours_cuda_graph"] = timed(lambda: ours(graph_denoiser), device, warmup, repeat)
        row["ours_eager"] = timed(lambda: ours(eager_denoiser), device, warmup, repeat)
        row["diffusers_eager"] = timed(diffusers_run, device, warmup, repeat)
        lat_graph, img_graph = ours(graph_denoiser)
        lat_eager, _ = ours(eager_denoiser)
        with torch.no_grad():
            ref_latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                               guidance_scale=guidance, output_type="latent",
                               latents=torch.as_tensor(noise, device=device, dtype=dtype)).images
        row["parity"] = {"graph_vs_eager_latents_rel_l2": rel_l2(lat_graph, lat_eager),
                         "ours_vs_diffusers_latents_rel_l2": rel_l2(lat_graph, ref_latents.float()),
                         "images_finite": bool(torch.isfinite(img_graph).all())}
        row["speedup_vs_diffusers"] = row["diffusers_eager"]["median_ms"] / row["ours_cuda_graph"]["median_ms"]
        if device.type == "cuda":
            row["host_overhead"] = host_overhead(sd, graph_denoiser, plan, latents0, dtype, guidance)
        results[f"steps_{steps}"] = row
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return results


def run_denoiser(denoiser: FusedDenoiser, plan, latents0, context, guidance) -> torch.Tensor:
    """The Denoiser contract (ldmrt.sampling.denoise) on a device-resident context."""
    job = DenoiseJob(plan, np.asarray(latents0, np.float32), {"encoder_hidden_states": context}, guidance,
                     [None] * plan.num_evaluations)
    return torch.as_tensor(denoiser(job).latents, device=context.device)


def host_overhead(sd: SD15, denoiser: FusedDenoiser, plan, latents0, dtype, guidance) -> dict:
    """Per step: the host's enqueue time (no sync), and wall loop time minus pure graph replay GPU time."""
    with torch.no_grad():
        run_denoiser(denoiser, plan, latents0, sd.context.to(dtype), guidance)              # captured already
        captured = next(iter(denoiser._graphs.values()))
        captured.state.index.zero_()
        sync(sd.device)
        start = time.perf_counter()
        for _ in range(plan.num_evaluations):
            captured.graph.replay()
        enqueue = (time.perf_counter() - start) / plan.num_evaluations
        sync(sd.device)
        captured.state.index.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(plan.num_evaluations):
            captured.graph.replay()
        end.record()
        sync(sd.device)
        gpu_per_step = begin.elapsed_time(end) / 1e3 / plan.num_evaluations
        start = time.perf_counter()
        run_denoiser(denoiser, plan, latents0, sd.context.to(dtype), guidance)
        sync(sd.device)
        wall_per_step = (time.perf_counter() - start) / plan.num_evaluations
    return {"enqueue_us_per_step": enqueue * 1e6, "gpu_ms_per_step": gpu_per_step * 1e3,
            "loop_wall_ms_per_step": wall_per_step * 1e3,
            "wall_minus_gpu_us_per_step": (wall_per_step - gpu_per_step) * 1e6}


def runtime_bundle(device: torch.device, smoke: bool) -> dict:
    """The service path: export `tiny`, then Pipeline.load on torch (CUDA, with and without CUDA
    graphs) vs onnxruntime (CPU) with the same seed, for several samplers."""
    import tempfile

    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

    folder = Path(tempfile.mkdtemp()) / "tiny"
    start = time.perf_counter()
    export_bundle(preset_source("tiny"), folder, ExportOptions())
    result = {"export_seconds": time.perf_counter() - start, "cases": {}}
    ort = Pipeline.load(folder, "onnxruntime")
    graphs = Pipeline.load(folder, "torch", device=str(device), cuda_graphs=True)
    eager = Pipeline.load(folder, "torch", device=str(device), cuda_graphs=False)
    for sampler in ("ddim", "euler-a", "dpmpp-2m", "plms", "lcm"):
        request = GenerationRequest(prompt="a red fox", steps=12, sampler=sampler, seed=7, batch=2,
                                    height=64, width=48)
        reference = ort.generate(request)
        row = {}
        for label, pipe in (("cuda_graph", graphs), ("eager", eager)):
            out = pipe.generate(request)
            row[f"{label}_images_mean_abs"] = float(np.abs(out.images - reference.images).mean())
            row[f"{label}_latents_rel_l2"] = float(np.linalg.norm(out.latents - reference.latents)
                                                   / np.linalg.norm(reference.latents))
        row["pass"] = all(v <= 1 / 255 for k, v in row.items() if k.endswith("mean_abs"))
        result["cases"][sampler] = row
    timing_request = GenerationRequest(prompt="a red fox", steps=30, sampler="dpmpp-2m", seed=1, height=64, width=64)
    for label, pipe in (("cuda_graph", graphs), ("eager", eager), ("onnxruntime_cpu", ort)):
        result[f"{label}_30_steps"] = timed(lambda p=pipe: p.generate(timing_request), device, 1, 3)
    result["all_pass"] = all(r["pass"] for r in result["cases"].values())
    return result


def lora_cuda_graphs(device: torch.device) -> dict:
    """LoRA switched on a CUDA-graph pipeline (torch backend): the captured loop must replay the new
    weights (in-place writes keep the addresses). A -> none on one pipeline vs fresh pipelines that
    captured with A and with none, and the switch times."""
    import tempfile

    from safetensors.torch import save_file

    from ldmrt.export.bundle import ExportOptions, export_bundle, preset_source
    from ldmrt.lora.choice import LoraChoice
    from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

    folder = Path(tempfile.mkdtemp())
    source = preset_source("tiny")
    export_bundle(source, folder / "tiny", ExportOptions(components=("text_encoder", "unet", "vae_decoder"),
                                                         validate=False))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in source.model.named_modules():
        if name.startswith("model.diffusion_model.") and name.endswith(("attn1.to_q", "attn2.to_v")):
            key = "lora_unet_" + name.removeprefix("model.diffusion_model.").replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, module.weight.shape[1], generator=g) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.weight.shape[0], 4, generator=g) * 0.3
    save_file(tensors, str(folder / "a.safetensors"))
    adapter = [LoraChoice(folder / "a.safetensors", 1.0)]
    request = GenerationRequest(prompt="a red fox", steps=12, sampler="dpmpp-2m", seed=3, height=64, width=64)

    def fresh(choices):
        pipe = Pipeline.load(folder / "tiny", "torch", device=str(device), cuda_graphs=True)
        pipe.loras.set(choices)
        return pipe.generate(request).images

    pipe = Pipeline.load(folder / "tiny", "torch", device=str(device), cuda_graphs=True)
    none_first = pipe.generate(request).images          # captures the loop on the base weights
    pipe.generate(request)
    start = time.perf_counter()
    pipe.loras.set(adapter)
    switch_on = time.perf_counter() - start
    with_a = pipe.generate(request).images               # replays the graph: must see A
    start = time.perf_counter()
    pipe.loras.set([])
    switch_off = time.perf_counter() - start
    none_again = pipe.generate(request).images
    fresh_a, fresh_none = fresh(adapter), fresh([])
    result = {"switch_on_s": switch_on, "switch_off_s": switch_off,
              "a_vs_fresh_a_max_abs": float(np.abs(with_a - fresh_a).max()),
              "a_vs_none_max_abs": float(np.abs(with_a - none_first).max()),
              "none_again_vs_first_max_abs": float(np.abs(none_again - none_first).max()),
              "fresh_none_vs_first_max_abs": float(np.abs(fresh_none - none_first).max())}
    result["pass"] = (result["a_vs_fresh_a_max_abs"] <= 1e-3 and result["a_vs_none_max_abs"] > 1e-2
                      and result["none_again_vs_first_max_abs"] <= 1e-3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: check the harness only")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help="comma list of sections to run (default: all)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA GPU on this machine: nothing to check (use --smoke to test the harness on CPU)")
        return
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    only = {s for s in args.only.split(",") if s}
    suffix = f"_{'_'.join(sorted(only))}" if only else ""
    name = "gpu_checks_smoke.json" if args.smoke else \
        f"gpu_checks_{torch.cuda.get_device_name().split()[1].lower()}{suffix}.json"
    out = args.out or (ROOT / "benchmarks" / "results")
    report = Report(out / name)
    report.data["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    torch.backends.cudnn.benchmark = True
    warmup, repeat = (1, 2) if args.smoke else (2, args.repeat)

    wanted = lambda name: not only or name in only  # noqa: E731
    report.section("environment", lambda: environment(device))
    if wanted("parity"):
        report.section("parity", lambda: parity(device, args.smoke))
    report.section("onnxruntime", lambda: onnxruntime_cuda(device))
    report.section("tensorrt", tensorrt_check)
    if wanted("runtime"):
        report.section("runtime_bundle", lambda: runtime_bundle(device, args.smoke))
    if wanted("lora"):
        report.section("lora_cuda_graphs", lambda: lora_cuda_graphs(device))
    holder = {}
    if wanted("sd15"):
        report.section("load_sd15", lambda: holder.setdefault("sd", SD15(device, args.smoke)) and {"ok": True})
    if "sd" in holder:
        sd = holder["sd"]
        report.section("unet", lambda: unet_step(sd, args.smoke, warmup, repeat))
        steps = (3,) if args.smoke else (30, 50)
        report.section("pipeline_dpmpp", lambda: pipeline(sd, steps, "dpmpp-2m", 1, repeat))
        report.section("pipeline_euler", lambda: pipeline(sd, steps[-1:], "euler", 1, max(2, repeat - 2)))
        if not args.skip_compile and not args.smoke:
            report.section("torch_compile", lambda: torch_compile_unet(sd, warmup, repeat, budget_s=240))
    report.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.write()
    print(f"wrote {report.path}")


if __name__ == "__main__":
    main()
