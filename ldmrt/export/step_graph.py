"""The update graph (component `denoise_step`): one evaluation's guidance, sampler update and next
UNet input as a small ONNX graph, exported with every bundle and checked against numpy at export.

Device code (TensorRT: ldmrt/engines/tensorrt_denoise.py) runs it after each UNet call on device
buffers; every per-step number comes from the step table (`ldmrt.sampling.step_table`) row picked
by the device-resident `step_index`, so one captured CUDA graph (UNet engine + this graph) serves
every step of every sampler. Inputs and outputs (`ldmrt.iospec.denoise_step_spec`):

    latents (B, C, h, w) f32, model_output (G*B, C, h, w) unet dtype, rows [uncond; cond] when G = 2
    past_latents, past_outputs (4, B, C, h, w) f32: x_{i-1}..x_{i-4}, m_{i-1}..m_{i-4} (zeros at first)
    noise (N, B, C, h, w) f32, step_table (N, 17) f32, step_index (1,) int32 = i, guidance (1,) f32
 -> next_latents = x_{i+1}, next_past_latents = [x_i, .., x_{i-3}], next_past_outputs = [m_i, .., m_{i-3}],
    next_step_index = (i + 1) mod N, next_sample = x_{i+1} * input_scale[i+1] tiled G times (unet
    dtype), next_timestep (G*B,) = timestep[i+1]

with m = uncond + guidance * (cond - uncond) (unguided: both halves are the same rows, m = output)
and x_{i+1} = x*A0 + m*B0 + sum_k (x_{i-k}*A_k + m_{i-k}*B_k) + E*clip(x*P + m*Q, -r, r) + C*noise_i,
term by term in float32 in the order of `ldmrt.sampling.plan.step`, so ONNX Runtime reproduces the
numpy update bit for bit. Built with onnx.helper: no torch.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from ldmrt.config import PredictionType
from ldmrt.errors import ExportError, ParityError
from ldmrt.iospec import ComponentSpec
from ldmrt.manifest import ComponentEntry, ParityRecord
from ldmrt.sampling import MAX_HISTORY, STEP_TABLE_COLUMNS, History, SamplerPlan, guide, step, step_table

log = logging.getLogger(__name__)

__all__ = ["build_step_graph", "write_step_graph", "check_step_graph", "export_step_graph", "TOLERANCE"]

TOLERANCE = 1e-6      # relative L2 of every output vs numpy (measured at export: 0, bit for bit)
PAST = MAX_HISTORY - 1
MIN_OPSET = 13        # the export's own minimum (18, export/onnx_graph.py) is what bundles use
_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
               "bfloat16": TensorProto.BFLOAT16, "int32": TensorProto.INT32}
_REFERENCE = "numpy ldmrt.sampling.guide + step (random step table, every term; ONNX Runtime CPU)"


class _Graph:
    """Nodes and int64 constants of one graph, each node named `<part>/<op>_<n>`."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []

    def op(self, part: str, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        name = f"{part}/{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out or name], name=name, **attrs))
        return out or name

    def ints(self, *values: int, dtype: int = TensorProto.INT64) -> str:
        """A 1-D integer constant (Slice bounds, axes, repeats; int32 for the step counter)."""
        name = f"const/ints_{len(self.constants)}"
        self.constants.append(helper.make_tensor(name, dtype, [len(values)], list(values)))
        return name

    def scalar_index(self, value: int) -> str:
        """A rank-0 int64 index: Gather with it drops the gathered axis."""
        name = f"const/index_{len(self.constants)}"
        self.constants.append(helper.make_tensor(name, TensorProto.INT64, [], [value]))
        return name


def _to_float(g: _Graph, name: str, dtype: str) -> str:
    """`name` as float32 (a Cast only where the spec's dtype is another)."""
    return name if dtype == "float32" else g.op("cast", "Cast", name, to=TensorProto.FLOAT)


def _guided_output(g: _Graph, model_output: str, dtype: str) -> str:
    """m = uncond + guidance * (cond - uncond): uncond the first B rows, cond the last B rows."""
    output = _to_float(g, model_output, dtype)
    batch = g.op("guidance", "Slice", g.op("guidance", "Shape", "latents"), g.ints(0), g.ints(1))
    rows = g.op("guidance", "Slice", g.op("guidance", "Shape", model_output), g.ints(0), g.ints(1))
    uncond = g.op("guidance", "Slice", output, g.ints(0), batch, g.ints(0))             # (B, C, h, w)
    cond = g.op("guidance", "Slice", output, g.op("guidance", "Sub", rows, batch), rows, g.ints(0))
    difference = g.op("guidance", "Sub", cond, uncond, out="guidance/difference")
    return g.op("guidance", "Add", uncond, g.op("guidance", "Mul", "guidance", difference))


def _row(g: _Graph, index: str, part: str) -> str:
    """step_table[index] for a rank-0 index: (17,)."""
    return g.op(part, "Gather", "step_table", index, axis=0)


def _column(g: _Graph, row: str, column: str) -> str:
    """One named number of a step-table row, as a (1,) tensor that broadcasts over the latents."""
    return g.op(f"table/{column}", "Gather", row, g.ints(STEP_TABLE_COLUMNS.index(column)), axis=0)


def _axpy(g: _Graph, part: str, total: str, value: str, coef: str) -> str:
    """total + value * coef."""
    return g.op(part, "Add", total, g.op(part, "Mul", value, coef))


def _update_terms(g: _Graph, row: str, x: str, m: str) -> str:
    """x*A0 + m*B0, then x_{i-k}*A_k and m_{i-k}*B_k for k = 1..4, in `step`'s order."""
    total = g.op("update", "Mul", x, _column(g, row, "sample_coef_0"))
    total = _axpy(g, "update", total, m, _column(g, row, "output_coef_0"))
    for lag in range(1, MAX_HISTORY):
        past_x = g.op("update", "Gather", "past_latents", g.scalar_index(lag - 1), axis=0)
        past_m = g.op("update", "Gather", "past_outputs", g.scalar_index(lag - 1), axis=0)
        total = _axpy(g, "update", total, past_x, _column(g, row, f"sample_coef_{lag}"))
        total = _axpy(g, "update", total, past_m, _column(g, row, f"output_coef_{lag}"))
    return total


def _clip_term(g: _Graph, row: str, x: str, m: str, total: str) -> str:
    """total + E * clip(x*P + m*Q, -r, r): the clipped x0 estimate (E = 0 where a plan has none)."""
    x0 = _axpy(g, "clip", g.op("clip", "Mul", x, _column(g, row, "clip_sample_coef")), m,
               _column(g, row, "clip_output_coef"))
    limit = _column(g, row, "clip_range")
    # Max then Min is np.clip; TensorRT takes them with a tensor range, unlike Clip.
    clipped = g.op("clip", "Min", g.op("clip", "Max", x0, g.op("clip", "Neg", limit)), limit)
    return _axpy(g, "clip", total, clipped, _column(g, row, "clip_coef"))


def _noise_term(g: _Graph, row: str, index: str, total: str) -> str:
    """total + C * noise[i] (C = 0 and zeros where the plan adds none)."""
    noise = g.op("noise", "Gather", "noise", index, axis=0)                           # (B, C, h, w)
    return _axpy(g, "noise", total, noise, _column(g, row, "noise_coef"))


def _history_shift(g: _Graph, current: str, past: str, out: str) -> str:
    """[current, past[0], .., past[2]]: the newest entry in front, the oldest dropped."""
    newest = g.op("history", "Unsqueeze", current, g.ints(0))
    kept = g.op("history", "Slice", past, g.ints(0), g.ints(PAST - 1), g.ints(0))
    return g.op("history", "Concat", newest, kept, axis=0, out=out)


def _next_index(g: _Graph, index: str) -> str:
    """(step_index + 1) mod evaluations, int32 (1,)."""
    evaluations = g.op("counter", "Slice", g.op("counter", "Shape", "step_table"), g.ints(0), g.ints(1))
    return g.op("counter", "Mod", g.op("counter", "Add", index, g.ints(1, dtype=TensorProto.INT32)),
                g.op("counter", "Cast", evaluations, to=TensorProto.INT32), out="next_step_index")


def _next_input(g: _Graph, next_latents: str, next_row: str, model_output: str, sample_dtype: str) -> None:
    """next_sample = next_latents * input_scale tiled to the UNet's rows; next_timestep per row."""
    scaled = g.op("next_input", "Mul", next_latents, _column(g, next_row, "input_scale"))
    batch = g.op("next_input", "Slice", g.op("next_input", "Shape", "latents"), g.ints(0), g.ints(1))
    rows = g.op("next_input", "Slice", g.op("next_input", "Shape", model_output), g.ints(0), g.ints(1))
    repeats = g.op("next_input", "Concat", g.op("next_input", "Div", rows, batch), g.ints(1, 1, 1), axis=0)
    tiled = g.op("next_input", "Tile", scaled, repeats)                            # (G*B, C, h, w)
    if sample_dtype == "float32":
        g.op("next_input", "Identity", tiled, out="next_sample")
    else:
        g.op("next_input", "Cast", tiled, to=_ONNX_TYPES[sample_dtype], out="next_sample")
    g.op("next_input", "Expand", _column(g, next_row, "timestep"), rows, out="next_timestep")


def build_step_graph(spec: ComponentSpec, opset: int) -> onnx.ModelProto:
    """The update graph for `spec` (a `denoise_step_spec`), checked by onnx.checker."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset}: the update graph needs >= {MIN_OPSET} (Squeeze and Slice "
                          f"take their axes as inputs)", field="opset")
    g = _Graph()
    index = g.op("counter", "Squeeze", "step_index", g.ints(0))                    # rank 0
    row = _row(g, index, "table")
    x, m = "latents", _guided_output(g, "model_output", spec.input("model_output").dtype)
    total = _clip_term(g, row, x, m, _update_terms(g, row, x, m))
    g.op("update", "Identity", _noise_term(g, row, index, total), out="next_latents")
    _history_shift(g, x, "past_latents", "next_past_latents")
    _history_shift(g, m, "past_outputs", "next_past_outputs")
    next_index = _next_index(g, "step_index")
    next_row = _row(g, g.op("counter", "Squeeze", next_index, g.ints(0)), "next_table")
    sample_dtype = next(t for t in spec.outputs if t.name == "next_sample").dtype
    _next_input(g, "next_latents", next_row, "model_output", sample_dtype)

    def value_info(tensor):
        return helper.make_tensor_value_info(tensor.name, _ONNX_TYPES[tensor.dtype], list(tensor.shape))

    graph = helper.make_graph(g.nodes, spec.name, [value_info(t) for t in spec.inputs],
                              [value_info(t) for t in spec.outputs], initializer=g.constants)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="ldmrt",
                              ir_version=helper.find_min_ir_version_for(opsets))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # checker and shape inference raise several kinds
        raise ExportError(f"{spec.name}: onnx.checker rejected the update graph: {exc}") from exc
    return model


def write_step_graph(spec: ComponentSpec, path: Path, opset: int) -> Path:
    """Build the update graph and save it as `path`."""
    onnx.save_model(build_step_graph(spec, opset), str(path))
    return path


# --- the check against numpy ------------------------------------------------------------------

def check_step_graph(graph: Path | onnx.ModelProto, spec: ComponentSpec, seed: int = 0) -> ParityRecord:
    """ONNX Runtime (CPU) vs `ldmrt.sampling.guide` + `step` on a random step table that uses every
    term (five lags, clipping, noise), guided at a middle step and unguided at the last (the
    counter wraps); the worst relative L2 over every output."""
    model = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph))
    run = _cpu_runner(model, spec)
    rng = np.random.default_rng(seed)
    values = _check_shape(spec)
    plan = _random_plan(rng, evaluations=PAST + 3)
    worst, max_abs = 0.0, 0.0
    for guided, i in ((True, PAST), (False, plan.num_evaluations - 1)):
        feeds, expected = _random_case(rng, spec, plan, values, guided, i)
        found = run(feeds)
        for name, want in expected.items():
            rel, diff = _relative_l2(found[name], want)
            worst, max_abs = max(worst, rel), max(max_abs, diff)
    shapes = {name: tuple(array.shape) for name, array in feeds.items()}
    return ParityRecord(reference=_REFERENCE, rel_l2=worst, max_abs=max_abs, tolerance=TOLERANCE, shapes=shapes)


def _check_shape(spec: ComponentSpec) -> dict[str, int]:
    """Batch 2 (1 where the range stops there), a small non-square latent."""
    height, (w_lo, _, w_hi) = spec.ranges["latent_height"][0], spec.ranges["latent_width"]
    return {"batch": min(2, spec.ranges["batch"][2]), "latent_height": height, "latent_width": min(w_lo + 1, w_hi)}


def _random_plan(rng: np.random.Generator, evaluations: int) -> SamplerPlan:
    """A plan of random float32-exact coefficients in every column: no sampler uses all of them."""
    def table(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
        return rng.uniform(low, high, shape).astype(np.float32).astype(np.float64)

    noise = table(evaluations)
    return SamplerPlan(
        name="random", prediction_type=PredictionType.EPSILON, num_steps=evaluations, strength=1.0,
        eta=0.0, start_step=0, timesteps=table(evaluations, low=0, high=999).astype(np.float32),
        input_scale=table(evaluations, low=0.1, high=2.0), alpha_bars=table(evaluations, low=0.01, high=0.99),
        sample_coefs=table(evaluations, MAX_HISTORY),
        output_coefs=table(evaluations, MAX_HISTORY), noise_coefs=noise, needs_noise=noise != 0,
        clip_range=float(np.float32(0.75)), clip_sample_coefs=table(evaluations),
        clip_output_coefs=table(evaluations), clip_coefs=table(evaluations), init_noise_sigma=1.0,
        init_latent_coef=1.0, init_noise_coef=0.0)


def _random_case(rng: np.random.Generator, spec: ComponentSpec, plan: SamplerPlan, values: Mapping[str, int],
                 guided: bool, i: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Feeds for evaluation `i` after `i` earlier ones, and every output as numpy computes it."""
    batch, n = values["batch"], plan.num_evaluations
    latent = (batch, *spec.input("latents").resolve(values)[1:])
    rows = 2 * batch if guided else batch
    scale = 7.5 if guided else 1.0

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    history = History(plan)
    past_x = past_m = np.zeros((PAST, *latent), np.float32)
    for _ in range(i):                           # x_{i-k}, m_{i-k} as the earlier steps left them
        x_k, m_k = normal(*latent), normal(*latent)
        history.push(x_k, m_k)
        past_x, past_m = _shifted(x_k, past_x), _shifted(m_k, past_m)
    output_dtype = spec.input("model_output").dtype
    model_output = _round(np.concatenate([normal(*latent), normal(*latent)]) if guided else normal(*latent),
                          output_dtype)
    x, noise = normal(*latent), normal(n, *latent)
    m = guide(model_output, np.float32(scale)) if guided else model_output
    table = step_table(plan)
    x_next = step(plan, i, x, m, history, noise[i])
    j = (i + 1) % n
    sample = _round(np.tile(x_next * table[j, STEP_TABLE_COLUMNS.index("input_scale")], (rows // batch, 1, 1, 1)),
                    next(t for t in spec.outputs if t.name == "next_sample").dtype)
    feeds = {"latents": x, "model_output": model_output, "past_latents": past_x, "past_outputs": past_m,
             "noise": noise, "step_table": table, "step_index": np.array([i], np.int32),
             "guidance": np.array([scale], np.float32)}
    expected = {"next_latents": x_next, "next_past_latents": _shifted(x, past_x),
                "next_past_outputs": _shifted(m, past_m),
                "next_step_index": np.array([j], np.int32), "next_sample": sample,
                "next_timestep": np.full((rows,), table[j, STEP_TABLE_COLUMNS.index("timestep")], np.float32)}
    return feeds, expected


def _shifted(newest: np.ndarray, past: np.ndarray) -> np.ndarray:
    """[newest, past[0], .., past[-2]] (the history after one more step)."""
    return np.concatenate([newest[None], past[:-1]])


def _round(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 `array` rounded to `dtype` and back (what a cast to the UNet's dtype keeps)."""
    if dtype == "float32":
        return array
    if dtype == "float16":
        return array.astype(np.float16).astype(np.float32)
    import ml_dtypes                               # onnx's own dependency: numpy's bfloat16

    return array.astype(ml_dtypes.bfloat16).astype(np.float32)


def _cpu_runner(model: onnx.ModelProto, spec: ComponentSpec) -> Callable[[Mapping[str, np.ndarray]], dict]:
    """feeds (float32 where the graph takes fp16/bf16) -> outputs, by ONNX Runtime CPU. numpy has no
    bfloat16: such inputs go in as OrtValues and such outputs come out through an added Cast to
    float32; the graph's own nodes are unchanged."""
    import onnxruntime as ort

    readable = copy.deepcopy(model)
    for value in readable.graph.output:
        if value.type.tensor_type.elem_type != TensorProto.BFLOAT16:
            continue
        inner = f"{value.name}/unconverted"
        for node in readable.graph.node:
            node.output[:] = [inner if out == value.name else out for out in node.output]
        readable.graph.node.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT))
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(readable.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [t.name for t in spec.outputs]

    def feed(name: str, array: np.ndarray):
        dtype = spec.input(name).dtype
        if dtype == "bfloat16":
            import ml_dtypes

            bits = np.ascontiguousarray(array.astype(ml_dtypes.bfloat16)).view(np.uint16)
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, TensorProto.BFLOAT16)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array.astype(dtype)))

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = session.run_with_ort_values(names, {name: feed(name, a) for name, a in feeds.items()})
        return {name: value.numpy() for name, value in zip(names, values)}
    return run


def _relative_l2(found: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(||found - expected|| / ||expected||, max |found - expected|) in float64; NaN, inf or another
    shape -> inf."""
    found64, expected64 = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    if found64.shape != expected64.shape or not (np.isfinite(found64).all() and np.isfinite(expected64).all()):
        return float("inf"), float("inf")
    diff = found64 - expected64
    scale = np.linalg.norm(expected64)
    rel = float(np.linalg.norm(diff) / scale) if scale > 0 else float(np.linalg.norm(diff))
    return rel, float(np.abs(diff).max(initial=0.0))


# --- export -----------------------------------------------------------------------------------

def export_step_graph(spec: ComponentSpec, work: Path, opset: int,
                      report: Callable[[str, str], None]) -> ComponentEntry:
    """Write `denoise_step.onnx` into the bundle being exported, check it against numpy (always: it
    takes milliseconds, and a wrong update graph must never ship) and return its manifest entry."""
    report(spec.name, "building the update graph")
    path = write_step_graph(spec, work / f"{spec.name}.onnx", opset)
    report(spec.name, "validating against numpy")
    parity = check_step_graph(path, spec)
    if not parity.passed:
        raise ParityError(f"{spec.name}: ONNX Runtime vs the numpy update relative L2 {parity.rel_l2:.3g} "
                          f"exceeds {parity.tolerance:g} (max abs {parity.max_abs:.3g}); no bundle written")
    log.info("%s: update graph matches numpy (relative L2 %.3g)", spec.name, parity.rel_l2)
    return ComponentEntry.from_files(work, spec, spec.input("model_output").dtype, parity)
