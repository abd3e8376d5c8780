"""Each component's inputs and outputs, declared once.

The same spec drives ONNX dynamic axes, TensorRT optimization profiles, runtime input checks
and the manifest. Torch-free. A dimension is an int (fixed) or a symbol, optionally with an
integer factor: "batch", "latent_height", "8*latent_height".
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Mapping, NoReturn, Sequence

import numpy as np

from ldmrt.config import AutoencoderKind, ConcatKind, ModelConfig
from ldmrt.errors import BundleError, ConfigError, ShapeError

Dim = int | str
_DIM = re.compile(r"^(?:(\d+)\*)?([a-z_]+)$")
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int32")   # every dtype a spec tensor may have
_RE_EXPORT = "the manifest does not describe this graph: re-export the bundle with `ldmrt export`"
# float inputs that stay float32 in reduced-precision graphs (exact step and size values)
FP32_INPUTS = frozenset({"timestep", "time_ids"})
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")   # in context order


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"      # CPU: int8 UNet inside (export/quantize.py); every graph's I/O stays float32

    @property
    def dtype(self) -> str:
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32"}[self.value]


class Component(enum.StrEnum):
    """Every component name: the one vocabulary of manifests, runners, engines and Triton models.
    A member is its name string ("unet"): equal to it, hashed as it, formatted and shown as it."""
    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_2 = "text_encoder_2"   # SDXL base: the second (OpenCLIP bigG) text encoder
    UNET = "unet"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"
    DENOISE_STEP = "denoise_step"   # the update graph (ldmrt/export/step_graph.py): no torch module

    def __repr__(self) -> str:
        return repr(self.value)


def parse_dim(dim: Dim) -> tuple[int, str | None]:
    """(factor, symbol) of a dimension; (value, None) for a fixed one. Sizes and factors are >= 1:
    a zero would make every resolved shape empty."""
    if isinstance(dim, int) and not isinstance(dim, bool):
        if dim < 1:
            raise ConfigError(f"dimension {dim!r}: expected a size >= 1")
        return dim, None
    match = _DIM.match(dim) if isinstance(dim, str) else None
    if not match or int(match.group(1) or 1) < 1:
        raise ConfigError(f"dimension {dim!r}: expected an int >= 1, 'symbol' or 'k*symbol' with k >= 1")
    return int(match.group(1) or 1), match.group(2)


def same_dim(a: Dim, b: Dim) -> bool:
    """Whether two dims mean the same ('1*batch' is 'batch')."""
    return parse_dim(a) == parse_dim(b)


def resolve_dim(dim: Dim, values: Mapping[str, int]) -> int:
    factor, symbol = parse_dim(dim)
    return factor if symbol is None else factor * values[symbol]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                    # numpy name: float32, float16, bfloat16, int32
    shape: tuple[Dim, ...]

    def resolve(self, values: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(resolve_dim(d, values) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        shape = tuple(data["shape"])
        for dim in shape:
            parse_dim(dim)
        if data["dtype"] not in TENSOR_DTYPES:
            raise ConfigError(f"{data['name']}: dtype {data['dtype']!r}: expected one of {list(TENSOR_DTYPES)}")
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=shape)


@dataclass(frozen=True)
class GraphTensor:
    """A tensor as a loaded graph or engine declares it. A dim is an int (static), a symbol name
    (an ONNX dim_param such as '8*latent_height') or None (dynamic, unnamed); `shape` is None
    where the graph states no shape at all."""
    name: str
    dtype: str                    # numpy name, as in TensorSpec
    shape: tuple[int | str | None, ...] | None


@dataclass(frozen=True)
class ComponentSpec:
    """A component's I/O with the range (min, opt, max) of every symbol it uses."""
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ranges: Mapping[str, tuple[int, int, int]]

    def __post_init__(self) -> None:
        for tensor in self.inputs + self.outputs:
            for dim in tensor.shape:
                _, symbol = parse_dim(dim)
                if symbol is not None and symbol not in self.ranges:
                    raise ConfigError(f"{self.name}.{tensor.name}: symbol {symbol!r} has no range")
        for symbol, (lo, opt, hi) in self.ranges.items():
            if not 1 <= lo <= opt <= hi:
                raise ConfigError(f"{self.name}: range of {symbol!r} must satisfy "
                                  f"1 <= min <= opt <= max, found {(lo, opt, hi)}")

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX exporter `dynamic_axes`: every symbolic dimension of every tensor."""
        return {t.name: {i: str(d) for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.inputs + self.outputs
                if any(isinstance(d, str) for d in t.shape)}

    def profile(self, pick: Mapping[str, tuple[int, int, int]] | None = None
                ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) shapes, from the ranges (or a narrower `pick`)."""
        ranges = {**self.ranges, **(pick or {})}
        corners = [{s: r[i] for s, r in ranges.items()} for i in range(3)]
        return {t.name: tuple(t.resolve(c) for c in corners) for t in self.inputs}  # type: ignore

    def bind(self, arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Check inputs' names, dtypes and shapes against the spec; return the symbol values."""
        expected = [t.name for t in self.inputs]
        if sorted(arrays) != sorted(expected):
            raise ShapeError(f"{self.name}: expected inputs {expected}, found {sorted(arrays)}")
        values: dict[str, int] = {}
        for tensor in self.inputs:
            array = arrays[tensor.name]
            if str(array.dtype) != tensor.dtype:
                raise ShapeError(f"{self.name}.{tensor.name}: expected dtype {tensor.dtype}, "
                                 f"found {array.dtype}")
            if array.ndim != len(tensor.shape):
                raise ShapeError(f"{self.name}.{tensor.name}: expected shape {list(tensor.shape)}, "
                                 f"found {list(array.shape)}")
            for axis, (dim, size) in enumerate(zip(tensor.shape, array.shape)):
                factor, symbol = parse_dim(dim)
                if symbol is None:
                    ok = size == factor
                else:
                    ok = size % factor == 0 and values.setdefault(symbol, size // factor) == size // factor
                if not ok:
                    raise ShapeError(f"{self.name}.{tensor.name}: axis {axis} expected {dim} "
                                     f"(with {values}), found {size} in shape {list(array.shape)}")
        for symbol, value in values.items():
            lo, _, hi = self.ranges[symbol]
            if not lo <= value <= hi:
                raise ShapeError(f"{self.name}: {symbol}={value} is outside the built range "
                                 f"[{lo}, {hi}]; re-export with a wider range")
        return values

    def check_graph(self, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor],
                    graph: str) -> None:
        """The loaded `graph`'s inputs and outputs against the spec, before any run: the same names,
        dtypes and ranks; a static dim where the spec has one, a symbolic dim where the spec has a
        symbol (and, where the graph names it, the same expression). BundleError on any difference.
        Dims the graph leaves unnamed are checked on each output at run time (`check_output`)."""
        def fail(what: str, declared: Any, found: Any) -> NoReturn:
            raise BundleError(f"{self.name} graph {graph}: {what}: the manifest declares {declared}, "
                              f"the graph has {found}; {_RE_EXPORT}")

        for group, tensors, found in (("inputs", self.inputs, inputs), ("outputs", self.outputs, outputs)):
            names = [t.name for t in found]
            if sorted(names) != sorted(t.name for t in tensors):
                fail(group, [t.name for t in tensors], names)
            by_name = {t.name: t for t in found}
            for tensor in tensors:
                self._check_graph_tensor(tensor, by_name[tensor.name], f"{group[:-1]} {tensor.name}", fail)

    def _check_graph_tensor(self, tensor: TensorSpec, found: GraphTensor, what: str, fail) -> None:
        if found.dtype != tensor.dtype:
            fail(f"{what} dtype", tensor.dtype, found.dtype)
        if found.shape is None:
            return
        if len(found.shape) != len(tensor.shape):
            fail(f"{what} rank", f"{len(tensor.shape)} dims {list(tensor.shape)}",
                 f"{len(found.shape)} dims {list(found.shape)}")
        for axis, (dim, graph_dim) in enumerate(zip(tensor.shape, found.shape)):
            factor, symbol = parse_dim(dim)
            if graph_dim is None or (isinstance(graph_dim, str) and not _DIM.match(graph_dim)):
                continue                  # unnamed (exporters invent such names): checked at run time
            if symbol is None:
                declared, ok = dim, graph_dim == factor
            else:
                lo, _, hi = self.ranges[symbol]
                declared = f"{dim!r} ({symbol} {lo}..{hi})"
                # A static graph dim serves a symbol only when the symbol's range is one value.
                ok = same_dim(dim, graph_dim) if isinstance(graph_dim, str) else lo == hi and graph_dim == factor * lo
            if not ok:
                fail(f"{what} axis {axis}", declared, repr(graph_dim) if isinstance(graph_dim, str) else graph_dim)

    def check_output(self, name: str, array: np.ndarray, values: Mapping[str, int]) -> np.ndarray:
        """An output as the graph returned it, against the spec resolved with the inputs' symbol
        `values` (from `bind`): BundleError when its shape or dtype differs, never a wrong-size image."""
        tensor = next(t for t in self.outputs if t.name == name)
        expected = tensor.resolve(values)
        if tuple(array.shape) != expected or str(array.dtype) != tensor.dtype:
            raise BundleError(f"{self.name}.{name}: the graph returned shape {list(array.shape)} dtype "
                              f"{array.dtype}; the manifest declares {list(tensor.shape)} "
                              f"{tensor.dtype}, that is {list(expected)} for these inputs "
                              f"({dict(values)}); {_RE_EXPORT}")
        return array

    def difference(self, other: "ComponentSpec") -> tuple[str, Any, Any] | None:
        """The first place where `other` differs: (path such as 'inputs[0].shape', this spec's
        value, other's value); None when both declare the same I/O and ranges."""
        for group in ("inputs", "outputs"):
            mine, theirs = getattr(self, group), getattr(other, group)
            if len(mine) != len(theirs):
                return group, [t.name for t in mine], [t.name for t in theirs]
            for index, (a, b) in enumerate(zip(mine, theirs)):
                for key in ("name", "dtype", "shape"):
                    x, y = a.to_dict()[key], b.to_dict()[key]
                    if x != y:
                        return f"{group}[{index}].{key}", x, y
        if sorted(self.ranges) != sorted(other.ranges):
            return "ranges", sorted(self.ranges), sorted(other.ranges)
        for symbol, triple in self.ranges.items():
            if tuple(triple) != tuple(other.ranges[symbol]):
                return f"ranges.{symbol}", list(triple), list(other.ranges[symbol])
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "ranges": {k: list(v) for k, v in self.ranges.items()}}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "ComponentSpec":
        ranges = {str(k): tuple(int(x) for x in v) for k, v in data["ranges"].items()}
        if any(len(r) != 3 for r in ranges.values()):
            raise ConfigError(f"{name}: every range must be [min, opt, max], found {ranges}")
        return cls(name=name, inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                   ranges=ranges)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ShapeRanges:
    """What an export must serve: image sizes in pixels (both sides) and images per call."""
    min_size: int = 256
    opt_size: int = 512
    max_size: int = 768
    max_batch: int = 4
    opt_batch: int = 1
    # the largest side the VAE graphs take (0: max_size); larger images are decoded and encoded in
    # tiles (ldmrt.runtime.tiling): a 4x upscaler's UNet runs at sizes its decoder could not hold
    vae_max_size: int = 0

    def vae_latent_range(self, factor: int) -> tuple[int, int, int]:
        """The VAE graphs' latent range: the UNet's, capped at vae_max_size."""
        lo, opt, hi = self.latent_range(factor)
        if not self.vae_max_size:
            return lo, opt, hi
        value = self.vae_max_size
        if value % factor or not self.min_size <= value <= self.max_size:
            raise ConfigError(f"vae_max_size {value}: expected a multiple of the latent factor {factor} in "
                              f"[min_size, max_size] = [{self.min_size}, {self.max_size}]", field="vae_max_size")
        return lo, min(opt, value // factor), value // factor

    def latent_range(self, factor: int) -> tuple[int, int, int]:
        for name in ("min_size", "opt_size", "max_size"):
            value = getattr(self, name)
            if value < factor or value % factor:
                raise ConfigError(f"{name} {value}: expected a positive multiple of the latent "
                                  f"factor {factor}", field=name)
        if not self.min_size <= self.opt_size <= self.max_size:
            raise ConfigError(f"image sizes: expected min <= opt <= max, found "
                              f"{self.min_size}, {self.opt_size}, {self.max_size}")
        return self.min_size // factor, self.opt_size // factor, self.max_size // factor

    def batch_range(self, guided: bool) -> tuple[int, int, int]:
        """Batch range; doubled where classifier-free guidance stacks uncond + cond."""
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"batch: expected 1 <= opt <= max, found {self.opt_batch}, {self.max_batch}")
        k = 2 if guided else 1
        return 1, k * self.opt_batch, k * self.max_batch

    @classmethod
    def for_model(cls, config: ModelConfig) -> "ShapeRanges":
        size, f = config.default_image_size, config.downsampling_factor
        return cls(min_size=max(f, size // 2), opt_size=size, max_size=size * 3 // 2 // f * f)


def component_specs(config: ModelConfig, ranges: ShapeRanges, precision: Precision,
                    fp32_components: frozenset[str] = frozenset()) -> dict[str, ComponentSpec]:
    """The I/O spec of every component `config` has, at `precision` (fp32 where asked)."""
    f = config.downsampling_factor
    latent = ranges.latent_range(f)
    guided = config.conditioner is not None
    specs: dict[str, ComponentSpec] = {}

    def dtype(component: Component) -> str:
        return "float32" if component.value in fp32_components else precision.dtype

    if config.is_text_conditioned:
        cond = config.conditioner
        length, width = cond.max_length, config.unet.context_dim or cond.context_dim  # type: ignore[union-attr]
        encoders = config.text_encoders or (cond,)
        for name, encoder in zip(TEXT_ENCODER_COMPONENTS, encoders):
            component = Component(name)
            pooled = getattr(encoder, "projection_dim", 0)
            specs[component] = ComponentSpec(
                component, inputs=(TensorSpec("input_ids", "int32", ("batch", length)),),
                outputs=(TensorSpec("text_embeddings", dtype(component), ("batch", length, encoder.context_dim)),)
                + ((TensorSpec("pooled", dtype(component), ("batch", pooled)),) if pooled else ()),
                ranges={"batch": ranges.batch_range(guided)})
    unet_dtype = dtype(Component.UNET)
    unet_inputs = [TensorSpec("sample", unet_dtype,
                              ("batch", config.latent_channels, "latent_height", "latent_width")),
                   TensorSpec("timestep", "float32", ("batch",))]
    if config.is_text_conditioned:
        unet_inputs.append(TensorSpec("encoder_hidden_states", unet_dtype,
                                      ("batch", length, width)))
    if config.is_class_conditioned or config.unet.num_classes is not None:
        unet_inputs.append(TensorSpec("class_labels", "int32", ("batch",)))
    if config.unet.time_ids:     # SDXL's text_time: the pooled text embedding and the size ids
        unet_inputs += [TensorSpec("text_embeds", unet_dtype, ("batch", config.unet.text_embeds_dim)),
                        TensorSpec("time_ids", "float32", ("batch", config.unet.time_ids))]
    # Maps concatenated to the latents inside the graph, in their order: they follow the latent
    # axes, so every profile and runtime check sizes them with the latents.
    for kind in (config.spatial.inputs if config.spatial else ()):
        if kind == ConcatKind.SEGMENTATION:
            unet_inputs.append(TensorSpec(kind.value, "int32", ("batch", f"{f}*latent_height", f"{f}*latent_width")))
        else:
            unet_inputs.append(TensorSpec(kind.value, unet_dtype, ("batch", config.concat_channels(kind),
                                                                   "latent_height", "latent_width")))
    specs[Component.UNET] = ComponentSpec(
        Component.UNET, inputs=tuple(unet_inputs),
        outputs=(TensorSpec("model_output", unet_dtype,
                            ("batch", config.unet.out_channels, "latent_height", "latent_width")),),
        ranges={"batch": ranges.batch_range(guided), "latent_height": latent, "latent_width": latent})
    c = config.latent_channels
    image = ("batch", 3, f"{f}*latent_height", f"{f}*latent_width")
    vae_latent = ranges.vae_latent_range(f)
    vae_ranges = {"batch": ranges.batch_range(False), "latent_height": vae_latent, "latent_width": vae_latent}
    specs[Component.VAE_DECODER] = ComponentSpec(
        Component.VAE_DECODER,
        inputs=(TensorSpec("latent", dtype(Component.VAE_DECODER), ("batch", c, "latent_height", "latent_width")),),
        outputs=(TensorSpec("images", dtype(Component.VAE_DECODER), image),), ranges=vae_ranges)
    kl = config.autoencoder.kind == AutoencoderKind.KL
    specs[Component.VAE_ENCODER] = ComponentSpec(
        Component.VAE_ENCODER,
        inputs=(TensorSpec("images", dtype(Component.VAE_ENCODER), image),),
        outputs=(TensorSpec("latent_dist" if kl else "latent", dtype(Component.VAE_ENCODER),
                            ("batch", 2 * c if kl else c, "latent_height", "latent_width")),),
        ranges=vae_ranges)
    step = denoise_step_spec(specs[Component.UNET], config, ranges)
    if step is not None:
        specs[Component.DENOISE_STEP.value] = step
    return specs


STEPS_OPT = 50   # the evaluations an update graph's profile is tuned for


def denoise_step_spec(unet: ComponentSpec, config: ModelConfig, ranges: ShapeRanges) -> ComponentSpec | None:
    """The update graph's I/O (guidance + sampler update + the next UNet input, one evaluation):
    dtypes and latent axes from the unet spec; None where the UNet's sample is more than the
    latents (concatenated conditioning), which the graph cannot produce."""
    from ldmrt.config import SAMPLERS
    from ldmrt.sampling import MAX_HISTORY, STEP_TABLE_COLUMNS, max_steps   # sampling imports iospec

    sample, output = unet.input("sample"), unet.outputs[0]
    if sample.shape != output.shape:
        return None
    f32, latent = "float32", ("batch", *output.shape[1:])          # (B, C, h, w)
    past, rows = (MAX_HISTORY - 1, *latent), ("unet_batch", *output.shape[1:])
    most = 1 + max(max_steps(name, config.scheduler) for name in SAMPLERS)   # PLMS: steps + 1
    return ComponentSpec(
        Component.DENOISE_STEP.value,
        inputs=(TensorSpec("latents", f32, latent), TensorSpec("model_output", output.dtype, rows),
                TensorSpec("past_latents", f32, past), TensorSpec("past_outputs", f32, past),
                TensorSpec("noise", f32, ("evaluations", *latent)),
                TensorSpec("step_table", f32, ("evaluations", len(STEP_TABLE_COLUMNS))),
                TensorSpec("step_index", "int32", (1,)), TensorSpec("guidance", f32, (1,))),
        outputs=(TensorSpec("next_latents", f32, latent), TensorSpec("next_past_latents", f32, past),
                 TensorSpec("next_past_outputs", f32, past), TensorSpec("next_step_index", "int32", (1,)),
                 TensorSpec("next_sample", sample.dtype, rows), TensorSpec("next_timestep", f32, ("unet_batch",))),
        ranges={"batch": ranges.batch_range(False), "unet_batch": unet.ranges["batch"],
                "latent_height": unet.ranges["latent_height"], "latent_width": unet.ranges["latent_width"],
                "evaluations": (1, min(STEPS_OPT, most), most)})


def example_inputs(config: ModelConfig, spec: ComponentSpec, values: dict[str, int],
                   seed: int) -> dict[str, np.ndarray]:
    """Random inputs of the spec's dtypes at the symbol `values`, in each input's natural range."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.resolve(values)
        if tensor.name == "input_ids":
            high = config.conditioner.vocab_size  # type: ignore[union-attr]
            array = rng.integers(0, high, size=shape)
        elif tensor.name == "class_labels":
            cond = config.conditioner
            high = cond.n_classes if hasattr(cond, "n_classes") else config.unet.num_classes
            if config.spatial is not None and config.spatial.low_res_noise is not None:
                high = config.spatial.low_res_noise.max_noise_level + 1     # labels are noise levels
            array = rng.integers(0, high, size=shape)
        elif tensor.name == ConcatKind.SEGMENTATION:
            array = rng.integers(0, config.spatial.rescaler.n_classes, size=shape)  # type: ignore[union-attr]
        elif tensor.name == ConcatKind.MASK:
            spatial = config.spatial
            array = np.where(rng.random(size=shape) < 0.5, spatial.mask_keep, spatial.mask_repaint)  # type: ignore
        elif tensor.name == ConcatKind.LOW_RES_IMAGE:
            array = rng.uniform(-1.0, 1.0, size=shape)
        elif tensor.name == "timestep":
            array = rng.uniform(0, config.scheduler.num_train_timesteps - 1, size=shape)
        elif tensor.name == "time_ids":      # image sizes and crops, as SDXL's pipelines pass them
            array = rng.integers(0, 1025, size=shape)
        elif tensor.name == "images":
            array = rng.uniform(-1.0, 1.0, size=shape)
        else:
            array = rng.standard_normal(size=shape)
        arrays[tensor.name] = array.astype(numpy_dtype(tensor.dtype))
    return arrays


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype a tensor of spec dtype `name` is fed as."""
    if name == "bfloat16":
        return np.dtype(np.float32)   # numpy has no bf16: feed fp32, cast at the boundary
    return np.dtype(name)
