"""Writes tests/golden/model_configs.json: for every model config under configs/ and the
tests' tiny configs, digests of the variable shapes and the
effective settings of the built detector.

Run once on the code whose models are the reference (it was run on main before issue 16's
reshaping): `python tests/golden/make_model_golden.py`; for new configs only,
`python tests/golden/make_model_golden.py --add-missing` (old entries stay as recorded).
`tests/test_model_configs.py` checks that today's code builds the same models from the same
configs.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.model_config_cases import OUT, model_cases, model_record  # noqa: E402


def main() -> None:
    # `--add-missing`: keep every recorded entry as it is and record only the cases the file
    # lacks (new configs), instead of rewriting the whole reference on today's code
    add_missing = "--add-missing" in sys.argv[1:]
    out = {}
    if add_missing:
        with open(OUT) as f:
            out = json.load(f)
    for name, model_cfg in model_cases():
        if name not in out:
            out[name] = model_record(model_cfg)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(out)} models to {OUT}")


if __name__ == "__main__":
    main()
