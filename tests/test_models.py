"""Networks, losses, registry and weight files (deepmosaic.models).

Every registered architecture goes through the one shared tester, :class:`ModelTester`: a subclass only says
how to make a small batch and a training loss; ``test_every_architecture_has_a_tester`` makes sure no
registered name escapes it. Everything is small (depth 2, base 8, tiny images) and seeded.
"""
from __future__ import annotations

import json
import time
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deepmosaic.models import losses, registry
from deepmosaic.models.detection import DETECTION_DTYPE, CenterNet, decode, encode_targets
from deepmosaic.models.prob_unet import ProbUNet
from deepmosaic.models.unet import UNet, UNetConfig, receptive_reach
from deepmosaic.models.weights_io import ChecksumError, WeightsError, _sha256, load_model, read_card, save_model
from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.pipeline.metrics import iou

SMALL = {"depth": 2, "base_channels": 8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Keep CPU use modest: one intra-op thread for this module, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- synthetic data ------------------------------------------------------------------------------------------
def blob_scene(n_images, shape, seed, n_objects=3, radius=2.5):
    """Gaussian blobs on noise, their centres, and disc masks of ``radius`` pixels around the centres."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.zeros((n_images, 1, h, w), np.float32)
    masks = np.zeros((n_images, 1, h, w), np.float32)
    objects = []
    for i in range(n_images):
        my, mx = min(4.0, (h - 1) / 2), min(4.0, (w - 1) / 2)  # keep centres off the border
        ys = rng.uniform(my, h - 1 - my, n_objects)
        xs = rng.uniform(mx, w - 1 - mx, n_objects)
        cls = rng.integers(0, 2, n_objects)
        sizes = rng.uniform(2, 6, n_objects)
        for y, x, c, s in zip(ys, xs, cls, sizes):
            sigma = 1.0 if c == 0 else 2.0
            images[i, 0] += rng.uniform(1, 2) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma ** 2))
            masks[i, 0] = np.maximum(masks[i, 0], ((yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2))
        images[i, 0] += rng.normal(0, 0.05, (h, w))
        objects.append({"y": ys, "x": xs, "class_id": cls, "w": sizes, "h": sizes * 0.8})
    return torch.from_numpy(images), torch.from_numpy(masks), objects


def _tensors(out):
    """The spatial output tensors of any model's forward, by name."""
    if isinstance(out, torch.Tensor):
        return {"logits": out}
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return {k: v for k, v in out._asdict().items() if isinstance(v, torch.Tensor) and v.ndim == 4}
    return dict(out)


# -- the shared tester -----------------------------------------------------------------------------------------
class ModelTester:
    """Contract every registered network must meet. Subclasses set ``name`` and override ``batch``/``loss``."""

    name: ClassVar[str] = ""
    config: ClassVar[dict] = SMALL
    overfit_steps: ClassVar[int] = 150
    overfit_lr: ClassVar[float] = 1e-2
    overfit_factor: ClassVar[float] = 20.0

    def build(self, seed=0, **over):
        torch.manual_seed(seed)
        return registry.build(self.name, **{**self.config, **over})

    def batch(self, n, shape, seed=0):
        """(x, target) for the loss; default: blob images and disc masks."""
        x, masks, _ = blob_scene(n, shape, seed)
        return x, masks

    def loss(self, model, x, target):
        return losses.combined(bce=1.0, dice=1.0)(model(x), target)

    def outputs(self, model, x):
        return _tensors(model(x))

    # -- tests ---------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("shape", [(37, 53), (64, 64), (5, 3)])
    def test_forward_backward_any_size(self, shape):
        model = self.build().train()
        x, target = self.batch(2, shape)
        for name, t in self.outputs(model, x).items():
            assert t.shape[0] == 2 and t.shape[-2:] == shape, name
        loss = self.loss(model, x, target)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0

    def test_channels_last_matches(self):
        model = self.build().eval()
        x, _ = self.batch(2, (32, 40))
        with torch.no_grad():
            ref = self.outputs(model, x)
            cl = self.outputs(model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last))
        for k in ref:
            torch.testing.assert_close(cl[k], ref[k], rtol=1e-4, atol=1e-5)

    def test_deterministic_for_a_seed(self):
        x, _ = self.batch(2, (32, 32))
        with torch.no_grad():
            a = self.outputs(self.build(seed=3).eval(), x)
            b = self.outputs(self.build(seed=3).eval(), x)
            c = self.outputs(self.build(seed=4).eval(), x)
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert any(not torch.equal(a[k], c[k]) for k in a)

    def test_config_is_json_and_rebuilds(self):
        model = self.build()
        cfg = json.loads(json.dumps(model.config.to_dict()))
        again = registry.build(self.name, **cfg)
        assert again.config == model.config
        assert type(again) is type(model)

    def test_unknown_config_key_is_an_error(self):
        with pytest.raises(ConfigError, match="base_chanels.*Did you mean 'base_channels'"):
            registry.build(self.name, base_chanels=8)

    def test_halo_is_declared(self):
        rf = self.build().receptive_field()
        assert rf["halo"] > 0 and rf["size"] > rf["halo"] and rf["stride_multiple"] == 4

    @pytest.mark.parametrize("dtype", ["float32", "float16"])
    def test_save_load_round_trip(self, tmp_path, dtype):
        model = self.build().eval()
        x, _ = self.batch(2, (37, 29))
        card = save_model(model, tmp_path / "net", {"seed": 7, "metrics": {"iou": 0.8}}, dtype=dtype)
        loaded = load_model(tmp_path / "net.safetensors")
        assert not loaded.training and type(loaded) is type(model)
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        assert loaded.card["weights"]["sha256"] == card["weights"]["sha256"] == _sha256(tmp_path / "net.safetensors")
        with torch.no_grad():
            ref, got = self.outputs(model, x), self.outputs(loaded, x)
        for k in ref:
            if dtype == "float32":
                assert torch.equal(ref[k], got[k]), k
            else:
                torch.testing.assert_close(got[k], ref[k], rtol=2e-2, atol=2e-2)

    def test_corrupted_file_fails_checksum(self, tmp_path):
        save_model(self.build(), tmp_path / "net")
        st = tmp_path / "net.safetensors"
        raw = bytearray(st.read_bytes())
        raw[-5] ^= 0xFF  # flip bits inside the last tensor's data
        st.write_bytes(bytes(raw))
        with pytest.raises(ChecksumError) as err:
            load_model(tmp_path / "net")
        msg = str(err.value)
        assert str(st) in msg and read_card(tmp_path / "net")["weights"]["sha256"] in msg and _sha256(st) in msg

    def test_overfits_a_small_batch(self):
        model = self.build().train()
        x, target = self.batch(4, (32, 32), seed=1)
        opt = torch.optim.Adam(model.parameters(), lr=self.overfit_lr)
        t0 = time.perf_counter()
        history = []
        for _ in range(self.overfit_steps):
            opt.zero_grad()
            loss = self.loss(model, x, target)
            loss.backward()
            opt.step()
            history.append(loss.item())
        elapsed = time.perf_counter() - t0
        first, last = history[0], float(np.mean(history[-10:]))
        assert last < first / self.overfit_factor, (first, last)
        assert elapsed < 30, f"overfitting took {elapsed:.1f} s (aim: a few seconds)"


class TestUNet(ModelTester):
    name = "unet"


class TestProbUNet(ModelTester):
    name = "prob_unet"

    def loss(self, model, x, target):
        return model.loss(x, target, recon=losses.combined(bce=1.0, dice=1.0), beta=0.1)[0]


class TestCenterNet(ModelTester):
    name = "centernet"

    def batch(self, n, shape, seed=0):
        x, _, objects = blob_scene(n, shape, seed)
        return x, encode_targets(objects, shape, n_classes=2, sigma=1.0)

    def loss(self, model, x, target):
        return model.loss(model(x), target)[0]


def test_every_architecture_has_a_tester():
    tested = {cls.name for cls in ModelTester.__subclasses__()}
    # morphnet regresses stamps to numbers (no dense map, fixed input size): tests/test_morphology.py
    assert set(registry.names()) - {"morphnet"} == tested == {"unet", "prob_unet", "centernet"}


# -- registry ------------------------------------------------------------------------------------------------
def test_unknown_architecture_lists_valid_names():
    with pytest.raises(ConfigError, match="'unett' is not registered. Valid names: ") as err:
        registry.build("unett")
    listed = str(err.value).split("Valid names: ")[1].rstrip(".").split(", ")
    assert listed == registry.names() and {"unet", "prob_unet", "centernet"} <= set(listed)


@pytest.mark.parametrize("key, value", [("norm", "layer"), ("depth", -1), ("upsample", "nearest"),
                                        ("pad_mode", "circular"), ("base_channels", 0)])
def test_bad_config_values_name_the_parameter(key, value):
    with pytest.raises(ConfigError, match=f"unet.{key}="):
        registry.build("unet", **{key: value})


def test_build_accepts_strings_from_the_command_line():
    assert registry.build("unet", depth="2", base_channels="8").config == UNetConfig(depth=2, base_channels=8)


# -- U-Net receptive field -------------------------------------------------------------------------------------
def _randomise_norm_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _empirical_reach(model, n_positions):
    """Largest distance (per axis) at which perturbing one input pixel changes an output (float64, eval)."""
    halo, step = model.halo(), model.stride_multiple
    n = 2 * halo + 3 * step + 6
    x = torch.randn(1, model.config.in_channels, n, n, dtype=torch.float64)

    def run(inp):
        return torch.cat(list(_tensors(model(inp)).values()), dim=1).abs().amax(1)[0]

    reach = 0
    with torch.no_grad():
        base = run(x)
        for q in range(n_positions):  # every position of the pooling grid
            qy, qx = halo + step + q, halo + step + (q * 3) % n_positions
            x2 = x.clone()
            x2[0, :, qy, qx] += 10.0
            changed = torch.nonzero(run(x2) != base)
            assert len(changed) > 0
            reach = max(reach, int((changed[:, 0] - qy).abs().max()), int((changed[:, 1] - qx).abs().max()))
    return reach


@pytest.mark.parametrize("name, over", [("unet", {}), ("unet", {"upsample": "bilinear"}),
                                        ("unet", {"norm": "none"}), ("centernet", {}),
                                        ("unet", {"stem": "highpass", "stem_radius": 3}),
                                        ("unet", {"stem": "add_highpass", "stem_radius": 2}),
                                        ("centernet", {"stem": "add_highpass", "stem_radius": 3})])
def test_halo_equals_empirical_receptive_field(name, over):
    torch.manual_seed(0)
    model = _randomise_norm_stats(registry.build(name, **SMALL, **over)).double().eval()
    assert _empirical_reach(model, model.stride_multiple) == model.halo()


def test_receptive_reach_known_values():
    # depth 0: two 3x3 convs, +-2 px. Depth 1: +-2 (enc0), pool, +-2 at half resolution (+-4 px, +1 for the
    # pooling phase), +-2 (dec0): 9 px. The rest is checked against perturbations above.
    assert [receptive_reach(d) for d in range(5)] == [(2, 5), (9, 18), (23, 44), (51, 100), (107, 204)]
    assert receptive_reach(2, "bilinear")[0] == 26 and receptive_reach(2, head_radius=1)[0] == 24
    assert UNet(depth=3).halo() == 51 and UNet(depth=3).aligned_halo() == 56
    assert UNet(depth=3, stem="highpass", stem_radius=4).halo() == 55      # the stem's box reaches 4 px more


def test_highpass_stem_keeps_a_bump_and_drops_smooth_light():
    from deepmosaic.models.unet import highpass_stem
    yy, xx = np.mgrid[:41, :41]
    smooth = 400.0 * np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / (2 * 15.0 ** 2))
    bump = 8.0 * np.exp(-((yy - 24) ** 2 + (xx - 17) ** 2) / (2 * 1.5 ** 2))
    out = highpass_stem(torch.tensor(smooth + bump)[None, None], 4)[0].numpy()
    assert out.shape == (2, 41, 41)
    np.testing.assert_allclose(out[0], np.arcsinh(smooth + bump))
    hp = np.sinh(out[1])
    hp0 = np.sinh(highpass_stem(torch.tensor(smooth)[None, None], 4)[0, 1].numpy())
    assert abs(hp0[20, 20]) < 0.05 * smooth[20, 20]             # the smooth light mostly goes (its curvature stays)
    assert 5.0 < hp[24, 17] - hp0[24, 17] < 8.0                  # the bump stays, less its own box mean
    with pytest.raises(ConfigError, match="stem"):
        UNet(stem="lowpass")


def test_add_highpass_stem_starts_as_the_plain_network_and_can_learn():
    """A stem='none' network maps onto stem='add_highpass' exactly (training's init), and the new channel's
    weights get gradients, so fine-tuning can use the high-pass view."""
    from deepmosaic.models.train import ClumpRecipe
    from deepmosaic.models.unet import highpass_stem
    x = torch.randn(2, 1, 40, 48, dtype=torch.float64) * 5
    stem = highpass_stem(x, 3, keep_input=True)
    torch.testing.assert_close(stem[:, :1], x)
    torch.testing.assert_close(stem[:, 1:], highpass_stem(x, 3)[:, 1:])
    torch.manual_seed(0)
    plain = _randomise_norm_stats(UNet(**SMALL)).double().eval()
    wide = UNet(**SMALL, stem="add_highpass", stem_radius=3).double()
    ClumpRecipe(None).init_from(wide, plain)
    wide.eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), plain(x), rtol=1e-12, atol=1e-12)
    first = next(p for p in wide.parameters() if p.ndim == 4)
    assert first.shape[1] == 2 and float(first.detach()[:, 1].abs().max()) == 0.0
    wide.train()
    wide(x).sum().backward()
    assert float(first.grad[:, 1].abs().max()) > 0
    with pytest.raises(ValueError, match="first convolution"):
        from deepmosaic.models.unet import widen_first_conv
        widen_first_conv(UNet(**{**SMALL, "base_channels": 4}, stem="add_highpass"), UNet(**SMALL))


def test_detector_with_add_highpass_stem_starts_as_the_plain_detector():
    """The detect recipe widens a plain CenterNet onto the add_highpass stem as the same function (every head),
    and the stem's box adds its radius to the halo."""
    from deepmosaic.models.train import DetectRecipe
    torch.manual_seed(0)
    plain = _randomise_norm_stats(registry.build("centernet", **SMALL, class_head=True)).double().eval()
    wide = registry.build("centernet", **SMALL, class_head=True, stem="add_highpass", stem_radius=3).double()
    DetectRecipe(None).init_from(wide, plain)
    wide.eval()
    x = torch.randn(2, 1, 44, 52, dtype=torch.float64) * 4
    x[0, 0, 20:23, 30:33] += 300.0
    with torch.no_grad():
        a, b = plain(x), wide(x)
    assert set(a) == set(b) == {"heatmap", "size", "offset", "class"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-12)
    assert wide.halo() == plain.halo() + 3
    with pytest.raises(ConfigError, match="stem"):
        registry.build("centernet", **SMALL, stem="lowpass")


@pytest.mark.parametrize("over", [{}, {"stem": "highpass", "stem_radius": 5},
                                  {"stem": "add_highpass", "stem_radius": 3}])
def test_tiled_equals_untiled_with_aligned_halo(over):
    """A window whose origin is on the pooling grid reproduces the untiled output on its core."""
    torch.manual_seed(0)
    model = _randomise_norm_stats(UNet(**SMALL, **over)).double().eval()
    halo = model.aligned_halo()
    x = torch.randn(1, 1, 120, 136, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
        y0, x0, core = 8, 12, 20  # window origin on multiples of 4
        win = model(x[..., y0:y0 + core + 2 * halo, x0:x0 + core + 2 * halo - 3])  # odd width: padded inside
    torch.testing.assert_close(win[..., halo:halo + core, halo:halo + core - 3],
                               full[..., y0 + halo:y0 + halo + core, x0 + halo:x0 + halo + core - 3],
                               rtol=1e-12, atol=1e-12)


def test_group_norm_is_not_local():
    torch.manual_seed(0)
    model = UNet(**SMALL, norm="group", groups=4).double().eval()
    assert not model.local and not ProbUNet(**SMALL).local and CenterNet(**SMALL).local
    x = torch.randn(1, 1, 96, 96, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 0, 2, 2] += 10.0
    with torch.no_grad():
        d = (model(x2) - model(x)).abs()[0, 0]
    assert d[-1, -1] > 0  # 132 px away, far beyond the halo: the tile statistics changed


def test_wrong_input_is_explained():
    model = UNet(**SMALL)
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"image\[None, None\]"):
        model(torch.zeros(16, 16))


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("pad_mode", ["reflect", "replicate", "zeros"])
def test_norms_and_pad_modes(norm, pad_mode):
    model = UNet(**SMALL, norm=norm, pad_mode=pad_mode, in_channels=2, out_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, 21, 2)).shape == (1, 3, 21, 2)


# -- losses ---------------------------------------------------------------------------------------------------
def _masks(seed=0, shape=(3, 2, 16, 16), p=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).float()


def _perfect_logits(target, scale=30.0):
    return (2 * target - 1) * scale


@pytest.mark.parametrize("fn", [losses.bce, losses.soft_dice, losses.soft_jaccard, losses.focal])
def test_perfect_prediction_has_zero_loss(fn):
    t = _masks()
    assert float(fn(_perfect_logits(t), t)) < 1e-6


def test_centernet_focal_perfect_and_bad():
    _, _, objects = blob_scene(2, (24, 24), 0)
    hm = encode_targets(objects, (24, 24), 2)["heatmap"]
    perfect = torch.where(hm >= 1, torch.tensor(30.0), torch.tensor(-30.0))
    assert float(losses.centernet_focal(perfect, hm)) < 1e-6
    assert float(losses.centernet_focal(-perfect, hm)) > 10
    # a weight of 0 removes pixels: zero weight everywhere leaves nothing to pay
    assert float(losses.centernet_focal(-perfect, hm, weight=torch.zeros_like(hm))) == 0.0


@pytest.mark.parametrize("fn", [losses.bce, losses.soft_dice, losses.soft_jaccard, losses.focal,
                                losses.centernet_focal])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_ranges_and_finite_gradients(fn, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 2, 12, 12, generator=g) * 5).requires_grad_()
    target = _masks(seed, (2, 2, 12, 12))
    target[0] = 0  # an empty mask
    value = fn(logits, target)
    value.backward()
    assert torch.isfinite(value) and value >= 0
    if fn in (losses.soft_dice, losses.soft_jaccard):
        assert value <= 1
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", [losses.soft_dice, losses.soft_jaccard])
def test_overlap_losses_finite_on_empty_masks_without_smoothing(fn):
    empty = torch.zeros(1, 1, 8, 8)
    probs = torch.zeros(1, 1, 8, 8, requires_grad=True)
    value = fn(probs, empty, smooth=0.0, from_logits=False)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(probs.grad).all()  # both empty: agreement
    logits = torch.full((1, 1, 8, 8), -20.0, requires_grad=True)
    value = fn(logits, empty, smooth=0.0)  # any mass on an empty target costs 1 without smoothing
    value.backward()
    assert value.item() == pytest.approx(1.0) and torch.isfinite(logits.grad).all()
    assert fn(logits, empty).item() < 1e-6  # smooth=1 (default) forgives it


def test_soft_jaccard_of_hard_masks_is_one_minus_iou():
    pred, true = _masks(1, (4, 3, 20, 20), 0.4), _masks(2, (4, 3, 20, 20), 0.4)
    pred[0, 0] = 0
    true[0, 0] = 0  # both empty: IoU 1
    pred[1, 1] = 0  # one empty: IoU 0
    got = losses.soft_jaccard(pred, true, smooth=0.0, from_logits=False, reduction="none")
    want = torch.tensor([[1 - iou(pred[b, c].numpy(), true[b, c].numpy()) for c in range(3)] for b in range(4)])
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
    assert got[0, 0] == 0 and got[1, 1] == 1


def test_soft_dice_of_hard_masks():
    pred, true = _masks(3), _masks(4)
    got = losses.soft_dice(pred, true, smooth=0.0, from_logits=False, reduction="none")
    inter = (pred * true).sum((2, 3))
    torch.testing.assert_close(got, 1 - 2 * inter / (pred.sum((2, 3)) + true.sum((2, 3))))


def test_focal_reduces_to_bce_and_down_weights_easy_pixels():
    logits, target = torch.randn(2, 1, 8, 8), _masks(5, (2, 1, 8, 8))
    torch.testing.assert_close(losses.focal(logits, target, alpha=None, gamma=0.0), losses.bce(logits, target))
    easy = torch.full((1, 1, 1, 1), -4.0)
    zero = torch.zeros(1, 1, 1, 1)
    assert losses.focal(easy, zero, alpha=None) < 0.01 * losses.bce(easy, zero)


def test_masked_l1_only_at_centres():
    pred = torch.zeros(1, 2, 4, 4)
    target = torch.full((1, 2, 4, 4), 9.0)
    mask = torch.zeros(1, 1, 4, 4)
    assert float(losses.masked_l1(pred, target, mask)) == 0.0
    mask[0, 0, 1, 2] = 1
    target[0, :, 1, 2] = torch.tensor([1.0, 3.0])
    assert float(losses.masked_l1(pred, target, mask[:, 0])) == pytest.approx(2.0)


def test_gaussian_nll_matches_torch():
    g = torch.Generator().manual_seed(0)
    mean, log_var, target = (torch.randn(5, 3, generator=g) for _ in range(3))
    want = torch.nn.functional.gaussian_nll_loss(mean, target, log_var.exp(), eps=0.0)
    torch.testing.assert_close(losses.gaussian_nll(mean, log_var, target), want)
    full = losses.gaussian_nll(mean, log_var, target, full=True)
    const = torch.tensor(0.5 * np.log(2 * np.pi), dtype=torch.float32)
    torch.testing.assert_close(full - losses.gaussian_nll(mean, log_var, target), const)


def test_combined_is_a_weighted_sum():
    logits, target = torch.randn(2, 1, 8, 8), _masks(6, (2, 1, 8, 8))
    loss = losses.combined(bce=0.5, jaccard=2.0)
    torch.testing.assert_close(loss(logits, target), 0.5 * losses.bce(logits, target)
                               + 2.0 * losses.soft_jaccard(logits, target))
    assert set(loss.parts(logits, target)) == {"bce", "jaccard"}
    with pytest.raises(ConfigError, match="unknown loss 'dise'. Valid names: bce, dice"):
        losses.combined(dise=1.0)
    with pytest.raises(ConfigError, match="bce=-1"):
        losses.combined(bce=-1)


def test_loss_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match=r"logits.shape=\(1, 1, 4, 4\) and target.shape=\(1, 1, 4, 5\)"):
        losses.bce(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


# -- detection -------------------------------------------------------------------------------------------------
def test_decode_recovers_planted_peaks_exactly():
    H, W = 40, 50
    planted = [(5, 7, 0, 0.9, 0.25, -0.5, 3.0, 4.0), (5, 9, 0, 0.8, -0.3, 0.1, 6.0, 2.0),   # 2 px apart
               (30, 45, 1, 0.6, 0.0, 0.4, 1.5, 1.0), (39, 0, 0, 0.95, -0.1, 0.2, 2.0, 2.0)]  # on the border
    heat = torch.full((1, 2, H, W), -8.0)
    size = torch.zeros(1, 2, H, W)
    offset = torch.zeros(1, 2, H, W)
    for y, x, c, s, dy, dx, w, h in planted:
        logit = float(np.log(s / (1 - s)))
        heat[0, c, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = logit - 1  # a shoulder around the peak
        heat[0, c, y, x] = logit
        offset[0, :, y, x] = torch.tensor([dy, dx])
        size[0, :, y, x] = torch.tensor([w, h])
    heat[0, 0, 20, 20] = float(np.log(0.2 / 0.8))  # below threshold
    out = decode({"heatmap": heat, "size": size, "offset": offset}, threshold=0.5, k=10)
    assert len(out) == 1 and out[0].dtype == DETECTION_DTYPE
    want = sorted(planted, key=lambda p: -p[3])
    got = out[0]
    assert len(got) == len(want)
    np.testing.assert_array_equal(got["y"], [p[0] + np.float64(np.float32(p[4])) for p in want])
    np.testing.assert_array_equal(got["x"], [p[1] + np.float64(np.float32(p[5])) for p in want])
    np.testing.assert_array_equal(got["class_id"], [p[2] for p in want])
    np.testing.assert_allclose(got["score"], [p[3] for p in want], rtol=1e-6)
    np.testing.assert_array_equal(got["w"], [p[6] for p in want])
    np.testing.assert_array_equal(got["h"], [p[7] for p in want])
    assert len(decode({"heatmap": heat, "size": size, "offset": offset}, threshold=0.5, k=2)[0]) == 2


def test_encode_then_decode_round_trip():
    shape = (48, 40)
    _, _, objects = blob_scene(3, shape, 9, n_objects=4)
    t = encode_targets(objects, shape, n_classes=2, sigma=1.5)
    assert float(t["heatmap"].max()) == 1.0 and int(t["mask"].sum()) == 12
    logits = torch.logit(t["heatmap"].clamp(1e-6, 1 - 1e-6)).double()
    found = decode({"heatmap": logits, "size": t["size"], "offset": t["offset"]}, threshold=0.99, k=50)
    for obj, det in zip(objects, found):
        order = np.lexsort((det["x"], det["y"]))
        ref = np.lexsort((obj["x"], obj["y"]))
        np.testing.assert_allclose(det["y"][order], obj["y"][ref], atol=1e-5)
        np.testing.assert_allclose(det["x"][order], obj["x"][ref], atol=1e-5)
        np.testing.assert_array_equal(det["class_id"][order], obj["class_id"][ref])
        np.testing.assert_allclose(det["w"][order], obj["w"][ref], rtol=1e-6)


def test_centernet_outputs_and_decode_shapes():
    model = CenterNet(**SMALL, class_names=["star", "galaxy", "clump"]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 33, 30))
    assert out["heatmap"].shape == (2, 3, 33, 30) and out["size"].shape == out["offset"].shape == (2, 2, 33, 30)
    assert torch.sigmoid(out["heatmap"]).mean() == pytest.approx(0.1, abs=0.05)  # the prior bias
    dets = model.decode(out, threshold=0.0, k=7)
    assert [len(d) for d in dets] == [7, 7] and all(np.all(np.diff(d["score"]) <= 0) for d in dets)


# -- probabilistic U-Net ---------------------------------------------------------------------------------------
def test_prob_unet_uncertainty_and_kl():
    torch.manual_seed(0)
    model = ProbUNet(**SMALL, out_channels=2, latent_dim=3)
    x, masks, _ = blob_scene(2, (24, 20), 0)
    target = torch.cat([masks, 1 - masks], dim=1)
    out = model(x, target)
    assert out.logits.shape == (2, 2, 24, 20) and out.kl.ndim == 0 and out.kl.item() >= 0
    total, parts = model.loss(x, target)
    assert torch.isfinite(total) and parts["kl"].item() >= 0
    model.eval()
    with torch.no_grad():
        assert model(x).kl is None
        samples = model.sample(x, 5)
        mean, std = model.predict_with_uncertainty(x, 8)
    assert samples.shape == (5, 2, 2, 24, 20)
    assert mean.shape == std.shape == (2, 2, 24, 20)
    assert (std >= 0).all() and float(std.max()) > 0 and ((mean >= 0) & (mean <= 1)).all()
    # KL of a posterior that moved away from the prior is positive
    with torch.no_grad():
        model.posterior_net.to_params.bias[:3] += 1.0
    assert model(x, target).kl.item() > 0.1


# -- weight files ------------------------------------------------------------------------------------------------
def test_card_contents(tmp_path):
    card = save_model(UNet(**SMALL), tmp_path / "sub" / "unet_small",
                      {"training_set": {"kind": "clumps", "n": 100}, "metrics": {"iou": 0.81}})
    on_disk = json.loads((tmp_path / "sub" / "unet_small.json").read_text())
    assert on_disk == card
    assert card["architecture"] == "unet" and card["config"]["depth"] == 2
    assert card["seed"] is None and card["description"] is None  # placeholders
    assert card["training_set"] == {"kind": "clumps", "n": 100} and card["metrics"] == {"iou": 0.81}
    assert card["weights"]["file"] == "unet_small.safetensors" and len(card["weights"]["sha256"]) == 64
    assert card["weights"]["n_parameters"] == sum(p.numel() for p in UNet(**SMALL).parameters())
    assert {"torch", "safetensors", "numpy", "python", "deepmosaic"} <= set(card["versions"])
    assert card["created"].endswith("+00:00")


def test_card_rejects_unknown_keys_and_existing_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown card key 'metric'"):
        save_model(UNet(**SMALL), tmp_path / "a", {"metric": {}})
    save_model(UNet(**SMALL), tmp_path / "a")
    with pytest.raises(WeightsError, match="already exists"):
        save_model(UNet(**SMALL), tmp_path / "a")
    save_model(UNet(**SMALL), tmp_path / "a", overwrite=True)


def test_float16_file_is_half_the_size(tmp_path):
    model = UNet(**SMALL)
    save_model(model, tmp_path / "a32")
    save_model(model, tmp_path / "a16", dtype="float16")
    s32, s16 = (tmp_path / "a32.safetensors").stat().st_size, (tmp_path / "a16.safetensors").stat().st_size
    assert s16 < 0.6 * s32
    assert load_file(tmp_path / "a16.safetensors")["head.weight"].dtype == torch.float16


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pkl"])
def test_pickles_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not even read")
    with pytest.raises(WeightsError, match="pickles.*only .safetensors"):
        load_model(path)


def _rewrite(tmp_path, name, edit):
    """Edit the tensors of a saved model and update the card's checksum (a consistent but wrong file)."""
    st = tmp_path / f"{name}.safetensors"
    tensors = load_file(st)
    edit(tensors)
    save_file(tensors, st)
    card = json.loads((tmp_path / f"{name}.json").read_text())
    card["weights"]["sha256"] = _sha256(st)
    (tmp_path / f"{name}.json").write_text(json.dumps(card))


def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path):
    save_model(UNet(**SMALL), tmp_path / "m")

    def edit(t):
        del t["head.bias"]
        t["head.extra"] = torch.zeros(1)
        t["head.weight"] = torch.zeros(5, 8, 1, 1)
    _rewrite(tmp_path, "m", edit)
    with pytest.raises(WeightsError) as err:
        load_model(tmp_path / "m.json")
    msg = str(err.value)
    assert "missing keys ['head.bias']" in msg and "unexpected keys ['head.extra']" in msg
    assert "head.weight: file (5, 8, 1, 1) vs model (1, 8, 1, 1)" in msg


def test_missing_card_and_foreign_architecture(tmp_path):
    save_model(UNet(**SMALL), tmp_path / "m")
    card = json.loads((tmp_path / "m.json").read_text())
    card["architecture"] = "resnet"
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="'resnet' is not registered"):
        load_model(tmp_path / "m")
    (tmp_path / "m.json").unlink()
    with pytest.raises(WeightsError, match="model card not found"):
        load_model(tmp_path / "m.safetensors")


def test_dotted_names_keep_their_dots(tmp_path):
    save_model(UNet(**SMALL), tmp_path / "clumps.v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clumps.v2.json", "clumps.v2.safetensors"]
    for name in ("clumps.v2", "clumps.v2.json", "clumps.v2.safetensors"):
        assert isinstance(load_model(tmp_path / name), UNet)
