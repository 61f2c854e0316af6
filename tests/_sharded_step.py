"""Run tiny FGD train steps on a mesh of N devices and on 1 device; print their differences
(`_compare.tree_difference`) and the 1-device run's per-step gradient norms and losses.

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
from fgd_jax.models import init_module
from tests._compare import tree_difference  # noqa: E402
from tests._tiny import STABLE, STABLE_STEPS, tiny_config  # noqa: E402

# The warm-up's 2 steps (lr 1e-6, then 5e-4): one real update, whose float32 noise is ~1e-5
# of the tree's scale. Not more: with the paper's FGD weights on a random teacher the loss is
# sharp (13.1 -> 7.7 in the third step, at lr 1e-3) and the third step's gradient, taken where
# the two runs differ by that noise, already differs by 1e-3 of the tree's scale (measured).
STEPS = 2


def main(data_root: str) -> None:
    # lr 2e-4, below STABLE's 1e-3: the one update's float32 noise is proportional to it, and
    # on the student's conv1 kernel (its gradient sums 8x32x32 positions of noise images with
    # much cancellation) it measured 4.6e-5 (default ISA) and 1.3e-4 (--xla_cpu_max_isa=SSE4_2)
    # of the tree's scale at 1e-3; the losses and BN statistics (6e-7) are the finer check.
    cfg = tiny_config(
        data_root, "fgd", steps=STABLE_STEPS, **dict(STABLE, **{"train.base_lr": 2e-4})
    )
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
    teacher = init_module(exp.teacher, jax.random.PRNGKey(1), jnp.asarray(batch["image"][:1]))

    results = {}
    for name, devices in (("mesh8", jax.devices()), ("mesh1", jax.devices()[:1])):
        mesh = Mesh(np.array(devices), ("data",))
        state, tx, schedule = init_train_state(exp, batch, 10, teacher_vars=teacher)
        state = parallel.replicate(state, mesh)
        tvars = parallel.replicate(teacher, mesh)
        step = jax.jit(make_train_step(exp, tx, schedule), donate_argnums=(0,))
        history = []
        for _ in range(STEPS):
            state, metrics = step(state, tvars, parallel.host_batch_to_global(batch, mesh))
            history.append(parallel.fetch(metrics))
        results[name] = (
            parallel.fetch(state.params),
            parallel.fetch(state.model_state),
            history,
        )
    (p8, s8, h8), (p1, s1, h1) = results["mesh8"], results["mesh1"]

    def losses(history):
        return [{k: v for k, v in m.items() if k.startswith("loss")} for m in history]

    out = {
        "devices": len(jax.devices()),
        "params": tree_difference(p8, p1),
        "batch_stats": tree_difference(s8, s1),
        "losses": tree_difference(losses(h8), losses(h1)),
        "grad_norm": [float(m["grad_norm"]) for m in h1],
        "loss": [float(m["loss"]) for m in h1],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
