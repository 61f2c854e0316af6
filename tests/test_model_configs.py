"""Every model config (configs/*.py, teachers included, the factories' defaults and the tests'
tiny models) builds the same detector as before issue 16's reshaping. Reference:
tests/golden/model_configs.json, written by tests/golden/make_model_golden.py on main's code:
the variables' paths and shapes (sha256 digest, counts, the shapes outside the backbone) and
every setting of the built modules."""

from __future__ import annotations

import json

import pytest

from tests.model_config_cases import OUT, model_cases, model_record

with open(OUT) as _f:
    GOLDEN = json.load(_f)

# Settings whose place in the module tree moved since the golden file was written:
# golden name -> today's name.
RENAMED: dict[str, str] = {}

CASES = list(model_cases())


def test_every_recorded_model_is_still_a_case():
    assert sorted(name for name, _ in CASES) == sorted(GOLDEN)


@pytest.mark.parametrize("name,model_cfg", CASES, ids=[n for n, _ in CASES])
def test_config_builds_the_same_model(name, model_cfg):
    want, got = GOLDEN[name], model_record(model_cfg)
    assert got["head_shapes"] == want["head_shapes"]
    assert (got["num_leaves"], got["num_params"]) == (want["num_leaves"], want["num_params"])
    assert got["digest"] == want["digest"]
    settings = {RENAMED.get(k, k): v for k, v in want["settings"].items()}
    assert got["settings"] == settings
