"""The reference backend: numpy table look-ups, slow and obvious.

It is the oracle the tests hold every fast backend to. Each output byte is
``XOR_i mul(coeffs[j, i], src[i][b])``, with ``mul`` from a 256 x 256 table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ghostserve.codec import gf
from ghostserve.codec.backends import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def matmul(self, coeffs: np.ndarray, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> None:
        table = gf.mul_table()
        for j, out in enumerate(dst):
            acc = np.zeros(len(out), dtype=np.uint8)
            for i, shard in enumerate(src):
                acc ^= table[coeffs[j, i]][shard]
            out[:] = acc
