"""Run one tiny FGD train step on a mesh of N devices and on 1 device; print max differences.

Started by tests/test_train_sharded.py with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from fgd_jax import parallel  # noqa: E402
from fgd_jax.experiment import Experiment, dummy_batch, init_train_state, make_train_step  # noqa: E402
from tests._tiny import tiny_config  # noqa: E402


def main(data_root: str) -> None:
    cfg = tiny_config(data_root, "fgd", steps=4)
    cfg.train.batch_size = 8
    exp = Experiment(cfg)
    rng = np.random.default_rng(0)
    batch = dummy_batch(cfg.data, 8)
    batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
    for i in range(8):  # a different number of boxes per image, padding included
        n = 1 + i % 4
        xy = rng.uniform(0, 40, (n, 2))
        wh = rng.uniform(8, 24, (n, 2))
        batch["boxes"][i, :n] = np.concatenate([xy, xy + wh], 1)
        batch["labels"][i, :n] = rng.integers(0, 6, n)
        batch["valid"][i, :n] = True
    teacher = exp.teacher.init(jax.random.PRNGKey(1), jnp.asarray(batch["image"][:1]))

    results = {}
    for name, devices in (("mesh8", jax.devices()), ("mesh1", jax.devices()[:1])):
        mesh = Mesh(np.array(devices), ("data",))
        state, tx, schedule = init_train_state(exp, batch, 10, teacher_vars=teacher)
        state = parallel.replicate(state, mesh)
        tvars = parallel.replicate(teacher, mesh)
        step = jax.jit(make_train_step(exp, tx, schedule), donate_argnums=(0,))
        for _ in range(2):
            state, metrics = step(state, tvars, parallel.host_batch_to_global(batch, mesh))
        results[name] = (
            parallel.fetch(state.params),
            parallel.fetch(state.model_state),
            parallel.fetch(metrics),
        )
    (p8, s8, m8), (p1, s1, m1) = results["mesh8"], results["mesh1"]

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))

    out = {
        "devices": len(jax.devices()),
        "params": max(jax.tree.leaves(jax.tree.map(rel, p8, p1))),
        "batch_stats": max(jax.tree.leaves(jax.tree.map(rel, s8, s1))),
        "losses": {k: rel(m8[k], m1[k]) for k in m1 if k.startswith("loss")},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
