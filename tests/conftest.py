"""Shared pytest setup: JAX on CPU unless a GPU test asks otherwise, float32 matmuls exact."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare fp32 against torch: use full-precision matmuls/convs.
jax.config.update("jax_default_matmul_precision", "highest")


# Seconds the slowest tests took in a whole-suite run (`-n 2` on 2 cores; setup included,
# e.g. a module fixture's first user). Only the order pytest-xdist hands out the work
# depends on them (below); refresh with `--durations=40` when they drift.
SLOW_TESTS_S = {
    "test_demo.py::test_demo_end_to_end": 156,
    "test_train_sharded.py::test_8_devices_equal_1_device": 113,
    "test_train_multihost.py::test_two_processes_agree_with_one": 93,
    "test_fcos.py::test_fgd_student_variant_trains_with_sgd_and_every_loss_part_falls": 78,
    "test_train.py::test_sigusr1_saves_a_checkpoint_and_stops_then_resumes": 68,
    "test_train.py::test_sigkill_then_resume_equals_uninterrupted": 67,
    "test_mask_rcnn.py::test_fgd_training_decreases_every_loss_part_and_evaluates_segm": 67,
    "test_notebooks.py::test_load_train_state": 66,  # builds fgd_run
    "test_distiller.py::test_fgd_weight_zero_reproduces_the_student_loss": 40,
    "test_distiller.py::test_bfloat16_train_step_keeps_float32_state": 61,
    "test_distiller.py::test_bfloat16_compute_matches_float32": 44,
    "test_notebooks.py::test_fgd_anatomy_notebook": 58,
    "test_distiller.py::test_teacher_gets_no_gradient_and_fgd_params_do": 43,
    "test_convert_distiller.py::test_distiller_checkpoint_round_trip": 40,
    "test_retinanet.py::test_overfits_one_small_batch": 39,
    "test_convert_cli.py::test_convert_then_eval": 37,
    "test_eval_export.py::test_eval_on_8_devices_equals_1_device": 34,
    "test_float64.py::test_detector_runs_in_float64[faster_rcnn]": 34,
    "test_checkpoint.py::test_sigkill_mid_training_then_resume_is_exact": 31,
    "test_multiprocess.py::test_two_processes_match_single_process": 31,
    "test_fcos.py::test_tiny_fcos_overfits_one_batch": 31,
    "test_train_detectors.py::test_gfl_trains_under_fgd_and_every_loss_part_falls": 30,
    "test_distiller.py::test_inherit_copies_exactly_the_non_backbone_leaves": 30,
    "test_faster_rcnn.py::test_overfits_one_small_batch": 30,
    "test_eval_export.py::test_export_reproduces_the_student_and_round_trips_through_torch": 28,
    "test_train_step_memory.py::test_step_result_equals_the_former_formulation": 25,
    "test_data_pipeline.py::test_loader_workers_leak_no_shared_memory": 21,
}
OTHER_TEST_S = 1.0  # the ~550 others: about 8 minutes together


def _unit(item) -> str:
    """The xdist work unit of a test: its module, except that every test of the session
    fixture `fgd_run` (a 40-step training run, ~65 s) shares one unit, so that one worker
    builds it once (under plain `--dist load` each worker built its own)."""
    if "fgd_run" in getattr(item, "fixturenames", ()):
        return "fgd_run"
    return item.nodeid.split("::")[0].replace("/", "_")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's: it turns the default "no" into "load"
def pytest_cmdline_main(config):
    """`-n N` without `--dist`: `--dist loadgroup` with the units and order below (an explicit
    `--dist` is kept)."""
    opt = config.option
    if getattr(opt, "numprocesses", None) and getattr(opt, "dist", None) == "no":
        opt.dist = "loadgroup"
        opt.loadscopereorder = False  # keep the heaviest-first order of the collection


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
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
    if hasattr(config, "workerinput") and getattr(config.option, "dist", "no") == "loadgroup":
        _schedule_for_xdist(items)


def _schedule_for_xdist(items) -> None:
    """Work units for `--dist loadgroup` (see `pytest_cmdline_main`): one per module (its module
    fixtures are built once) and one for `fgd_run`'s tests; handed out heaviest first
    (longest-processing-time order, `--no-loadscope-reorder` keeps it), so the last units
    to finish are short ones and the slowest tests never queue behind each other at the
    end."""
    weight: dict[str, float] = {}
    for item in items:
        unit = _unit(item)
        item.add_marker(pytest.mark.xdist_group(unit))
        key = item.nodeid.split("/", 1)[-1]
        weight[unit] = weight.get(unit, 0.0) + SLOW_TESTS_S.get(key, OTHER_TEST_S)
    first = {}
    for i, item in enumerate(items):
        first.setdefault(_unit(item), i)
    items.sort(key=lambda it: (-weight[_unit(it)], first[_unit(it)]))


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
