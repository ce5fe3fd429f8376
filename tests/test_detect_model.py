"""The class-head CenterNet (one objectness channel + class logits) and the fine-tuning map onto it."""
from __future__ import annotations

import numpy as np
import torch

from deepmosaic.models.detection import CenterNet, centre_class_loss, decode, encode_targets
from deepmosaic.models.train import RECIPES

SMALL = {"depth": 2, "base_channels": 8, "head_channels": 8}


def test_class_head_outputs_loss_and_decode():
    torch.manual_seed(0)
    model = CenterNet(**SMALL, class_head=True).eval()
    x = torch.randn(2, 1, 32, 40)
    with torch.no_grad():
        out = model(x)
    assert out["heatmap"].shape == (2, 1, 32, 40) and out["class"].shape == (2, 2, 32, 40)
    objects = [{"y": [5.2, 20.0], "x": [7.1, 30.4], "class_id": [0, 1], "w": [3, 5], "h": [3, 6]},
               {"y": [10.0], "x": [10.0], "class_id": [1]}]
    t = encode_targets(objects, (32, 40), n_classes=2)
    total, parts = model.loss(model(x), t)
    assert set(parts) == {"heatmap", "size", "offset", "class"} and torch.isfinite(total)
    # decode: peaks on the one objectness channel, class from the class head at the peak
    heat = torch.full((1, 1, 32, 40), -8.0)
    heat[0, 0, 5, 7] = 3.0
    heat[0, 0, 5, 8] = 2.9        # a neighbour of the same peak: suppressed
    cls = torch.zeros(1, 2, 32, 40)
    cls[0, 1, 5, 7] = 2.0
    dets = decode({"heatmap": heat, "size": torch.ones(1, 2, 32, 40), "offset": torch.zeros(1, 2, 32, 40),
                   "class": cls}, threshold=0.5)
    assert len(dets[0]) == 1 and dets[0]["class_id"][0] == 1
    assert dets[0]["class_prob"][0] == np.float32(torch.softmax(torch.tensor([0.0, 2.0]), 0)[1])


def test_centre_class_loss_is_cross_entropy_at_centres():
    heat = torch.zeros(1, 2, 4, 4)
    heat[0, 0, 1, 1] = 1.0
    heat[0, 1, 2, 3] = 1.0
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 1, 1] = mask[0, 0, 2, 3] = 1.0
    logits = torch.zeros(1, 2, 4, 4)
    assert abs(float(centre_class_loss(logits, heat, mask)) - np.log(2)) < 1e-6
    logits[0, 0, 1, 1] = logits[0, 1, 2, 3] = 20.0
    assert float(centre_class_loss(logits, heat, mask)) < 1e-6
    assert float(centre_class_loss(logits, heat, torch.zeros_like(mask))) == 0.0


def test_per_class_weights_map_onto_a_class_head_network():
    torch.manual_seed(1)
    old = CenterNet(**SMALL).eval()
    new = CenterNet(**SMALL, class_head=True).eval()
    RECIPES["detect"](None).init_from(new, old)
    x = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        a, b = old(x), new(x)
    for k in ("size", "offset"):
        assert torch.equal(a[k], b[k])
    assert torch.allclose(a["heatmap"], b["class"])      # the class head starts as the per-class heatmap
    torch.testing.assert_close(b["heatmap"][:, 0], a["heatmap"].mean(1), atol=1e-5, rtol=1e-5)
