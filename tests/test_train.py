"""Training runs: tiny configurations of every kind train, validate, checkpoint, resume and save safely."""
import json

import numpy as np
import pytest
import torch

from deepmosaic.models.train import RECIPES, TrainConfig, train
from deepmosaic.models.weights_io import load_model
from deepmosaic.pipeline.config import from_mapping
from deepmosaic.pipeline.errors import ConfigError

TINY = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 4, "val_size": 6, "pool_size": 6, "threads": 1,
        "model": {"depth": 2, "base_channels": 4}}


@pytest.mark.parametrize("kind", sorted(set(RECIPES) - {"morphology"}))  # dense maps; morphology: its own test
def test_tiny_training_run_saves_a_loadable_model_with_card(kind, tmp_path):
    card = train({"kind": kind, **TINY}, str(tmp_path), progress=False)
    assert card["training_set"]["kind"] == RECIPES[kind].data_kind
    assert card["extra"]["epochs_run"] == 2 and len(card["extra"]["history"]) == 2
    assert RECIPES[kind].score_name in card["metrics"]
    on_disk = json.loads((tmp_path / f"{kind}.json").read_text())
    assert on_disk["weights"]["sha256"] == card["weights"]["sha256"]
    model = load_model(tmp_path / kind)
    recipe = RECIPES[kind](None)
    x, _ = recipe.inputs_targets(recipe.batch("test", 1, 2))
    with torch.no_grad():
        out = model(x)
    first = out["heatmap"] if isinstance(out, dict) else getattr(out, "logits", out)  # prob_unet: a named tuple
    assert torch.isfinite(first).all() and first.shape[-2:] == x.shape[-2:]


def test_resume_continues_from_the_checkpoint(tmp_path):
    cfg = {"kind": "clumps", **TINY}
    train(cfg, str(tmp_path), progress=False)
    card = train({**cfg, "epochs": 3}, str(tmp_path), resume=True, progress=False)
    hist = card["extra"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3], "epochs 1-2 come from the checkpoint, only 3 is new"


def test_training_is_seeded(tmp_path):
    a = train({"kind": "clumps", **TINY}, str(tmp_path / "a"), progress=False)
    b = train({"kind": "clumps", **TINY}, str(tmp_path / "b"), progress=False)
    assert a["weights"]["sha256"] == b["weights"]["sha256"]


def test_train_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="epoch"):
        from_mapping(TrainConfig, {"epoch": 3})
    with pytest.raises(ConfigError, match="kind"):
        from_mapping(TrainConfig, {"kind": "galaxies"})
    with pytest.raises(ConfigError, match="unknown key"):
        RECIPES["clumps"]({"stamp_sizes": 3})


def test_deblend_inputs_tell_the_network_where_the_peaks_are():
    recipe = RECIPES["deblend"](None)
    batch = recipe.batch("test", 0, 3)
    x, y = recipe.inputs_targets(batch)
    assert x.shape[1] == 3 and y.shape[1] == 2
    for i in range(3):
        for k in range(2):
            py, px = batch["peaks"][i, k]
            marker = x[i, 1 + k].numpy()
            iy, ix = np.unravel_index(np.argmax(marker), marker.shape)
            assert abs(iy - py) <= 0.5 + 1e-6 and abs(ix - px) <= 0.5 + 1e-6
