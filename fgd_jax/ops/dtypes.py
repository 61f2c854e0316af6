"""The floating dtype ops, heads and losses compute in.

Outside `jax_enable_x64` this is always float32 (also for bfloat16 / float16 inputs: mixed
precision keeps losses and box arithmetic in float32). Under x64 it is float64 when any input is
float64, so a float64 run stays float64 end to end.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def float_dtype(*xs: Any) -> np.dtype:
    """`float32`, or `float64` if x64 is on and any of `xs` (arrays or dtypes) is float64.

    Integer, bool and narrower float inputs count as float32; Python scalars are ignored."""
    dt = np.dtype(jnp.float32)
    for x in xs:
        d = x if isinstance(x, np.dtype | type) else getattr(x, "dtype", None)
        if d is not None and np.dtype(d) == np.float64:
            dt = np.dtype(np.float64)
    return np.dtype(jax.dtypes.canonicalize_dtype(dt))
