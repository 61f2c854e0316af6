"""Toy training used by the parallel / multi-process / checkpoint tests.

Run as a script in a subprocess (device count and distributed init must happen before JAX
starts), or import `run_training` for an in-process reference run.

  python tests/_mp_worker.py devices8 --out OUT.npz
  python tests/_mp_worker.py multiprocess --process-id I --num-processes 2 --port P --out DIR
  python tests/_mp_worker.py ckpt_train --workdir DIR --steps N --out OUT.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GLOBAL_BATCH = 8


def _setup_jax():
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    return jax


def toy_model():
    import flax.linen as nn

    class Toy(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
            x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), name="conv2")(x))
            return nn.Dense(2, name="fc")(x.mean(axis=(1, 2)))

    return Toy()


def toy_train_cfg():
    from fgd_jax import config as cfglib

    cfg = cfglib.schedule_2x(batch_size=GLOBAL_BATCH, base_lr=0.2)
    cfg.warmup_iters = 3
    cfg.decay_epochs = (2,)
    cfg.grad_clip_norm = 1.0
    return cfg


def global_batch(step: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed * 100_003 + step)
    return {
        "image": rng.normal(size=(GLOBAL_BATCH, 8, 8, 3)).astype(np.float32),
        "target": rng.normal(size=(GLOBAL_BATCH, 2)).astype(np.float32),
    }


def build(mesh):
    """-> (init_state(), jitted train step) on `mesh`: params replicated, batch sharded."""
    import jax
    import jax.numpy as jnp
    import optax

    from fgd_jax import optim, parallel

    model = toy_model()
    x0 = jnp.zeros((1, 8, 8, 3), jnp.float32)
    params_shape = jax.eval_shape(model.init, jax.random.key(0), x0)["params"]
    tx = optim.make_optimizer(toy_train_cfg(), steps_per_epoch=4, params=params_shape)

    def init():
        params = model.init(jax.random.key(0), x0)["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def train_step(state, batch):
        def loss_fn(p):
            pred = model.apply({"params": p}, batch["image"])
            return jnp.mean(jnp.square(pred - batch["target"]))

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
    init_j = jax.jit(init, out_shardings=rep)
    step_j = jax.jit(
        train_step, in_shardings=(rep, dat), out_shardings=(rep, rep), donate_argnums=0
    )
    return init_j, step_j


def local_slice(batch: dict) -> dict:
    import jax

    n, i = jax.process_count(), jax.process_index()
    b = GLOBAL_BATCH // n
    return {k: v[i * b : (i + 1) * b] for k, v in batch.items()}


def run_training(mesh, steps: int, seed: int = 0):
    """-> (losses [steps], final params as a host tree)."""
    import numpy as np

    from fgd_jax import parallel

    init_j, step_j = build(mesh)
    state = init_j()
    losses = []
    for s in range(steps):
        batch = parallel.host_batch_to_global(local_slice(global_batch(s, seed)), mesh)
        state, metrics = step_j(state, batch)
        losses.append(parallel.fetch(metrics)["loss"])
    return np.asarray(losses), parallel.fetch(state["params"])


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, prefix + k + "/"))
        else:
            out[prefix + k] = v
    return out


# ----------------------------------------------------------------------------------- modes
def mode_devices8(args):
    jax = _setup_jax()
    import numpy as np

    from fgd_jax import parallel

    assert jax.device_count() == 8, jax.devices()
    mesh8 = parallel.make_mesh()
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    # The sharding really is what we claim: batch split 8 ways, params replicated.
    batch = parallel.host_batch_to_global(global_batch(0), mesh8)
    assert len(batch["image"].sharding.device_set) == 8
    assert batch["image"].addressable_shards[0].data.shape == (1, 8, 8, 3)
    init_j, _ = build(mesh8)
    st = init_j()
    assert st["params"]["fc"]["kernel"].sharding.is_fully_replicated
    l8, p8 = run_training(mesh8, args.steps)
    l1, p1 = run_training(mesh1, args.steps)
    np.savez(
        args.out,
        losses8=l8,
        losses1=l1,
        **{"p8/" + k: v for k, v in flat(p8).items()},
        **{"p1/" + k: v for k, v in flat(p1).items()},
    )


def mode_multiprocess(args):
    jax = _setup_jax()
    import numpy as np

    from fgd_jax import checkpoint, parallel

    assert parallel.maybe_initialize_distributed(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    assert jax.process_count() == args.num_processes
    mesh = parallel.make_mesh()
    losses, params = run_training(mesh, args.steps)
    # Checkpoint from several processes: state + each process's own data state.
    init_j, _ = build(mesh)
    state = init_j()
    mngr = checkpoint.CheckpointManager(os.path.join(args.out, "ckpt"), keep=2)
    own = {"process": jax.process_index(), "pos": 10 + jax.process_index()}
    mngr.save(3, state, data_state=own)
    mngr.wait()
    restored, ds, _ = mngr.restore(target=state)
    mngr.close()
    assert ds == own, ds
    same = all(
        np.array_equal(parallel.fetch(a), parallel.fetch(b))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
    )
    assert same
    np.savez(
        os.path.join(args.out, f"process_{args.process_id}.npz"),
        losses=losses,
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
        **{"p/" + k: v for k, v in flat(params).items()},
    )
    parallel.sync("done")


def mode_ckpt_train(args):
    """A resumable toy loop: checkpoints every `ckpt_every` steps, resumes from the latest."""
    _setup_jax()
    import numpy as np

    from fgd_jax import checkpoint, parallel

    mesh = parallel.make_mesh()
    init_j, step_j = build(mesh)
    state = init_j()
    start = 0
    mngr = checkpoint.CheckpointManager(args.workdir, keep=args.keep)
    if mngr.latest_step() is not None:
        state, data_state, _ = mngr.restore(target=state)
        start = data_state["next_step"]
        print(f"resumed at {start}", flush=True)
    for s in range(start, args.steps):
        batch = parallel.host_batch_to_global(global_batch(s), mesh)
        state, _ = step_j(state, batch)
        if (s + 1) % args.ckpt_every == 0:
            mngr.save(s + 1, state, data_state={"next_step": s + 1})
            print(f"saved {s + 1}", flush=True)
        time.sleep(args.sleep)
    mngr.close()
    np.savez(args.out, **flat(parallel.fetch(state["params"])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["devices8", "multiprocess", "ckpt_train"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--ckpt-every", type=int, default=1)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--sleep", type=float, default=0.0)
    args = ap.parse_args()
    {"devices8": mode_devices8, "multiprocess": mode_multiprocess, "ckpt_train": mode_ckpt_train}[
        args.mode
    ](args)


if __name__ == "__main__":
    main()
