"""`ldmrt generate`: prompts -> images from a bundle."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ldmrt.commands.terminal import console, user_errors
from ldmrt.runtime.pipeline import DEFAULT_GUIDE_SCALE, DEFAULT_GUIDE_UNCERTAINTY
from ldmrt.runtime.text import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE


def generate(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `ldmrt export`."),
    prompt: List[str] = typer.Option([""], "--prompt", "-p", help="Prompt (repeat for one per image)."),
    negative_prompt: Optional[str] = typer.Option(None, help="What to steer away from (classifier-free guidance; "
                                                             "default: '', or zero embeddings where the model "
                                                             "says so: SDXL base)."),
    steps: int = typer.Option(20, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Guidance scale; <= 1: no classifier-free guidance (as diffusers)."),
    sampler: Optional[str] = typer.Option(None, help="ddim, ddpm, plms, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, "
                                                     "lcm (default: the bundle's, from its checkpoint's scheduler)."),
    eta: float = typer.Option(0.0, help="DDIM eta."),
    seed: int = typer.Option(0, help="Seed of the initial noise (numpy PCG64)."),
    height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the bundle's optimum)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels."),
    batch: int = typer.Option(1, help="Images per call."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | tensorrt | tensorrt-rtx | torch."),
    latents: Optional[Path] = typer.Option(None, help="Initial unit-variance noise [B, C, h, w] (.npy)."),
    init_image: Optional[Path] = typer.Option(None, help="img2img start image (PNG/JPEG)."),
    strength: Optional[float] = typer.Option(None, help="img2img: how much of the schedule to run (default 0.8)."),
    class_label: Optional[List[int]] = typer.Option(None, help="Class-conditional models: label(s)."),
    image: Optional[Path] = typer.Option(None, help="Inpainting: the image to repaint; super-resolution: the "
                                                    "low-resolution input (PNG/JPEG)."),
    mask: Optional[Path] = typer.Option(None, help="Inpainting: white = repaint, black = keep (image or .npy)."),
    noise_level: Optional[int] = typer.Option(None, help="SD x4 upscaler: noise added to the low-res input "
                                                         "(0-350, default 20)."),
    segmentation: Optional[Path] = typer.Option(None, help="Semantic synthesis: class-index PNG (L/P mode) or .npy."),
    layout: Optional[Path] = typer.Option(None, help="Layout-to-image models: a JSON list of {\"class\": id or "
                                                     "name, \"box\": [x0, y0, x1, y1]} in [0, 1]."),
    guide_image: Optional[Path] = typer.Option(None, help="Post-hoc image guidance (--backend torch): a target "
                                                          "image the output, downsampled to its size, is steered "
                                                          "towards (PNG/JPEG, at most the output's size)."),
    guide_scale: Optional[float] = typer.Option(None, help="Image guidance: 1 / the guide's fixed variance "
                                                           f"(default {DEFAULT_GUIDE_SCALE:g})."),
    guide_uncertainty: Optional[float] = typer.Option(None, help="Image guidance: the x0 estimate's error variance "
                                                                 f"(default {DEFAULT_GUIDE_UNCERTAINTY:g}; 0: the "
                                                                 f"paper's guide)."),
    original_size: Optional[Tuple[int, int]] = typer.Option(None, help="SDXL: the size ids' original size "
                                                                       "HEIGHT WIDTH (default: the image's)."),
    crops_coords_top_left: Tuple[int, int] = typer.Option((0, 0), help="SDXL: the size ids' crop top-left TOP LEFT."),
    target_size: Optional[Tuple[int, int]] = typer.Option(None, help="SDXL base: the size ids' target size HEIGHT "
                                                                     "WIDTH (default: the image's)."),
    aesthetic_score: float = typer.Option(AESTHETIC_SCORE, help="SDXL refiner: the aesthetic score id."),
    negative_aesthetic_score: float = typer.Option(NEGATIVE_AESTHETIC_SCORE, help="SDXL refiner: the negative "
                                                                                  "half's aesthetic score id."),
    denoising_end: Optional[float] = typer.Option(None, help="SDXL base -> refiner: stop at this fraction of the "
                                                             "schedule; --out gets the latents (.npy)."),
    denoising_start: Optional[float] = typer.Option(None, help="SDXL refiner: continue the base's latents "
                                                               "(--init-latents) from this fraction."),
    init_latents: Optional[Path] = typer.Option(None, help="The latents (.npy) a --denoising-end run wrote."),
    tile: Optional[bool] = typer.Option(None, "--tile/--no-tile", help="VAE in tiles (default: only when the "
                                                                       "image exceeds the VAE's exported range)."),
    out: Path = typer.Option(..., "--out", "-o", help=".png (one file per image) or .npy [B, H, W, 3]; "
                             "replaces only PNG files ldmrt wrote."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help="FILE[:SCALE] LoRA adapter applied on top of the "
                                             "bundle's weights without re-export (torch, onnxruntime; "
                                             "tensorrt with engines built --refit); repeat for several."),
) -> None:
    """Generate images from a bundle: tokenizer -> text encoder -> sampler loop -> VAE decoder."""
    with user_errors():
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        from ldmrt.errors import GenerationError
        from ldmrt.manifest import load_manifest
        from ldmrt.runtime.images import check_out, read_image, read_layout, read_maps, write_images
        from ldmrt.runtime.pipeline import GenerationRequest, Pipeline, max_image_size

        from ldmrt.lora.choice import LoraChoice
        from ldmrt.lora.reading import read_lora

        check_out(out, batch)          # before any work: a long job never ends in a traceback
        loras = [LoraChoice.parse(text) for text in lora or ()]
        for choice in loras:
            read_lora(choice.path)     # a bad file fails before the bundle loads (shown as --lora)
        if denoising_end is not None and out.suffix.lower() != ".npy":
            raise GenerationError(f"--out {out}: --denoising-end writes the latents the refiner continues; "
                                  f"expected a .npy file name")
        initial, handed = (_npy(path, flag) for path, flag in ((latents, "--latents"), (init_latents, "--init-latents")))
        # the bundle's largest image bounds what is decoded (refused from the file's header)
        manifest = load_manifest(bundle)
        largest = max_image_size(manifest)
        start_image = None if init_image is None else read_image(init_image, max_size=largest)[None]
        maps = read_maps(manifest.config, image, mask, segmentation, largest, height, width)
        guide = None if guide_image is None else read_image(guide_image, max_size=largest, field="guide_image")[None]
        request = GenerationRequest(prompt=prompt if len(prompt) > 1 else prompt[0],
                                    negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                    sampler=sampler, eta=eta, seed=seed, height=height, width=width,
                                    batch=batch, latents=initial, init_image=start_image,
                                    strength=strength, class_labels=class_label or None,
                                    noise_level=noise_level, tile=tile, guide_image=guide,
                                    guide_scale=guide_scale, guide_uncertainty=guide_uncertainty,
                                    layout=None if layout is None else read_layout(layout),
                                    original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                                    target_size=target_size, aesthetic_score=aesthetic_score,
                                    negative_aesthetic_score=negative_aesthetic_score, denoising_end=denoising_end,
                                    denoising_start=denoising_start, init_latents=handed, **maps)
        with console.status(f"loading {bundle} on {backend}"):
            pipeline = Pipeline.load(bundle, backend)
            if loras:
                pipeline.loras.set(loras)
        if pipeline.manifest.random_weights:
            console.print("[yellow]this bundle has RANDOM weights: the images are noise[/]")
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("denoising", total=None)
            result = pipeline.generate(request, on_step=lambda done, total: progress.update(
                task, completed=done, total=total))
        for message in result.warnings:
            console.print(f"[yellow]warning:[/] {escape(message)}")
        written = write_images(result.latents if result.images is None else result.images, out)
        timings = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in result.timings.items())
        console.print(f"wrote {', '.join(str(p) for p in written)} ({timings})")


def _npy(path: Optional[Path], flag: str):
    """The array in a .npy file (None without one); GenerationError naming the flag."""
    import numpy as np

    from ldmrt.errors import GenerationError

    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise GenerationError(f"{flag} {path}: cannot read a .npy array ({exc})") from None
