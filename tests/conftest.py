"""Shared pytest setup: JAX on CPU unless a GPU test asks otherwise, float32 matmuls exact."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare fp32 against torch: use full-precision matmuls/convs.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    has_gpu = (
        any(d.platform == "gpu" for d in jax.devices())
        if os.environ.get("JAX_PLATFORMS") != "cpu"
        else False
    )
    skip_gpu = pytest.mark.skip(reason="needs a GPU (run on a GPU host with JAX_PLATFORMS unset)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def tree_digest(root: str) -> str:
    """sha256 over every file (relative path + bytes) under `root`."""
    import hashlib

    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="session")
def fgd_run(tmp_path_factory):
    """A 40-step tiny FGD run (RetinaNet R18, random R18 teacher) on the synthetic set,
    shared by the training, eval and export tests: (cfg, workdir, final eval metrics)."""
    from fgd_jax.trainer import train
    from tests._tiny import make_teacher, tiny_config

    tmp = tmp_path_factory.mktemp("fgd_run")
    # 40 steps: by then even the 1x1 P7 level's attention (mask) loss, whose weight is tiny,
    # has clearly decreased (at 20 steps it is still within noise of its start)
    cfg = tiny_config(str(tmp / "data"), "fgd", steps=40)
    cfg.train.ckpt_every = 20
    make_teacher(cfg, str(tmp / "teacher"))
    # Fingerprint of the teacher checkpoint's files before training (test_train checks that
    # training never writes to it).
    (tmp / "teacher.sha256").write_text(tree_digest(str(tmp / "teacher")))
    workdir = str(tmp / "work")
    metrics = train(cfg, workdir)
    return cfg, workdir, metrics
