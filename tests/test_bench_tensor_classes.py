"""benchmarks/bench_tensor_classes.py: the class split of the benchmark set and the arithmetic of its summary.

The timings themselves are not tested (performance is shown by benchmarks, not timed tests); what is tested is
that the classes are exactly the benchmark set's tensors and that the summary's numbers follow from the rows.
"""

import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_fused_cpu import bert_shapes
from bench_tensor_classes import EMBEDDING, WHOLE, bert_classes, summarise


@pytest.mark.parametrize("layers,hidden", [(1, 64), (9, 512), (24, 1024)])
def test_classes_are_the_benchmark_set(layers, hidden):
    classes = bert_classes(layers, hidden)
    union = Counter(s for shapes in classes.values() for s in shapes)
    assert union == Counter(bert_shapes(layers, hidden))
    assert classes[EMBEDDING] == [(30522, hidden)]


def _rows(adamw, **ratios):
    """Rows as time_rounds returns them: per-round best steps, AdamW's and each backend's at a fixed ratio."""
    rows = {"torch_adamw_fused": {"round_min_ms": list(adamw)}}
    for b, r in ratios.items():
        rows[b] = {"round_min_ms": [a * x for a, x in zip(adamw, r)]}
    return rows


def test_summary_arithmetic():
    # Two classes: the embedding (AdamW 10 ms, LAMB 1.6x) and the rest (AdamW 30 ms, LAMB 1.2x), over 3 rounds
    # whose per-round ratios have the given medians; timm is 7.5x AdamW on the whole set.
    classes = {
        EMBEDDING: _rows([10, 11, 9], lamb_fused=[1.6, 1.5, 1.7]),
        "rest": _rows([30, 29, 31], lamb_fused=[1.2, 1.1, 1.3]),
        WHOLE: _rows([40, 40, 40], lamb_fused=[1.3, 1.3, 1.3], timm_lamb=[7.5, 7.0, 8.0]),
    }
    s = summarise(classes, ["lamb_fused"])
    assert s["share_of_adamw"] == pytest.approx({EMBEDDING: 0.25, "rest": 0.75})
    assert s["over_adamw"][EMBEDDING]["lamb_fused"] == pytest.approx((1.6, 1.5, 1.7))
    assert s["predicted_default"] == pytest.approx(0.25 * 1.6 + 0.75 * 1.2)
    assert s["asked_over_adamw"] == pytest.approx(7.5 / 6)
    # 0.25 * 1.6 + 0.75 * x = 1.25  ->  x = (1.25 - 0.4) / 0.75
    assert s["rest_must_average"] == pytest.approx((1.25 - 0.4) / 0.75)
