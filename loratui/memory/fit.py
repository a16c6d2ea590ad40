"""Activation-memory models fitted from traced reference steps, cached per architecture.

For one architecture and one `Regime`, the memory a micro-batch adds above the weights is fitted as

    f(b, T, r) = c0 + b·(c1 + c2·T + c3·T² + c4·T·r + c5·r) + c6·r

(b: micro-batch, T: tokens — sequence length, or latent pixels for SD —, r: LoRA rank). Activations are linear
in b and, with fused attention, in T; the T² term absorbs attention matrices where they are materialised; LoRA's
own intermediates are linear in r, its gradients (c6) too. Where the peak of a step happens can move (early in
backward when activations dominate, late when LoRA gradients do), so the memory timeline is fitted, not only
its maximum:

- SD: the traced steps' timelines are aligned allocation by allocation (batch 1 takes a few different kernels,
  which the alignment tolerates); f is fitted at every moment where some traced step came near its peak, and the
  prediction is the highest of them.
- LLMs are traced with 1 and 2 decoder layers, in three phases (forward, backward through the top layer,
  backward through the bottom layer). f is fitted at every candidate peak moment of each phase of the aligned
  timelines; a phase's value is the highest of its moments, at 1 and at 2 layers, extrapolated linearly to the
  real depth. Fitting moments, not each phase's maximum, matters where the moment that peaks changes with the
  shape (under QLoRA a fixed-size dequantised weight copy outweighs the activations of short sequences): a
  polynomial through the maxima bends there and runs off beyond the traced lengths.

Where the traces come from (`source`): ``cpu`` — the reference step run for real on this CPU with random
weights (small architectures); ``meta`` — traced on the meta device with CUDA autocast and fused attention
(shipped tables, and architectures too big to run here). Caching and the shipped tables: `tables`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loratui.memory.arch import ArchSpec
from loratui.memory.regime import Point, Regime

FIT_VERSION = {"sd": 5, "llm": 7}  # bump when a kind's tracing or fitting changes
N_COEF = 7
ENVELOPE_SIZE = 48  # moments of the step timeline kept as candidate peaks
NEAR_PEAK = 0.6
#: traced shapes: tokens per size class and task
CALIBRATION = {
    ("sd", "cpu"): {"tokens": (64, 144, 256), "ranks": (4, 64)},  # 64², 96², 128² px
    ("sd", "meta"): {"tokens": (4096, 9216, 16384), "ranks": (8, 64)},  # 512², 768², 1024² px
    ("llm", "cpu"): {"tokens": (64, 128, 256), "ranks": (4, 64)},
    ("llm", "meta"): {"tokens": (256, 1024, 2048), "ranks": (8, 64)},
}
#: encode fits (no gradients) depend on batch and tokens only
ENCODE_TOKENS = {"cpu": (64, 256), "meta": (4096, 16384)}
CPU_TRACE_PARAM_LIMIT = 50_000_000


def basis(batch: float, tokens: float, rank: float) -> list[float]:
    """Features of f(b, T, r)."""
    return [1.0, batch, batch * tokens, batch * tokens * tokens, batch * tokens * rank, batch * rank, rank]


def design(ranks: tuple[int, int], tokens: tuple[int, ...]) -> list[Point]:
    """Eight shapes that determine the seven coefficients with one to spare."""
    t1, t2, t3 = tokens
    r1, r2 = ranks
    points = [
        Point(1, t1, r1),
        Point(2, t1, r1),
        Point(1, t2, r1),
        Point(1, t3, r1),
        Point(1, t1, r2),
        Point(1, t3, r2),
        Point(2, t3, r2),
        Point(2, t2, r2),
    ]
    return points


def solve(rows: list[list[float]], values: list[float]) -> tuple[list[float], float]:
    """Least squares on relative error; returns (coefficients, worst relative residual)."""
    import numpy as np

    a = np.array(rows, dtype=np.float64)
    y = np.array(values, dtype=np.float64)
    weights = 1.0 / np.maximum(np.abs(y), 1.0)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    coef, *_ = np.linalg.lstsq((a / scale) * weights[:, None], y * weights, rcond=None)
    coef = coef / scale
    fitted = a @ coef
    residual = float(np.max(np.abs(fitted - y) * weights)) if len(y) else 0.0
    return [float(c) for c in coef], residual


@dataclass
class Fit:
    """f for the peak above the weights, and for activations alone; `per_layer` parts scale with LLM depth."""

    peak: list[float]
    activations: list[float]
    peak_per_layer: list[float] = field(default_factory=lambda: [0.0] * N_COEF)
    activations_per_layer: list[float] = field(default_factory=lambda: [0.0] * N_COEF)
    residual: float = 0.0
    source: str = "meta"
    traces: int = 0
    peak_envelope: list[list[float]] | None = None  # one coefficient vector per candidate peak moment
    activations_envelope: list[list[float]] | None = None
    peak_envelope_per_layer: list[list[float]] | None = None  # LLM: growth per decoder layer of each moment
    activations_envelope_per_layer: list[list[float]] | None = None
    #: LLM: [1-layer, 2-layer] phases, each a list of coefficient vectors (one per candidate peak moment)
    peak_moments: list[list[list[list[float]]]] | None = None
    activations_moments: list[list[list[list[float]]]] | None = None

    def evaluate(self, batch: int, tokens: int, rank: int, layers: int = 1) -> tuple[float, float]:
        """(peak, activations) bytes above the weights for one micro-batch of a model with `layers` decoder
        layers (LLMs; `layers=0` gives the part outside the decoder layers: embeddings, logits, loss)."""
        phi = basis(batch, tokens, rank)
        extra = layers - 1
        if self.peak_moments and self.activations_moments:
            peak = _moments_max(phi, self.peak_moments, extra)
            acts = _moments_max(phi, self.activations_moments, extra)
            return max(peak, 0.0), max(acts, 0.0)
        if self.peak_envelope and self.activations_envelope:
            peak = _envelope_max(phi, self.peak_envelope, self.peak_envelope_per_layer, extra)
            acts = _envelope_max(phi, self.activations_envelope, self.activations_envelope_per_layer, extra)
            return max(peak, 0.0), max(acts, 0.0)
        peak = sum(p * (c + extra * d) for p, c, d in zip(phi, self.peak, self.peak_per_layer, strict=True))
        acts = sum(
            p * (c + extra * d)
            for p, c, d in zip(phi, self.activations, self.activations_per_layer, strict=True)
        )
        return max(peak, 0.0), max(acts, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fit:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _envelope_max(
    phi: list[float], base: list[list[float]], per_layer: list[list[float]] | None, extra: int
) -> float:
    if not per_layer:
        return max(_dot(phi, c) for c in base)
    return max(_dot(phi, c) + extra * _dot(phi, d) for c, d in zip(base, per_layer, strict=True))


def _phase_series(trace, layers: int, pick) -> list[float]:
    """The highest value in three phases of an LLM step whose growth with depth is linear: the forward pass;
    backward through the top decoder layer (checkpoints of every layer below still held); backward through the
    bottom layer (gradients of every layer above already held). Backward progress is the share of LoRA
    gradients produced, which is the same for every batch, length and rank."""
    timeline = trace.timeline or []
    start = trace.backward_start if trace.backward_start is not None else len(timeline)
    final = max(trace.gradients, 1)
    values = [float(pick(a, g)) for a, g, *_ in timeline]
    shares = [g / final for _, g, *_ in timeline]
    forward = max(values[:start], default=0.0)
    backward = list(zip(values[start:], shares[start:], strict=True))
    top = max((v for v, f in backward if f <= 1 / layers + 1e-9), default=forward)
    bottom = max((v for v, f in backward if f >= (layers - 1) / layers - 1e-9), default=forward)
    return [forward, top, bottom]


def _phase_fit(traces: list, rows: list[list[float]], layers: int, pick) -> tuple[list[list[float]], float]:
    """Coefficients per phase, and the worst relative error of the predicted peak on the traces."""
    series = [_phase_series(t, layers, pick) for t in traces]
    envelope = [solve(rows, [s[k] for s in series])[0] for k in range(3)]
    worst = 0.0
    for row, values in zip(rows, series, strict=True):
        predicted = max(_dot(row, c) for c in envelope)
        worst = max(worst, abs(predicted - max(values)) / max(max(values), 1))
    return envelope, worst


def _candidates(series: list[list[int]]) -> list[int]:
    """Moments of the timeline where some trace is near its own peak (local maxima), most prominent first."""
    import numpy as np

    values = np.array(series, dtype=np.float64)
    tops = np.maximum(values.max(axis=1, keepdims=True), 1.0)
    share = (values / tops).max(axis=0)
    left = np.concatenate([values[:, :1] - 1, values[:, :-1]], axis=1)
    right = np.concatenate([values[:, 1:], values[:, -1:] - 1], axis=1)
    local = ((values >= left) & (values >= right)).any(axis=0)
    chosen = np.flatnonzero(local & (share >= NEAR_PEAK))
    chosen = chosen[np.argsort(-share[chosen], kind="stable")][:ENVELOPE_SIZE]
    must = set(int(i) for i in values.argmax(axis=1))
    return sorted(must | {int(i) for i in chosen})


_SAME_OP = {"bmm": "mm", "addmm": "mm", "baddbmm": "mm"}  # batch 1 folds batched matmuls into plain ones


def _op(name: str) -> str:
    base = name.split(".")[0]
    return _SAME_OP.get(base, base)


def _align(reference: list[str], other: list[str], window: int = 64) -> list[int] | None:
    """For each event of `reference`, the index of the same event in `other`, which may have a few extra
    allocations (batch 1 takes view paths where larger batches copy). None when they do not line up."""
    mapping, j = [], 0
    for name in reference:
        found = next((k for k in range(j, min(len(other), j + window)) if other[k] == name), None)
        if found is None:
            return None
        mapping.append(found)
        j = found + 1
    return mapping


def _envelope(traces: list, rows: list[list[float]], pick) -> tuple[list[list[float]], float] | None:
    """Coefficients at each candidate peak moment of the traces' aligned timelines (None if not aligned)."""
    timelines = [t.timeline for t in traces]
    if not all(timelines):
        return None
    reference = min(timelines, key=len)
    names = [_op(event[2]) for event in reference]
    series = []
    for timeline in timelines:
        mapping = _align(names, [_op(event[2]) for event in timeline])
        if mapping is None:
            return None
        series.append([pick(timeline[k][0], timeline[k][1]) for k in mapping])
    envelope = []
    for moment in _candidates(series):
        coef, _ = solve(rows, [s[moment] for s in series])
        envelope.append(coef)
    worst = 0.0
    for row, trace in zip(rows, traces, strict=True):
        actual = max(pick(a, g) for a, g, *_ in trace.timeline)
        predicted = max(_dot(row, c) for c in envelope)
        worst = max(worst, abs(predicted - actual) / max(actual, 1))
    return envelope, worst


def _fit_traces(traces: list) -> tuple[list[float], list[float], float]:
    rows = [basis(t.point.batch, t.point.tokens, t.point.rank) for t in traces]
    peak, res_p = solve(rows, [t.peak for t in traces])
    acts, res_a = solve(rows, [t.activations for t in traces])
    return peak, acts, max(res_p, res_a)


def _calibration(kind: str, source: str) -> tuple[tuple[int, ...], tuple[int, int]]:
    plan = CALIBRATION[(kind, source)]
    return plan["tokens"], plan["ranks"]


def _phase_moments(
    traces: list, rows: list[list[float]], layers: int, pick
) -> list[list[list[float]]] | None:
    """Per phase (`_phase_series`), the coefficients at each candidate peak moment of the traces' aligned
    timelines; None when the timelines do not line up."""
    timelines = [t.timeline for t in traces]
    if not all(timelines):
        return None
    first = min(range(len(traces)), key=lambda i: len(timelines[i]))
    reference = timelines[first]
    start = traces[first].backward_start
    start = len(reference) if start is None else start
    final = max(traces[first].gradients, 1)
    shares = [event[1] / final for event in reference]
    names = [_op(event[2]) for event in reference]
    series = []
    for timeline in timelines:
        mapping = _align(names, [_op(event[2]) for event in timeline])
        if mapping is None:
            return None
        series.append([pick(timeline[k][0], timeline[k][1]) for k in mapping])
    backward = range(start, len(reference))
    members = [
        list(range(start)),
        [i for i in backward if shares[i] <= 1 / layers + 1e-9],
        [i for i in backward if shares[i] >= (layers - 1) / layers - 1e-9],
    ]
    phases = []
    for indices in members:
        if not indices:
            return None
        chosen = _candidates([[s[i] for i in indices] for s in series])
        phases.append([solve(rows, [s[indices[m]] for s in series])[0] for m in chosen])
    return phases


def _depth_moments(traces: list[list], rows: list[list[float]], pick) -> tuple[list, float] | None:
    """[1-layer phases, 2-layer phases] of moment coefficients (`Fit.evaluate`), and the worst relative error
    of the predicted peak on the traces; None when some timelines do not line up."""
    found = [_phase_moments(t, rows, layers, pick) for t, layers in zip(traces, (1, 2), strict=True)]
    if any(f is None for f in found):
        return None
    worst = 0.0
    for extra, group in enumerate(traces):
        for row, trace in zip(rows, group, strict=True):
            actual = max((pick(a, g) for a, g, *_ in trace.timeline or []), default=0)
            predicted = _moments_max(row, found, extra)
            worst = max(worst, abs(predicted - actual) / max(actual, 1))
    return found, worst


def _moments_max(phi: list[float], moments: list, extra: int) -> float:
    """The highest phase value at depth 1 + `extra`: each phase's 1- and 2-layer maxima over its moments,
    extrapolated linearly in depth."""
    best = float("-inf")
    for one, two in zip(*moments, strict=True):
        v1 = max(_dot(phi, c) for c in one)
        v2 = max(_dot(phi, c) for c in two)
        best = max(best, v1 + extra * (v2 - v1))
    return best


#: shapes on which `prune_moments` keeps every moment that is ever the highest of its phase
PRUNE_GRID = {
    "batch": (1, 2, 4, 8, 16, 32, 64, 128),
    "tokens": tuple(2**k for k in range(5, 18)),  # 32 .. 131,072
    "rank": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
}


def prune_moments(moments: list) -> list:
    """The moments of each phase (`Fit.peak_moments` layout) that are the phase's highest at some shape of
    `PRUNE_GRID`; the others never decide a prediction there (most candidates are near-copies of one moment at
    a neighbouring allocation). Coefficients are kept to 10 significant digits."""
    import numpy as np

    grid = np.array(
        [
            basis(b, t, r)
            for b in PRUNE_GRID["batch"]
            for t in PRUNE_GRID["tokens"]
            for r in PRUNE_GRID["rank"]
        ]
    )
    pruned = []
    for phases in moments:
        kept_phases = []
        for phase in phases:
            values = grid @ np.array(phase, dtype=np.float64).T  # shapes x moments
            top = values.max(axis=1, keepdims=True)
            winners = (values >= top - 1e-9 * np.maximum(np.abs(top), 1.0)).any(axis=0)
            kept_phases.append([[float(f"{c:.10g}") for c in phase[i]] for i in np.flatnonzero(winners)])
        pruned.append(kept_phases)
    return pruned


def calibrate_llm(spec: ArchSpec, regime: Regime, source: str) -> Fit:
    """Trace the LLM step at 1 and 2 decoder layers over the design and fit both."""
    from loratui.memory.probe import trace_llm

    tokens, ranks = _calibration("llm", source)
    device = "cpu" if source == "cpu" else "meta"
    points = design(ranks, tokens)
    traced = []
    for layers in (1, 2):
        with _single_thread():
            traced.append(trace_llm(spec.configs["model"], layers, regime, points, device))
    return fit_llm(traced[0], traced[1], source)


def fit_llm(one_layer: list, two_layers: list, source: str = "meta") -> Fit:
    """The `Fit` of an LLM step from its traces at 1 and 2 decoder layers (the same points, in order)."""
    traced = [one_layer, two_layers]
    rows = [basis(t.point.batch, t.point.tokens, t.point.rank) for t in one_layer]
    fits, envelopes = [], []
    for layers, traces in zip((1, 2), traced, strict=True):
        fits.append(_fit_traces(traces))
        envelopes.append(
            (
                _phase_fit(traces, rows, layers, lambda a, g: a + g),
                _phase_fit(traces, rows, layers, lambda a, g: a),
            )
        )
    (p1, a1, r1), (p2, a2, r2) = fits
    fit = Fit(p1, a1, _minus(p2, p1), _minus(a2, a1), max(r1, r2), source, 2 * len(rows))
    ((peak1, res_p1), (acts1, res_a1)), ((peak2, res_p2), (acts2, res_a2)) = envelopes
    fit.peak_envelope, fit.activations_envelope = peak1, acts1
    fit.peak_envelope_per_layer = [_minus(b, a) for a, b in zip(peak1, peak2, strict=True)]
    fit.activations_envelope_per_layer = [_minus(b, a) for a, b in zip(acts1, acts2, strict=True)]
    fit.residual = max(res_p1, res_a1, res_p2, res_a2)
    peak = _depth_moments(traced, rows, lambda a, g: a + g)
    acts = _depth_moments(traced, rows, lambda a, g: a)
    if peak is not None and acts is not None:
        fit.peak_moments, fit.activations_moments = prune_moments(peak[0]), prune_moments(acts[0])
        fit.residual = max(peak[1], acts[1])
    return fit


def _minus(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def calibrate_sd(spec: ArchSpec, regime: Regime, source: str, what: str = "unet") -> Fit:
    """Trace an SD part over the design: `unet` (training step), `text_training` (held by trained text
    encoders), `vae` / `text` (encoding without gradients, batch and tokens only)."""
    from loratui.memory import probe

    device = "cpu" if source == "cpu" else "meta"
    tokens, ranks = _calibration("sd", source)
    with _single_thread():
        if what == "unet":
            traces = probe.trace_sd_unet(spec.configs, regime, design(ranks, tokens), device)
        elif what == "text_training":
            points = [
                Point(1, 77, ranks[0]),
                Point(2, 77, ranks[0]),
                Point(1, 77, ranks[1]),
                Point(2, 77, ranks[1]),
            ]
            traces = probe.trace_sd_text_training(spec.configs, regime, points, device)
        else:
            t1, t2 = ENCODE_TOKENS[source] if what == "vae" else (77, 77)
            points = [Point(1, t1, 0), Point(2, t1, 0), Point(1, t2, 0), Point(2, t2, 0)]
            traces = probe.trace_sd_encode(spec.configs, regime.precision, points, what, device)
    if what != "unet":
        peak, acts, residual = _fit_reduced(traces, with_tokens=what == "vae")
        return Fit(peak, acts, residual=residual, source=source, traces=len(traces))
    peak, acts, residual = _fit_traces(traces)
    rows = [basis(t.point.batch, t.point.tokens, t.point.rank) for t in traces]
    total = _envelope(traces, rows, lambda a, g: a + g)
    alone = _envelope(traces, rows, lambda a, g: a)
    fit = Fit(peak, acts, residual=residual, source=source, traces=len(traces))
    if total is not None and alone is not None:
        fit.peak_envelope, fit.activations_envelope = total[0], alone[0]
        fit.residual = max(total[1], alone[1])
    return fit


def _fit_reduced(traces: list, *, with_tokens: bool) -> tuple[list[float], list[float], float]:
    """Fits for parts that only depend on batch (and tokens, or rank): unused coefficients stay zero."""
    cols = [0, 1, 2] if with_tokens else [0, 1, 5]
    rows = [[basis(t.point.batch, t.point.tokens, t.point.rank)[c] for c in cols] for t in traces]
    out = []
    worst = 0.0
    for values in ([t.peak for t in traces], [t.activations for t in traces]):
        coef, residual = solve(rows, values)
        full = [0.0] * N_COEF
        for c, v in zip(cols, coef, strict=True):
            full[c] = v
        out.append(full)
        worst = max(worst, residual)
    return out[0], out[1], worst


class _single_thread:
    """Small CPU kernels run fastest on one thread (and memory does not depend on the thread count)."""

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.saved)
