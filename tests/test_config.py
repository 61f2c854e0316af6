"""fgd_jax.config: factories, file loading and dotted overrides."""

import pytest

from fgd_jax import config as C


def _write(tmp_path, body):
    p = tmp_path / "cfg.py"
    p.write_text(body)
    return p


CFG = """
from fgd_jax import config as C
def get_config():
    cfg = C.ConfigDict()
    cfg.model = C.retinanet_model(depth=50)
    cfg.train = C.schedule_2x()
    return cfg
"""


def test_load_and_override(tmp_path):
    cfg = C.load_config(
        _write(tmp_path, CFG),
        [
            "train.batch_size=8",
            "model.backbone.depth=101",
            "train.base_lr=1",
            "model.neck.add_extra_convs=False",
        ],
    )
    assert cfg.train.batch_size == 8
    assert cfg.model.backbone.depth == 101
    assert cfg.train.base_lr == 1.0 and isinstance(cfg.train.base_lr, float)
    assert cfg.model.neck.add_extra_convs is False


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown config key 'train.batch_sise'.*train.batch_size"
    ):
        C.load_config(_write(tmp_path, CFG), ["train.batch_sise=8"])


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"train.batch_size.*expects int"):
        C.load_config(_write(tmp_path, CFG), ["train.batch_size='eight'"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.backbone.norm_eval=Ture", "expects bool"),  # a typo is not a string
        ("model.backbone.style=True", "expects str"),
        ("model.backbone=3", "group of keys"),  # would drop the whole subtree
        ("model.backbone.out_indices=('a',)", "tuple of int"),
    ],
)
def test_wrong_types_that_used_to_pass(tmp_path, override, expected):
    with pytest.raises(TypeError, match=expected):
        C.load_config(_write(tmp_path, CFG), [override])


def test_bool_or_str_union_and_tuple_coercion(tmp_path):
    cfg = C.load_config(
        _write(tmp_path, CFG),
        ["model.neck.add_extra_convs='on_output'", "model.backbone.out_indices=[1, 2, 3]"],
    )
    assert cfg.model.neck.add_extra_convs == "on_output"
    assert cfg.model.backbone.out_indices == (1, 2, 3)


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        C.load_config(tmp_path / "nope.py")
    with pytest.raises(ValueError, match="get_config"):
        C.load_config(_write(tmp_path, "x = 1\n"))


def test_backbone_channels():
    assert C.backbone_out_channels(C.resnet_backbone(depth=101, groups=64, base_width=4)) == (
        256,
        512,
        1024,
        2048,
    )
    assert C.backbone_out_channels(C.resnet_backbone(depth=18)) == (64, 128, 256, 512)
    # every BasicBlock depth (10 included) feeds the FPN 64..512; an unknown depth is refused
    # instead of defaulting to the bottleneck widths
    assert C.retinanet_model(depth=10).neck.in_channels == (64, 128, 256, 512)
    with pytest.raises(ValueError, match="backbone.depth=26"):
        C.backbone_out_channels(C.resnet_backbone(depth=26))


def test_demo_inherit_only_zeroes_the_fgd_weights_and_copies():
    from fgd_jax.demo_runs import CONFIG, inherit_only

    cfg = C.load_config(f"{CONFIG}:fgd")
    ablated = inherit_only(cfg)
    for key in ("alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd"):
        assert ablated.distill[key] == 0.0 and cfg.distill[key] > 0  # the input is untouched
    assert ablated.distill.init_student and ablated.teacher.ckpt == cfg.teacher.ckpt
    assert ablated.train.to_dict() == cfg.train.to_dict()
    cfg.distill.init_student = False
    with pytest.raises(ValueError, match="inheriting"):
        inherit_only(cfg)
