"""The LLM fit's depth and length extrapolation (`loratui.memory.fit.fit_llm`) on steps whose memory is known.

The synthetic step has the structure of a QLoRA step with gradient checkpointing: each decoder layer keeps a
checkpoint of its input; while a layer runs, a fixed-size dequantised weight copy and the layer's activations
exist at different moments; backward recomputes each layer from the top while LoRA gradients accumulate. Which
moment is the peak switches with the shape (the weight copy for short rows, the activations for long ones),
the case where a fit through each phase's maximum ran high beyond the traced lengths.
"""

from __future__ import annotations

import pytest

from loratui.memory.fit import CALIBRATION, design, fit_llm
from loratui.memory.probe import Trace
from loratui.memory.regime import Point

CHECKPOINT = 2 * 3072  # bytes per token held per layer (a bf16 hidden state)
ACTIVATIONS = 40 * 3072  # bytes per token while a layer runs
WEIGHT_COPY = 600 * ACTIVATIONS  # a dequantised weight: the activations of 600 tokens
LORA = 3 * 3072 * 4 * 2  # gradient bytes per rank per layer


def _timeline(point: Point, layers: int) -> tuple[list[tuple[int, int, str]], int]:
    tokens, rank = point.batch * point.tokens, point.rank
    events = []
    for layer in range(layers):
        held = layer * CHECKPOINT * tokens
        events += [(held + WEIGHT_COPY, 0, "_to_copy"), (held + ACTIVATIONS * tokens, 0, "mm")]
    start = len(events)
    for layer in reversed(range(layers)):
        held, grads = layer * CHECKPOINT * tokens, (layers - 1 - layer) * LORA * rank
        events += [
            (held + WEIGHT_COPY, grads, "_to_copy"),
            (held + ACTIVATIONS * tokens, grads, "mm"),
            (held, grads + LORA * rank, "add"),
        ]
    return events, start


def _trace(point: Point, layers: int) -> Trace:
    events, start = _timeline(point, layers)
    peak = max(a + g for a, g, _ in events)
    return Trace(point, peak, max(a for a, _, _ in events), layers * LORA * point.rank, 0, events, start)


def _true_peak(batch: int, tokens: int, rank: int, layers: int) -> int:
    return _trace(Point(batch, tokens, rank), layers).peak


@pytest.fixture(scope="module")
def fit():
    plan = CALIBRATION[("llm", "meta")]
    points = design(plan["ranks"], plan["tokens"])
    return fit_llm([_trace(p, 1) for p in points], [_trace(p, 2) for p in points])


@pytest.mark.parametrize(
    ("batch", "tokens", "rank", "layers"),
    [(2, 4096, 64, 28), (1, 512, 8, 32), (4, 2048, 16, 80), (1, 128, 8, 16), (8, 8192, 128, 40)],
)
def test_the_peak_extrapolates_exactly_in_length_and_depth(fit, batch, tokens, rank, layers) -> None:
    predicted, _ = fit.evaluate(batch, tokens, rank, layers)
    assert predicted == pytest.approx(_true_peak(batch, tokens, rank, layers), rel=1e-6)
    assert fit.residual < 1e-6


def test_the_fitted_moments_are_kept_compact(fit) -> None:
    kept = [len(phase) for phases in fit.peak_moments for phase in phases]
    assert len(kept) == 6 and max(kept) <= 4  # forward / top / bottom phase, at 1 and 2 layers
