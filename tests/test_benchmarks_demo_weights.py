"""benchmarks.demo_weights: the weight settings it compares and its table (the training runs
themselves are the demo's code paths, tested in test_demo.py)."""

import os

from benchmarks import demo_weights as W
from fgd_jax.config import fgd_distill


def _diff(a, b):
    return [x - y for x, y in zip(a, b, strict=True)]


def test_settings_start_from_the_papers_weights_and_the_demo_uses_one_of_them():
    from fgd_jax.config import load_config

    paper = fgd_distill()
    keys = ("alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd")
    assert W.SETTINGS["paper"] == tuple(paper[k] for k in keys)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo = load_config(os.path.join(repo, "configs", "shapes_demo.py")).distill
    demo_weights = tuple(demo[k] for k in keys)
    matches = [n for n, w in W.SETTINGS.items() if max(map(abs, _diff(w, demo_weights))) < 1e-12]
    assert matches == ["focal x0.01"]


def test_report_counts_wins_over_inheriting_per_seed_and_averages():
    settings = {"a": (1.0, 2.0, 3.0, 4.0), "b": (0.0, 0.0, 0.0, 1e-6)}
    per_seed = {
        0: {"teacher": 20.0, "baseline": 8.0, "inheriting only": 15.0, "a": 16.0, "b": 14.0},
        1: {"teacher": 22.0, "baseline": 9.0, "inheriting only": 17.0, "a": 17.0, "b": 20.0},
    }
    text = W.report(per_seed, settings, minutes=3.0)
    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert rows["a"].endswith("| 16.0 | 17.0 | 16.5 | 1 of 2 |")  # a tie is not a win
    assert rows["b"].endswith("| 14.0 | 20.0 | 17.0 | 1 of 2 |")
    assert "| 1e-06 |" not in rows["b"] and "0, 0, 0, 1e-06" in rows["b"]
    assert rows["teacher"].endswith("| 20.0 | 22.0 | 21.0 | - |")
    assert "seed 0 | seed 1 | mean" in text


def test_run_seed_reuses_only_runs_made_with_the_same_settings(tmp_path, monkeypatch):
    # train is replaced by a recorder (the real runs are the demo's, tested in test_demo.py):
    # what is checked is which runs a rerun trains again.
    import fgd_jax.experiment
    import fgd_jax.trainer
    from fgd_jax import checkpoint

    trained = []

    def fake_train(cfg, path):
        trained.append(os.path.basename(path))
        return {"AP": 0.01 * len(trained)}

    monkeypatch.setattr(fgd_jax.trainer, "train", fake_train)
    monkeypatch.setattr(fgd_jax.experiment, "load_model", lambda path: ({}, None))
    monkeypatch.setattr(
        checkpoint, "save_variables", lambda path, *a, **k: os.makedirs(f"{path}/variables")
    )
    settings = {"x": (1e-5, 5e-6, 5e-4, 5e-6), "y": (0.0, 0.0, 0.0, 5e-6)}
    first = W.run_seed(0, str(tmp_path), str(tmp_path / "data"), settings)
    assert trained == ["teacher", "baseline", "inherit", "fgd0", "fgd1"]
    assert first["teacher"] == 1.0 and first["y"] == 5.0
    trained.clear()
    assert W.run_seed(0, str(tmp_path), str(tmp_path / "data"), settings) == first
    assert trained == []  # everything reused, same APs
    settings["y"] = (0.0, 0.0, 0.0, 1e-6)  # a changed weight: only that run again
    again = W.run_seed(0, str(tmp_path), str(tmp_path / "data"), settings)
    assert trained == ["fgd1"] and again["y"] == 1.0 and again["x"] == first["x"]
    trained.clear()
    W.run_seed(1, str(tmp_path), str(tmp_path / "data"), settings)  # another seed: its own runs
    assert trained == ["teacher", "baseline", "inherit", "fgd0", "fgd1"]
