"""int8 UNet for CPUs with 8-bit dot products (AVX512-VNNI / AVX-VNNI, ARM dot-product).

Static QDQ quantization, chosen at export with `--precision int8`:

    Conv   (3x3 and 1x1, weights constant)  u8 input, 7-bit per-output-channel weights, int32 bias,
                                            u8 output         -> ONNX Runtime fuses QLinearConv
    MatMul (B constant: q/k/v/out, GEGLU)   u8 input, 7-bit per-column weights, float output
                                                              -> MatMulIntegerToFloat

Activation ranges come from the model itself: the fp32 graph runs a few guided DDIM
trajectories (the prompts encoded as the runtime encodes them; SDXL's pooled embedding and size
ids too) and every quantized tensor's min/max is taken over them. Kept in fp32
(`select_targets`): the first and last convolution, the skip convs, the cross-attention K/V
projections, and everything that is not a weight product (attention QK^T, softmax and AV,
GroupNorm, LayerNorm, the timestep MLP).

Parity is measured on a held-out trajectory and must meet `Int8Bounds`: the per-UNet-call
relative L2 against the fp32 graph on that trajectory's inputs, and the PSNR of the decoded image
after `steps` guided steps, int8 UNet vs fp32 UNet from the same noise. When the convs and
matmuls together miss a bound, the matmuls alone are tried (`LEVELS`; less speed, far less error);
when that misses too, the export fails. The report records the level taken and every attempt.
"""
from __future__ import annotations

import enum
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ldmrt.errors import ConfigError, ExportError, ParityError
from ldmrt.iospec import ComponentSpec

log = logging.getLogger(__name__)

METADATA_KEY = "ldmrt.int8"          # the ONNX metadata_props entry holding `Int8Report`
# 7-bit weights: x86 CPUs without VNNI multiply u8 x s8 with vpmaddubsw, whose 16-bit pair sums
# saturate above 32767; 2 * 255 * 63 cannot. Measured cost on sd15: per-call rel L2 0.0517 ->
# 0.0538, image PSNR 40.45 -> 40.46 dB (docs/cpu_speed.md). Same kernels, same speed.
WEIGHT_MAX = 63
CALIBRATION_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor painting of a fox",
                       "a city street at night, rain, neon lights", "a bowl of fruit on a wooden table")
PARITY_PROMPT = "a lighthouse on a cliff above a stormy sea"     # held out from calibration
PARITY_SEED = 1000
LEVELS = ("conv+matmul", "matmul")   # what is quantized, tried in this order until the bounds hold


@dataclass(frozen=True)
class Int8Bounds:
    """What the int8 UNet must meet against the fp32 UNet, or the export fails."""
    unet_rel_l2: float = 0.10      # per call, on held-out trajectory inputs (max over the steps)
    image_psnr_db: float = 30.0    # decoded images after `Int8Options.parity_steps` guided steps

    def met(self, unet_rel_l2: float, image_psnr_db: float) -> bool:
        return unet_rel_l2 <= self.unet_rel_l2 and image_psnr_db >= self.image_psnr_db


class CalibrationSize(str, enum.Enum):
    """Which of the bundle's sizes int8 calibration and its parity run use."""
    OPT = "opt"     # the size generation runs at by default: the most accurate there
    MIN = "min"     # the smallest: less memory and time (sd15: 256 instead of 512 pixels)


@dataclass(frozen=True)
class Int8Options:
    calibration_trajectories: int = 2    # guided DDIM runs (each its own prompt and noise)
    calibration_steps: int = 8           # UNet calls per calibration run
    parity_steps: int = 20               # steps of the held-out end-to-end comparison
    guidance: float = 7.5
    bounds: Int8Bounds = field(default_factory=Int8Bounds)
    calibration_size: CalibrationSize = CalibrationSize.OPT

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "calibration_size", CalibrationSize(self.calibration_size))
        except ValueError:
            raise ConfigError(f"calibration_size {self.calibration_size!r}: expected one of "
                              f"{[c.value for c in CalibrationSize]}", field="calibration_size") from None


@dataclass(frozen=True)
class Int8Report:
    """What was quantized and how close it stayed to fp32; stored in the graph's metadata."""
    method: str
    quantized: dict[str, int]            # op type -> count
    kept_fp32: list[str]                 # weight ops left in fp32 (node names)
    calibration: dict[str, object]
    unet_rel_l2: float                   # max over the held-out steps
    unet_max_abs: float
    image_psnr_db: float
    bounds: dict[str, float]
    shapes: dict[str, list[int]]
    level: str = LEVELS[0]               # which of LEVELS met the bounds
    attempts: list[dict] = field(default_factory=list)   # per level tried: rel L2, PSNR

    def parity_record(self):
        """The manifest's parity entry: int8 UNet vs the fp32 graph, per call, held-out inputs."""
        from ldmrt.manifest import ParityRecord

        steps = self.calibration["parity_steps"]
        reference = (f"onnxruntime-fp32 graph on a held-out {steps}-step guided ddim run (max over calls); "
                     f"image PSNR {self.image_psnr_db:.1f} dB (bound >= {self.bounds['image_psnr_db']:g} dB); "
                     f"quantized: {self.level}")
        return ParityRecord(reference=reference,
                            rel_l2=self.unet_rel_l2, max_abs=self.unet_max_abs,
                            tolerance=self.bounds["unet_rel_l2"],
                            shapes={k: tuple(v) for k, v in self.shapes.items()})

    def check(self) -> None:
        b = self.bounds
        if not Int8Bounds(**b).met(self.unet_rel_l2, self.image_psnr_db):
            tried = "; ".join(f"{a['level']}: per-call relative L2 {a['unet_rel_l2']:.3g}, image PSNR "
                              f"{a['image_psnr_db']:.1f} dB" for a in self.attempts) or (
                f"per-call relative L2 {self.unet_rel_l2:.3g}, image PSNR {self.image_psnr_db:.1f} dB")
            raise ParityError(
                f"unet int8: parity vs fp32 out of bounds (bounds: per-call relative L2 <= "
                f"{b['unet_rel_l2']:g}, image PSNR >= {b['image_psnr_db']:g} dB after "
                f"{self.calibration['parity_steps']} steps); tried {tried}; "
                f"no bundle written: export fp32, or bf16/fp16 for a GPU")


@dataclass(frozen=True)
class QuantTarget:
    """One weight product to quantize: its node, activation input, weight, bias and output."""
    node: str
    op_type: str                 # "Conv" or "MatMul"
    activation: str
    weight: str
    bias: str | None
    output: str


# --- which nodes -----------------------------------------------------------------------------

def select_targets(graph: onnx.GraphProto, level: str = LEVELS[0]) -> tuple[list[QuantTarget], list[str]]:
    """Convs and MatMuls with constant weights: (targets, weight ops kept in fp32).

    `level` "matmul" keeps every Conv in fp32 too: the fallback when the full set misses the
    bounds (on sd15 the convs carry most of the int8 error: MatMul-only 0.010 per-call rel L2).

    Kept in fp32 (measured on sd15 and tiny, docs/cpu_speed.md): ops reading a graph input or
    writing a graph output (conv_in, conv_out; cross-attention K/V over the text embeddings,
    77 rows, where real CLIP embeddings have outlier channels), grouped convs, and convs fed by
    a Concat: the UNet's skip convs read [h; skip], two streams of different scale that one u8
    range serves badly (alone they were 2/3 of the int8 error: sd15 per-call rel L2 0.027 -> 0.0085).
    """
    constants = {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    concatenated = {n.output[0] for n in graph.node if n.op_type == "Concat"}
    targets, kept = [], []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul") or len(node.input) < 2 or node.input[1] not in constants:
            continue
        grouped = node.op_type == "Conv" and any(a.name == "group" and a.i != 1 for a in node.attribute)
        if node.input[0] in inputs or node.output[0] in outputs or grouped or \
                (node.op_type == "Conv" and (node.input[0] in concatenated or level == "matmul")):
            kept.append(node.name)
            continue
        bias = node.input[2] if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] else None
        targets.append(QuantTarget(node.name, node.op_type, node.input[0], node.input[1], bias, node.output[0]))
    return targets, kept


def _calibrated_tensors(targets: list[QuantTarget]) -> list[str]:
    names = {t.activation for t in targets} | {t.output for t in targets if t.op_type == "Conv"}
    return sorted(names)


# --- calibration: min/max of every quantized tensor ------------------------------------------

class RangeProbe:
    """The fp32 graph with `tensors` as extra outputs: called like the UNet (returns its output),
    it keeps every tensor's (min, max) over the calls, so calibration runs each input once."""

    def __init__(self, path: Path, tensors: list[str]):
        from ldmrt.export.validate import cpu_session

        model = onnx.load(str(path), load_external_data=False)
        self.names = [model.graph.output[0].name, *tensors]
        model.graph.ClearField("value_info")
        for name in tensors:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
        # Saved next to the graph so that its external-data references (weights) still resolve.
        self.probe = path.with_name(f".{path.stem}.calibration.onnx")
        onnx.save_model(model, str(self.probe))
        del model
        try:
            self.session = cpu_session(self.probe)
        except BaseException:
            self.probe.unlink(missing_ok=True)
            raise
        self.seen: dict[str, tuple[float, float]] = {}
        self.count = 0

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        output, *values = self.session.run(self.names, feeds)
        for name, value in zip(self.names[1:], values):
            lo, hi = float(value.min()), float(value.max())
            if name in self.seen:
                lo, hi = min(lo, self.seen[name][0]), max(hi, self.seen[name][1])
            self.seen[name] = (lo, hi)
        self.count += 1
        return output

    def __enter__(self) -> "RangeProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.session = None
        self.probe.unlink(missing_ok=True)

    def ranges(self) -> dict[str, tuple[float, float]]:
        if not self.count:
            raise ExportError("int8 calibration: no calibration inputs")
        bad = [n for n, (lo, hi) in self.seen.items() if not (math.isfinite(lo) and math.isfinite(hi))]
        if bad:
            raise ExportError(f"int8 calibration: non-finite activations in {bad[:3]}; the fp32 graph "
                              f"overflows on the calibration inputs")
        return dict(self.seen)


def collect_ranges(path: Path, tensors: list[str], feeds: Iterator[dict[str, np.ndarray]]
                   ) -> dict[str, tuple[float, float]]:
    """Run `path` with `tensors` as extra outputs over `feeds`; per tensor (min, max) over all."""
    with RangeProbe(path, tensors) as probe:
        for feed in feeds:
            probe(feed)
        return probe.ranges()


# --- QDQ insertion -----------------------------------------------------------------------------

def _activation_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Asymmetric u8 scale and zero point for [lo, hi] (widened to include 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = int(np.clip(round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


def _weight_qparams(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel weights along `axis` in [-WEIGHT_MAX, WEIGHT_MAX]: (int8, float32 scales)."""
    moved = np.moveaxis(weight, axis, 0)
    amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.where(amax > 0, amax / WEIGHT_MAX, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    quantized = np.clip(np.round(weight / scale.reshape(shape)), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return quantized, scale


def insert_qdq(model: onnx.ModelProto, targets: list[QuantTarget],
               ranges: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """Replace each target's float weight by s8 + DequantizeLinear and wrap its activations in
    QuantizeLinear/DequantizeLinear pairs (Conv outputs too). Returns `model`, changed in place."""
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    by_node = {t.node: t for t in targets}
    new_inits: list[onnx.TensorProto] = []
    dequantized_input: dict[str, str] = {}     # activation -> its DQ output (for quantized nodes)
    dequantized_output: dict[str, str] = {}    # conv output -> its DQ output (for every consumer)
    nodes: list[onnx.NodeProto] = []

    def qdq(tensor: str) -> tuple[str, list[onnx.NodeProto], np.float32]:
        scale, zero = _activation_qparams(*ranges[tensor])
        base = f"{tensor}.int8"
        new_inits.extend([numpy_helper.from_array(np.array(scale), f"{base}.scale"),
                          numpy_helper.from_array(np.array(zero), f"{base}.zero_point")])
        pair = [helper.make_node("QuantizeLinear", [tensor, f"{base}.scale", f"{base}.zero_point"],
                                 [f"{base}.q"], name=f"{base}.quantize"),
                helper.make_node("DequantizeLinear", [f"{base}.q", f"{base}.scale", f"{base}.zero_point"],
                                 [f"{base}.dq"], name=f"{base}.dequantize")]
        return f"{base}.dq", pair, scale

    scales: dict[str, np.float32] = {}
    for node in graph.node:
        node.input[:] = [dequantized_output.get(name, name) for name in node.input]
        target = by_node.get(node.name)
        if target is None:
            nodes.append(node)
            continue
        activation = target.activation
        if activation in dequantized_output:      # a quantized conv's output: reuse its pair
            dq_name = dequantized_output[activation]
        elif activation in dequantized_input:
            dq_name = dequantized_input[activation]
        else:
            dq_name, pair, scales[activation] = qdq(activation)
            dequantized_input[activation] = dq_name
            nodes.extend(pair)
        node.input[0] = dq_name
        axis = 0 if target.op_type == "Conv" else 1
        weight = numpy_helper.to_array(weights[target.weight]).astype(np.float32)
        w_q, w_scale = _weight_qparams(weight, axis)
        w_base = f"{target.weight}.int8"
        new_inits.extend([numpy_helper.from_array(w_q, f"{w_base}.q"),
                          numpy_helper.from_array(w_scale, f"{w_base}.scale"),
                          numpy_helper.from_array(np.zeros_like(w_scale, dtype=np.int8), f"{w_base}.zero_point")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{w_base}.q", f"{w_base}.scale", f"{w_base}.zero_point"],
                                      [f"{w_base}.dq"], name=f"{w_base}.dequantize", axis=axis))
        node.input[1] = f"{w_base}.dq"
        if target.bias is not None:
            # int32 bias at scale x_scale * w_scale: what QLinearConv adds to its accumulator.
            x_scale = scales.get(activation) or _activation_qparams(*ranges[activation])[0]
            b_scale = (w_scale * x_scale).astype(np.float32)
            bias = numpy_helper.to_array(weights[target.bias]).astype(np.float64)
            b_q = np.clip(np.round(bias / b_scale), -2**31, 2**31 - 1).astype(np.int32)
            b_base = f"{target.bias}.int32"
            new_inits.extend([numpy_helper.from_array(b_q, f"{b_base}.q"),
                              numpy_helper.from_array(b_scale, f"{b_base}.scale"),
                              numpy_helper.from_array(np.zeros_like(b_q), f"{b_base}.zero_point")])
            nodes.append(helper.make_node("DequantizeLinear", [f"{b_base}.q", f"{b_base}.scale", f"{b_base}.zero_point"],
                                          [f"{b_base}.dq"], name=f"{b_base}.dequantize", axis=0))
            node.input[2] = f"{b_base}.dq"
        nodes.append(node)
        if target.op_type == "Conv":
            # A u8 output lets ONNX Runtime run DQ -> Conv -> Q as one QLinearConv.
            dq_name, pair, scales[target.output] = qdq(target.output)
            dequantized_output[target.output] = dq_name
            nodes.extend(pair)
    used = {t.weight for t in targets} | {t.bias for t in targets if t.bias}
    still_read = {name for n in nodes for name in n.input}
    keep = [i for i in graph.initializer if i.name not in used or i.name in still_read]
    graph.ClearField("initializer")
    graph.initializer.extend(keep + new_inits)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("value_info")
    return model


# --- trajectories: calibration inputs and the held-out parity run ------------------------------

UNetFn = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class Trajectory:
    """One guided denoising run: every UNet call's inputs and outputs, and the final latents."""
    feeds: list[dict[str, np.ndarray]]
    outputs: list[np.ndarray]
    latents: np.ndarray


class RandomTokens:
    """A tokenizer's stand-in for a model exported without one: random ids, drawn from `rng`."""

    def __init__(self, encoder, rng: np.random.Generator):
        self.encoder, self.rng = encoder, rng

    def encode(self, texts: list[str]):
        from ldmrt.tokenizer import TokenizedBatch

        shape = (len(texts), self.encoder.max_length)
        return TokenizedBatch(self.rng.integers(0, self.encoder.vocab_size, size=shape).astype(np.int32),
                              [False] * len(texts))


def _finite(array: np.ndarray, component: str, what: str) -> None:
    if not np.isfinite(array).all():
        raise ExportError(f"{component}: non-finite {what} during int8 calibration")


class TrajectoryMaker:
    """Guided DDIM runs of a UNet (any callable on spec-named feeds), conditioned like the runtime.

    `tokenizers`: the bundle's prompt tokenizer (one, for every text encoder) or one per encoder;
    None: random token ids."""

    def __init__(self, model, spec: ComponentSpec, latent_hw: tuple[int, int], guidance: float,
                 tokenizers=None):
        self.model, self.spec, self.latent_hw = model, spec, latent_hw
        self.config = model.config
        self.names = {t.name for t in spec.inputs}
        # As the runtime and diffusers: guidance <= 1 runs the conditional prediction alone.
        self.guided = self.config.conditioner is not None and guidance > 1.0
        self.guidance = guidance if self.guided else 1.0
        self.tokenizers = tokenizers
        # prompts go through the runtime's text rule (ldmrt.runtime.text); layouts keep the
        # single encoder on their own tokens
        self.prompted = self.config.is_text_conditioned and not self.config.is_layout_conditioned
        self.text_runners = self._text_runners() if self.prompted else {}

    def _text_runners(self) -> dict:
        """The text encoders as the runtime's runners, fp32 torch on the CPU."""
        import torch

        from ldmrt.engines.torch import TorchRunner
        from ldmrt.iospec import TEXT_ENCODER_COMPONENTS, Precision, ShapeRanges, component_specs
        from ldmrt.models.components import ComponentGraph

        specs = component_specs(self.config, ShapeRanges.for_model(self.config), Precision.FP32)
        return {name: TorchRunner(ComponentGraph(self.model, specs[name]).eval(), specs[name],
                                  torch.device("cpu"), torch.float32)
                for name in TEXT_ENCODER_COMPONENTS if name in specs}

    def _prompt_inputs(self, prompt: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """encoder_hidden_states (and SDXL's text_embeds and time_ids at the calibration size) as
        a default request makes them: "" or zero embeddings as the negative."""
        from ldmrt.runtime.text import SizeConditioning, TextEncoders

        encoders = TextEncoders.encoders(self.config)
        tokenizers = self.tokenizers
        if tokenizers is None:
            tokenizers = [RandomTokens(encoder, rng) for encoder in encoders]
        elif not isinstance(tokenizers, (list, tuple)):
            tokenizers = [tokenizers] * len(encoders)
        negatives = None if self.config.force_zeros_for_empty_prompt else [""]
        f = self.config.downsampling_factor
        image_size = (self.latent_hw[0] * f, self.latent_hw[1] * f)
        return TextEncoders(self.config, tokenizers).conditioning(
            self.text_runners, [prompt], negatives, self.guided, SizeConditioning(), image_size, [], _finite,
            {t.name: t.dtype for t in self.spec.inputs})

    def conditioning(self, prompt: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Extra UNet inputs for [uncond; cond] (guided) or one sample: text inputs or labels."""
        import torch

        feeds: dict[str, np.ndarray] = {}
        if self.prompted:
            feeds.update(self._prompt_inputs(prompt, rng))
        elif "encoder_hidden_states" in self.names:
            texts = ["", prompt] if self.guided else [prompt]
            tokenizer = self.tokenizers if self.tokenizers is not None else RandomTokens(self.config.conditioner, rng)
            ids = tokenizer.encode(texts).input_ids
            with torch.no_grad():
                embeddings = self.model.conditioner(torch.from_numpy(np.asarray(ids, np.int32)))
            feeds["encoder_hidden_states"] = embeddings.float().numpy()
        spatial = self.config.spatial
        if "class_labels" in self.names and spatial is not None and spatial.low_res_noise is not None:
            level = spatial.low_res_noise.default_noise_level         # the x4 upscaler's labels: a noise level
            feeds["class_labels"] = np.full((2 if self.guided else 1,), level, np.int32)
        elif "class_labels" in self.names:
            n = getattr(self.config.conditioner, "n_classes", None) or self.config.unet.num_classes
            label = int(rng.integers(0, n - 1))
            feeds["class_labels"] = np.array([n - 1, label] if self.guided else [label], np.int32)
        if spatial is not None:      # concatenated maps: in their natural ranges, the same in both halves
            from ldmrt.iospec import example_inputs
            values = {"batch": 1, "latent_height": self.latent_hw[0], "latent_width": self.latent_hw[1]}
            maps = example_inputs(self.config, self.spec, values, int(rng.integers(2 ** 31)))
            for kind in spatial.inputs:
                one = maps[kind.value]
                feeds[kind.value] = np.concatenate([one, one]) if self.guided else one
        return feeds

    def run(self, unet: UNetFn, steps: int, seed: int, prompt: str, replay: Trajectory | None = None
            ) -> Trajectory:
        """A DDIM run from seeded noise; with `replay`, the same conditioning as that run."""
        from ldmrt.sampling import DenoiseJob, NumpyDenoiser, make_plan

        # The noise has its own stream: a replay (which reuses the conditioning instead of drawing
        # labels or random tokens) must start from exactly the noise of the run it replays.
        shape = (1, self.config.latent_channels, *self.latent_hw)
        noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        extra = self.conditioning(prompt, np.random.default_rng((seed, 1))) if replay is None else \
            {k: v for k, v in replay.feeds[0].items() if k not in ("sample", "timestep")}
        plan = make_plan("ddim", self.config.scheduler, steps)
        feeds_log: list[dict[str, np.ndarray]] = []
        outputs_log: list[np.ndarray] = []

        def logged(feeds: dict[str, np.ndarray]) -> np.ndarray:
            feeds = {name: np.array(value) for name, value in feeds.items()}    # the loop reuses its buffers
            output = unet(feeds)
            feeds_log.append(feeds)
            outputs_log.append(output)
            return output

        # The runtime's own loop (and guidance): calibration sees what generation will feed.
        job = DenoiseJob(plan, plan.initial_latents(noise).astype(np.float32), extra,
                         self.guidance if self.guided else None, [None] * plan.num_evaluations)
        latents = NumpyDenoiser(logged, self.spec)(job).latents
        return Trajectory(feeds_log, outputs_log, latents)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> images in [0, 1], as the runtime does (float64 for the PSNR)."""
        import torch

        from ldmrt.manifest import DEFAULT_POSTPROCESS
        from ldmrt.runtime.postprocess import postprocessor

        with torch.no_grad():
            images = self.model.first_stage_model.decode(
                torch.from_numpy(latents / self.config.scale_factor)).double().numpy()
        return postprocessor(DEFAULT_POSTPROCESS)(images)     # what the bundle will declare


def psnr(found: np.ndarray, expected: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]; inf when identical, 0 for NaN."""
    found64, expected64 = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    if not np.isfinite(found64).all():
        return 0.0
    mse = float(np.mean((found64 - expected64) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _session(path: Path):
    from ldmrt.export.validate import cpu_session

    session = cpu_session(path)
    output = session.get_outputs()[0].name
    return lambda feeds: session.run([output], feeds)[0]


def split_prompts(prompts: tuple[str, ...] | None) -> tuple[tuple[str, ...], str]:
    """(calibration prompts, the held-out parity prompt) from a source's own prompts (all but the
    last, then the last; `ModelSource.prompts`), or the generic ones when it has none."""
    if prompts is None:
        return CALIBRATION_PROMPTS, PARITY_PROMPT
    if isinstance(prompts, str) or not isinstance(prompts, (tuple, list)) or len(prompts) < 2 \
            or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"prompts {prompts!r}: expected at least two strings (calibration, then the held-out "
                          f"parity prompt) or None", field="prompts")
    return tuple(prompts[:-1]), prompts[-1]


# --- the whole step ----------------------------------------------------------------------------

def quantize_unet(path: Path, model, spec: ComponentSpec, options: Int8Options = Int8Options(),
                  prompts: tuple[str, ...] | None = None) -> Int8Report:
    """Replace the fp32 graph at `path` by its int8 version; ParityError if out of bounds.

    `model` is the LatentDiffusion the graph was exported from: its text encoders encode the
    calibration prompts as the runtime does (with the bundle's tokenizer next to `path`, random
    tokens without one; SDXL's size ids at the calibration size),
    its first stage decodes the parity images."""
    from ldmrt.export.onnx_graph import check_graph, save_graph
    from ldmrt.manifest import TOKENIZER_DIR
    from ldmrt.runtime.text import TextEncoders

    tokenizers = None
    if (path.parent / TOKENIZER_DIR).is_dir() and model.config.is_text_conditioned:
        tokenizers = TextEncoders.from_folder(model.config, path.parent / TOKENIZER_DIR).tokenizers
        if model.config.is_layout_conditioned:
            tokenizers = tokenizers[0]

    # By default at the bundle's optimal size, the one generation runs at: calibrated at the
    # smallest size instead, the trained digits model lost 10 dB of image PSNR at its own size
    # (median over 100 images 25.8 -> 33.3 dB; docs/cpu_speed.md). MIN trades that for memory.
    which = 1 if options.calibration_size == CalibrationSize.OPT else 0
    size = spec.ranges["latent_height"][which], spec.ranges["latent_width"][which]
    maker = TrajectoryMaker(model, spec, size, options.guidance, tokenizers)
    prompts, parity_prompt = split_prompts(prompts)
    graph = onnx.load(str(path), load_external_data=False).graph
    levels = [(level, *select_targets(graph, level)) for level in LEVELS]
    del graph
    levels = [(level, targets, kept) for level, targets, kept in levels if targets]
    if not levels:
        raise ExportError(f"{spec.name}: no Conv or MatMul with constant weights to quantize")
    # The calibration runs go through the probe itself (each input runs once), and one
    # calibration serves every level: the first level's tensors include the others'.
    with RangeProbe(path, _calibrated_tensors(levels[0][1])) as probe:
        for seed in range(options.calibration_trajectories):
            maker.run(probe, options.calibration_steps, seed, prompts[seed % len(prompts)])
        ranges = probe.ranges()
    fp32 = _session(path)
    held_out = maker.run(fp32, options.parity_steps, PARITY_SEED, parity_prompt)
    del fp32
    attempts: list[dict] = []
    for level, targets, kept in levels:
        quantized = insert_qdq(onnx.load(str(path)), targets, ranges)
        rel, max_abs, image_psnr = _parity(quantized, path, maker, held_out, options)
        attempts.append({"level": level, "unet_rel_l2": rel, "image_psnr_db": image_psnr})
        log.info("%s int8 (%s): per-call rel L2 %.3g, image PSNR %.1f dB", spec.name, level, rel, image_psnr)
        if options.bounds.met(rel, image_psnr):
            break
        del quantized
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.op_type] = counts.get(t.op_type, 0) + 1
    report = Int8Report(
        method=f"static QDQ: u8 activations (min/max), per-channel symmetric weights in +-{WEIGHT_MAX}; "
               f"Conv -> QLinearConv, MatMul -> MatMulIntegerToFloat",
        quantized=counts, kept_fp32=kept,
        calibration={"sampler": "ddim", "trajectories": options.calibration_trajectories,
                     "steps": options.calibration_steps, "guidance": options.guidance,
                     "parity_steps": options.parity_steps, "tensors": len(ranges),
                     "size": options.calibration_size.value, "latent_size": list(size), "prompts": list(prompts[:options.calibration_trajectories]),
                     "parity_prompt": parity_prompt},
        unet_rel_l2=rel, unet_max_abs=max_abs, image_psnr_db=image_psnr, bounds=asdict(options.bounds),
        shapes={k: list(v.shape) for k, v in held_out.feeds[0].items()}, level=level, attempts=attempts)
    report.check()
    entry = quantized.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(asdict(report), sort_keys=True)
    save_graph(quantized, path)
    check_graph(path, spec)
    return report


def _parity(quantized: onnx.ModelProto, path: Path, maker: TrajectoryMaker, held_out: Trajectory,
            options: Int8Options) -> tuple[float, float, float]:
    """(max per-call rel L2, max abs, image PSNR) of a quantized graph against the held-out fp32 run."""
    from ldmrt.export.onnx_graph import save_graph
    from ldmrt.export.validate import relative_l2

    draft = path.with_name(f".{path.stem}.int8.onnx")
    save_graph(quantized, draft)
    try:
        int8 = _session(draft)
        per_call = [relative_l2(int8(feeds), expected)
                    for feeds, expected in zip(held_out.feeds, held_out.outputs)]
        replayed = maker.run(int8, options.parity_steps, PARITY_SEED, PARITY_PROMPT, replay=held_out)
        del int8
        image_psnr = psnr(maker.decode(replayed.latents), maker.decode(held_out.latents))
    finally:
        for leftover in (draft, draft.with_name(draft.name + ".data")):
            leftover.unlink(missing_ok=True)
    return max(r for r, _ in per_call), max(m for _, m in per_call), image_psnr


def read_report(path: Path) -> Int8Report | None:
    """The `Int8Report` stored in an int8 graph's metadata (None for other graphs)."""
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return Int8Report(**json.loads(entry.value))
    return None
