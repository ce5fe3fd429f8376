"""Training runs: ``deepmosaic train clumps|deblend|detect``.

A *recipe* per kind ties a network (from the registry), a simulated training set
(``deepmosaic.models.datasets``), a loss and validation metrics computed with the project's own metric
functions. Training is seeded and resumable: every epoch writes a checkpoint (model, optimiser, epoch,
best score, RNG states; read back with ``torch.load(weights_only=True)``, which never unpickles code),
validation runs on a fixed held-out simulated set (its own seed stream), early stopping watches the
validation score, and the best model is saved as safetensors + JSON model card.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepmosaic.pipeline import metrics
from deepmosaic.pipeline.config import field, from_mapping, require, to_dict
from deepmosaic.pipeline.errors import ConfigError

from . import losses
from .morphology import MorphologyRecipe
from .registry import build

log = logging.getLogger("deepmosaic")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Unknown keys are refused; ``model`` and ``data`` are passed to the network's and the
    training set's own configs (which refuse unknown keys too)."""

    stage_name = "train"
    kind: str = field("clumps", "what to train: clumps | deblend | detect")
    model: dict = field(None, "network config overrides (see the architecture's config)")
    data: dict = field(None, "training-set config overrides (see deepmosaic.models.datasets)")
    batch_size: int = field(16, "stamps per optimisation step")
    steps_per_epoch: int = field(150, "optimisation steps per epoch")
    epochs: int = field(40, "maximum number of epochs")
    max_minutes: float = field(18.0, "stop after this many minutes of training (the default fits 2 CPU cores)")
    lr: float = field(2e-3, "AdamW learning rate (cosine decay over the epochs)")
    weight_decay: float = field(1e-4, "AdamW weight decay")
    val_size: int = field(192, "held-out simulated stamps for validation (same every epoch)")
    pool_size: int = field(1024, "noise-free training scenes rendered at a time; batches add fresh noise and "
                                 "one of the 8 flips/rotations")
    pool_epochs: int = field(4, "render a new pool of scenes every this many epochs")
    patience: int = field(8, "early stopping: epochs without a better validation score")
    seed: int = field(0, "seed of the model initialisation and of the training stream")
    device: str = field("auto", "auto | cpu | cuda: auto takes CUDA (with bf16 autocast) when present")
    threads: int = field(0, "CPU threads for torch (0: all cores)")
    weights_dtype: str = field("float16", "dtype of the saved weights on disk: float16 | float32")
    init: str = field(None, "fine-tune: start from these weights (NAME.safetensors + card) instead of a random "
                            "initialisation (the recipe maps them onto the new network; see Recipe.init_from)")

    def validate(self):
        w = "train"
        require(self.kind in RECIPES, w, "kind", self.kind, f"use one of {', '.join(RECIPES)}.")
        for name in ("batch_size", "steps_per_epoch", "epochs", "val_size", "patience", "pool_size", "pool_epochs"):
            require(getattr(self, name) >= 1, w, name, getattr(self, name), "must be >= 1.")
        require(self.max_minutes > 0, w, "max_minutes", self.max_minutes, "must be > 0.")
        require(self.lr > 0, w, "lr", self.lr, "must be > 0.")
        require(self.device in ("auto", "cpu", "cuda"), w, "device", self.device, "use auto, cpu or cuda.")
        require(self.weights_dtype in ("float16", "float32"), w, "weights_dtype", self.weights_dtype,
                "use float16 or float32.")


# --------------------------------------------------------------------------------------------- recipes

def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class Recipe:
    """How one kind is trained. Subclasses set ``arch``, ``data_kind``, ``default_model``."""

    arch = ""
    data_kind = ""
    default_model: dict = {}
    score_name = ""

    def __init__(self, data_config: dict | None):
        from . import datasets
        self.datasets = datasets
        cfg_cls = datasets.TRAINING_SETS[self.data_kind][0]
        self.data_config = from_mapping(cfg_cls, data_config or {}, where=f"train.data ({self.data_kind})")

    def batch(self, split: str, seed: int, n: int) -> dict:
        return self.datasets.make_batch(self.data_kind, self.data_config, seed=seed, n=n, split=split)

    def pool(self, seed: int, generation: int, size: int):
        """Noise-free training scenes (a new set per generation); batches add fresh noise and flips."""
        return self.datasets.StampPool(self.data_kind, self.data_config, seed=seed, size=size, split="train",
                                       start=generation * size)

    def init_from(self, model, source) -> None:
        """Start ``model`` from a trained ``source`` network: by default every tensor, strictly; a network with
        ``stem='add_highpass'`` starts from one with ``stem='none'`` as the same function (the new input
        channel's first-layer weights at zero; :func:`~deepmosaic.models.unet.widen_first_conv`)."""
        stems = (getattr(getattr(model, "config", None), "stem", None),
                 getattr(getattr(source, "config", None), "stem", None))
        if stems == ("add_highpass", "none"):
            from .unet import widen_first_conv
            return widen_first_conv(model, source)
        model.load_state_dict(source.state_dict())

    def inputs_targets(self, batch: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, model, x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluate(self, model, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class ClumpRecipe(Recipe):
    """U-Net: image -> clump probability; BCE + soft Dice. Validation: clumps found by thresholding the
    probability map (connected components of >= ``minarea`` px, as the stage's sep, and their
    probability-weighted centroids) matched one-to-one within 1.5 px to the planted clumps.

    The default training set is the ``mosaic`` layout of :class:`~deepmosaic.models.datasets.ClumpSetConfig`
    (``default_data``): 128 x 128 crops of small mosaics from the mosaic simulator itself (clumpy hosts plus
    its ordinary galaxies and stars anywhere, on the hosts too), the kind of scene the stage is evaluated on;
    the shipped weights' last three phases used it (``layout='canvas'``, pieces with decoys only on empty
    sky, served their earlier phases).
    The score is the F1 over clumps of S/N >= ``score_snr`` (detections matched to fainter clumps count
    neither for nor against purity); completeness is also reported per S/N bin."""

    arch = "unet"
    data_kind = "clumps"
    default_model = {"in_channels": 1, "out_channels": 1, "depth": 3, "base_channels": 16}
    default_data = {"layout": "mosaic", "size": 128, "max_clumps": 48, "mask_radius": 2.0,
                    "min_clump_separation": 5.0, "edge_margin": 3.0, "bulge_disk_fraction": 0.4}
    score_name = "f1"
    threshold = 0.5
    minarea = 3
    score_snr = 5.0

    def __init__(self, data_config: dict | None):
        super().__init__({**self.default_data, **(data_config or {})})

    def inputs_targets(self, batch):
        return _t(batch["image"]), _t(batch["mask"])

    def loss(self, model, x, y):
        logits = model(x)
        return losses.bce(logits, y) + losses.soft_dice(logits, y)

    def blobs(self, prob: np.ndarray) -> np.ndarray:
        """Centroids ``(y, x)`` of the connected components above ``threshold`` with >= ``minarea`` px."""
        from scipy import ndimage
        lab, n = ndimage.label(prob > self.threshold, structure=np.ones((3, 3)))
        if n == 0:
            return np.zeros((0, 2))
        idx = np.arange(1, n + 1)
        big = idx[ndimage.sum_labels(np.ones_like(prob), lab, idx) >= self.minarea]
        return np.array(ndimage.center_of_mass(prob, lab, big)).reshape(-1, 2)

    @torch.no_grad()
    def evaluate(self, model, batch):
        x, y = self.inputs_targets(batch)
        prob = torch.sigmoid(_forward_batched(model, x)).numpy()[:, 0]
        n_true = n_pred = n_tp = 0
        bins = {"completeness_snr10": [0, 0], "completeness_snr5_10": [0, 0]}
        ious = metrics.stamp_iou(batch["mask"][:, 0] > 0.5, prob > self.threshold)
        for i in range(len(prob)):
            pred = self.blobs(prob[i])
            valid = np.asarray(batch["valid"][i])
            true = np.asarray(batch["positions"][i])[valid].reshape(-1, 2)
            snr = np.asarray(batch["clump_snr"][i])[valid]
            ti, _, _ = metrics.match_positions(true, pred, 1.5)
            found = np.zeros(len(true), bool)
            found[ti] = True
            counted = snr >= self.score_snr
            n_true += int(counted.sum())
            n_tp += int((found & counted).sum())
            n_pred += len(pred) - int((found & ~counted).sum())
            for name, sel in (("completeness_snr10", snr >= 10), ("completeness_snr5_10", (snr >= 5) & (snr < 10))):
                bins[name][0] += int((found & sel).sum())
                bins[name][1] += int(sel.sum())
        s = metrics.detection_scores(n_true, n_pred, n_tp)
        out = {"completeness": s["completeness"], "purity": s["purity"], "f1": s["f1"],
               "mean_stamp_iou": float(np.mean(ious))}
        out.update({k: (v[0] / v[1] if v[1] else float("nan")) for k, v in bins.items()})
        return out


class DeblendRecipe(Recipe):
    """Probabilistic U-Net (:class:`~deepmosaic.models.prob_unet.ProbUNet`) told where the detected peaks
    are. Input: the image in noise-sigma units + one Gaussian peak marker per galaxy (central; companion or
    companions); output:
    one sigmoid mask per galaxy, made disjoint by :meth:`masks_from_probs`.

    Loss, per object so the small companion counts as much as the central: BCE + soft Dice of the logits at a
    posterior sample of the latent (Kohl et al. 2018) and, with equal weight, of the logits at the prior mean
    (the deterministic prediction the stage uses; it costs only the 1x1 ``fcomb`` convs), plus ``beta`` x KL.
    Validation: mean IoU of the disjoint central and companion masks at the prior mean, over the galaxies
    with a non-empty truth mask (as the benchmark scores them)."""

    arch = "prob_unet"
    data_kind = "blends"
    default_model = {"in_channels": 3, "out_channels": 2, "depth": 4, "base_channels": 16, "latent_dim": 6,
                     "latent_base_channels": 8, "beta": 1.0}
    score_name = "mean_iou"
    threshold = 0.5

    @staticmethod
    def peak_channels(peaks: np.ndarray, shape, sigma: float = 1.5) -> np.ndarray:
        """[n, 2, H, W] Gaussian markers: channel 0 at ``peaks[i, 0]`` (the central), channel 1 the sum of
        markers at ``peaks[i, 1:]`` (the companion; several companions for blends of more than two; NaN rows
        are padding and are skipped)."""
        peaks = np.asarray(peaks, np.float64)
        n = len(peaks)
        H, W = shape
        yy, xx = np.arange(H)[:, None], np.arange(W)[None, :]
        out = np.zeros((n, 2, H, W), np.float32)
        for i in range(n):
            for k in range(peaks.shape[1]):
                py, px = peaks[i, k]
                if np.isfinite(py) and np.isfinite(px):
                    out[i, min(k, 1)] += np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * sigma ** 2))
        return np.minimum(out, 1.0)

    @classmethod
    def stamp_inputs(cls, image: np.ndarray, peaks: np.ndarray) -> np.ndarray:
        """Network input [n, 3, H, W] from images [n, 1, H, W] in noise-sigma units and peaks [n, k, 2]."""
        img = np.asarray(image, np.float32)
        return np.concatenate([img, cls.peak_channels(peaks, img.shape[-2:])], axis=1)

    def init_from(self, model, source) -> None:
        """A probabilistic U-Net started from a trained plain U-Net of the same body: the body as it is; the
        latent combination ``fcomb`` starts as the identity on the features (the body ends in a ReLU, so the
        features are >= 0 and pass the ReLUs unchanged) with small latent weights, and its last 1x1 conv is the
        U-Net's head. At the start the prior-mean prediction is the U-Net's own (up to the small latent term)."""
        if not (hasattr(model, "fcomb") and hasattr(source, "head")):
            return super().init_from(model, source)
        model.body.load_state_dict(source.body.state_dict())
        convs = [m for m in model.fcomb if isinstance(m, torch.nn.Conv2d)]
        f = model.body.out_channels
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for conv in convs[:-1]:
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[:f, :f, 0, 0] = torch.eye(f)
                if conv.weight.shape[1] > f:              # the latent's columns
                    conv.weight[:, f:, 0, 0] = 0.01 * torch.randn(conv.weight.shape[0], conv.weight.shape[1] - f,
                                                                 generator=gen)
            last = convs[-1]
            if len(convs) == 1:
                last.weight.zero_()
                last.weight[:, :f] = source.head.weight
                last.weight[:, f:, 0, 0] = 0.01 * torch.randn(last.weight.shape[0], last.weight.shape[1] - f,
                                                             generator=gen)
            else:
                last.weight.copy_(source.head.weight)
            last.bias.copy_(source.head.bias)

    def inputs_targets(self, batch):
        return _t(self.stamp_inputs(batch["image"], batch["peaks"])), _t(batch["masks"])

    @staticmethod
    def _per_object(logits, y):
        per_obj = [losses.bce(logits[:, k:k + 1], y[:, k:k + 1]) + losses.soft_dice(logits[:, k:k + 1], y[:, k:k + 1])
                   for k in range(y.shape[1])]
        return sum(per_obj) / len(per_obj)

    def loss(self, model, x, y):
        feats = model.features(x)
        prior = model.prior(x)
        post = model.posterior(x, y)
        kl = torch.distributions.kl_divergence(post, prior).mean()
        recon = 0.5 * (self._per_object(model.combine(feats, post.rsample()), y)
                       + self._per_object(model.combine(feats, prior.mean), y))
        return recon + model.config.beta * kl

    @classmethod
    def masks_from_probs(cls, prob: np.ndarray) -> np.ndarray:
        """Disjoint masks from per-object probabilities ``prob[..., k, H, W]``: a pixel goes to the object of
        largest probability where that probability exceeds 0.5 (bool, same shape)."""
        best = prob.argmax(axis=-3)
        keep = prob.max(axis=-3) > cls.threshold
        return np.stack([(best == k) & keep for k in range(prob.shape[-3])], axis=-3)

    @staticmethod
    def label_probabilities(prob: np.ndarray) -> np.ndarray:
        """Per-pixel probabilities of the labels {background, object 1..k} from per-object sigmoids
        ``prob[..., k, H, W]``, treating the objects as exclusive (the truth masks are disjoint):
        ``w_bg = prod(1 - p)``, ``w_j = p_j prod_{i != j}(1 - p_i)``, normalised. Returns [..., k + 1, H, W]."""
        p = np.clip(prob, 1e-6, 1 - 1e-6)
        q = 1.0 - p
        all_q = np.prod(q, axis=-3, keepdims=True)
        w = np.concatenate([all_q, p * all_q / q], axis=-3)
        return w / w.sum(axis=-3, keepdims=True)

    @classmethod
    def error_probability(cls, samples: np.ndarray, decided: np.ndarray) -> np.ndarray:
        """The per-pixel uncertainty: the probability that the decided label is wrong, averaged over samples.

        ``samples`` [s, n, k, H, W]: sigmoid probabilities of ``s`` latent samples; ``decided`` [n, k, H, W]
        bool disjoint masks. Returns float32 [n, H, W] in [0, 1]."""
        label = np.where(decided.any(axis=-3), decided.argmax(axis=-3) + 1, 0)        # [n, H, W]
        right = np.take_along_axis(cls.label_probabilities(samples), label[None, :, None], axis=-3)[:, :, 0]
        return (1.0 - right.mean(axis=0)).astype(np.float32)

    @staticmethod
    @torch.no_grad()
    def sample_probs(model, x: torch.Tensor, n_samples: int = 8, seeds=None, batch: int = 32, flips: bool = False,
                     companion_shift: float | None = None):
        """Sigmoid probabilities of network inputs ``x`` [n, 3, H, W] at the prior mean, and ``n_samples``
        draws from the prior (latent noise of stamp ``i`` from ``torch.Generator`` seeded with ``seeds[i]``,
        default ``i``: the same stamp gives the same draws whatever batch it is in). ``flips``: the
        probabilities are averaged over the 8 flips/rotations of each (square) stamp (8x the compute; the
        draws stay those of the stamp as it is). ``companion_shift`` (logits) is added to the companion
        channels (1, 2, ...) of both (:meth:`shift_companions`); ``None``: the model card's
        ``extra.companion_logit_shift`` (0 without one, e.g. during training).

        Returns numpy ``(prob float32 [n, k, H, W], samples float32 [s, n, k, H, W])``; a plain U-Net (no
        latent) or ``n_samples=0`` gives ``samples = prob[None]``."""
        if companion_shift is None:
            companion_shift = DeblendRecipe.card_companion_shift(getattr(model, "card", None))
        seeds = np.arange(len(x)) if seeds is None else np.asarray(seeds)
        dev = next(model.parameters()).device
        probs, draws = [], []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].to(dev)
            if hasattr(model, "prior") and n_samples > 0:
                feats = model.features(xb)
                prior = model.prior(xb)
                mu, sd = prior.mean, prior.stddev
                eps = torch.stack([torch.randn(n_samples, mu.shape[1], generator=torch.Generator().manual_seed(
                    int(sd_)), dtype=torch.float32) for sd_ in seeds[i:i + batch]], dim=1).to(dev)   # [s, b, L]
                pb = torch.sigmoid(model.combine(feats, mu))
                sb = torch.stack([torch.sigmoid(model.combine(feats, mu + sd * e)) for e in eps])
            else:
                pb = torch.sigmoid(model(xb).logits if hasattr(model, "prior") else model(xb))
                sb = pb[None]
            if flips:
                pb = sum(_dihedral(torch.sigmoid(_logits(model, _dihedral(xb, t))), t, inverse=True)
                         for t in range(8)) / 8
            probs.append(pb.float().cpu().numpy())
            draws.append(sb.float().cpu().numpy())
        prob, samples = np.concatenate(probs), np.concatenate(draws, axis=1)
        return (DeblendRecipe.shift_companions(prob, companion_shift),
                DeblendRecipe.shift_companions(samples, companion_shift))

    @staticmethod
    def card_companion_shift(card: dict | None) -> float:
        """The companion logit shift of a model card (``extra.companion_logit_shift``), 0 without one."""
        return float(((card or {}).get("extra") or {}).get("companion_logit_shift", 0.0))

    @staticmethod
    def shift_companions(prob: np.ndarray, shift: float) -> np.ndarray:
        """``prob[..., k, H, W]`` with ``shift`` added to the logits of channels 1, 2, ... (the companions; the
        central, channel 0, as it is). Trained per object with cross-entropy, the network is reluctant to give
        a faint or close companion any pixel; a positive shift, fitted on validation pairs for the mean IoU,
        moves the decision towards it (``bench_deblend.py --fit-shift``)."""
        if not shift:
            return prob
        out = prob.copy()
        p = np.clip(out[..., 1:, :, :].astype(np.float64), 1e-7, 1 - 1e-7)
        out[..., 1:, :, :] = 1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) + shift)))
        return out

    @classmethod
    def predict(cls, model, x: torch.Tensor, n_samples: int = 8, seeds=None, batch: int = 32, flips: bool = False,
                companion_shift: float | None = None):
        """Disjoint masks, probabilities (prior mean) and per-pixel uncertainty (:meth:`error_probability`
        over ``n_samples`` prior draws) of network inputs ``x`` [n, 3, H, W]. Returns numpy ``(masks bool
        [n, k, H, W], prob float32 [n, k, H, W], uncertainty float32 [n, H, W])``."""
        prob, samples = cls.sample_probs(model, x, n_samples, seeds, batch, flips, companion_shift)
        masks = cls.masks_from_probs(prob)
        return masks, prob, cls.error_probability(samples, masks)

    @torch.no_grad()
    def evaluate(self, model, batch):
        x, _ = self.inputs_targets(batch)
        pred, _, _ = self.predict(model, x, n_samples=0)
        iou, scored = self.object_ious(batch["masks"] > 0.5, pred)
        c, k = (float(iou[scored[:, j], j].mean()) if scored[:, j].any() else 0.0 for j in range(2))
        return {"central_iou": c, "companion_iou": k, "mean_iou": (c + k) / 2}

    @staticmethod
    def object_ious(truth: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-object stamp IoU [n, k] of truth and predicted masks (bool [n, k, H, W]), and which objects
        are scored [n, k]: those with a non-empty truth mask, as the benchmark scores them (an empty
        prediction of an empty truth would score 1 and reward a network that gives faint companions nothing)."""
        iou = np.stack([metrics.stamp_iou(truth[:, k], masks[:, k]) for k in range(truth.shape[1])], axis=1)
        return iou, truth.reshape(truth.shape[0], truth.shape[1], -1).any(-1)


def _dihedral(x: torch.Tensor, t: int, inverse: bool = False) -> torch.Tensor:
    """Transform ``t`` (0..7; bit 2 transpose, bit 1 flip y, bit 0 flip x) of ``x[..., y, x]``, or its inverse."""
    steps = [(4, lambda a: a.transpose(-1, -2)), (2, lambda a: a.flip(-2)), (1, lambda a: a.flip(-1))]
    for bit, op in (reversed(steps) if inverse else steps):
        if t & bit:
            x = op(x)
    return x


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of a plain network, or of a probabilistic U-Net at its prior mean."""
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


class DetectRecipe(Recipe):
    """CenterNet: objectness heatmap (focal loss, objects at S/N 1.5-4 left out), star/galaxy class head
    (cross-entropy at centres), box size and offset (L1). Validation: F1 of decoded peaks (threshold 0.3)
    against objects with S/N >= 10 within 2 px."""

    arch = "centernet"
    data_kind = "fields"
    default_model = {"in_channels": 1, "depth": 3, "base_channels": 16, "class_head": True}
    score_name = "f1"
    threshold = 0.3

    def init_from(self, model, source):
        """As the base recipe; a source with per-class heatmaps (``class_head=False``) maps onto a class-head
        network: body, size and offset heads as they are; the class head starts as the old heatmap head
        (its per-class logits rank the classes); the objectness head as the old heatmap head with its
        last layer averaged over the classes."""
        if model.config.class_head == source.config.class_head:
            return super().init_from(model, source)
        if source.config.class_head or source.config.n_classes != model.config.n_classes:
            raise ConfigError("train.init: can map per-class heatmap weights onto a class-head network with "
                              "the same classes only; train from scratch (no init) instead.")
        state = source.state_dict()
        for key in [k for k in state if k.startswith("heads.heatmap.")]:
            state["heads.class." + key[len("heads.heatmap."):]] = state[key].clone()
        last = max(k for k in state if k.startswith("heads.heatmap.") and k.endswith(".weight"))
        for key in (last, last[:-len("weight")] + "bias"):
            state[key] = state[key].mean(0, keepdim=True)
        model.load_state_dict(state)

    def inputs_targets(self, batch):
        from .datasets import centernet_targets
        return _t(batch["image"]), {k: _t(v) for k, v in centernet_targets(batch).items()}

    def loss(self, model, x, y):
        total, _ = model.loss(model(x), y)
        return total

    @torch.no_grad()
    def evaluate(self, model, batch):
        x, _ = self.inputs_targets(batch)
        from .detection import decode
        outs = _forward_batched(model, x)
        dets = decode(outs, threshold=self.threshold, k=500)
        n_true = n_pred = n_tp = 0
        for i, d in enumerate(dets):
            valid = np.asarray(batch["valid"][i], bool)
            boxes = np.asarray(batch["boxes"][i])[valid]          # (x_c, y_c, w, h)
            snr = np.asarray(batch["snr"][i])[valid]
            H, W = x.shape[-2:]
            inside = (boxes[:, 0] > -0.5) & (boxes[:, 0] < W - 0.5) & (boxes[:, 1] > -0.5) & (boxes[:, 1] < H - 0.5)
            boxes, snr = boxes[inside], snr[inside]
            bright = snr >= 10
            true = np.c_[boxes[:, 1], boxes[:, 0]]
            pred = np.c_[d["y"], d["x"]]
            ti, pj, _ = metrics.match_positions(true, pred, 2.0)
            # detections matched to fainter real objects count neither for nor against purity
            n_true += int(bright.sum())
            n_tp += int(bright[ti].sum())
            n_pred += len(pred) - (len(ti) - int(bright[ti].sum()))
        s = metrics.detection_scores(n_true, n_pred, n_tp)
        return {"completeness": s["completeness"], "purity": s["purity"], "f1": s["f1"]}


RECIPES = {"clumps": ClumpRecipe, "deblend": DeblendRecipe, "detect": DetectRecipe,
           "morphology": MorphologyRecipe}  # regression recipe: models/morphology.py


def _forward_batched(model, x, batch: int = 32):
    outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


# --------------------------------------------------------------------------------------------- the loop

def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda': no CUDA device is visible; use --device auto or cpu.")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _to(obj, device):
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj.to(device) if hasattr(obj, "to") else obj


def train(config: TrainConfig | dict, out_dir: str, resume: bool = False, progress: bool = True) -> dict:
    """Train one model; returns the model card of the best weights (``out_dir/<kind>.safetensors``)."""
    from deepmosaic.pipeline.execute import Progress

    from .weights_io import save_model
    cfg = config if isinstance(config, TrainConfig) else from_mapping(TrainConfig, config, where="train")
    recipe = RECIPES[cfg.kind](cfg.data)
    os.makedirs(out_dir, exist_ok=True)
    device = pick_device(cfg.device)
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build(recipe.arch, **{**recipe.default_model, **(cfg.model or {})})
    if cfg.init:
        from .weights_io import load_model
        recipe.init_from(model, load_model(cfg.init))
    model = model.to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * cfg.steps_per_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    state = {"epoch": 0, "best": -np.inf, "best_metrics": None, "bad_epochs": 0, "history": [], "seconds": 0.0}
    if resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = json.loads(ck["state"])
        log.info("resumed %s training at epoch %d", cfg.kind, state["epoch"])
    val = recipe.batch("val", cfg.seed, cfg.val_size)
    t0 = time.perf_counter() - state["seconds"]
    best_path = os.path.join(out_dir, f"{cfg.kind}_best_state.pt")
    pool, pool_generation = None, -1
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        generation = epoch // cfg.pool_epochs
        if pool is None or pool_generation != generation:
            pool = recipe.pool(cfg.seed, generation, cfg.pool_size)
            pool_generation = generation
        model.train()
        bar = Progress(cfg.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}") if progress else None
        running = 0.0
        for step in range(cfg.steps_per_epoch):
            batch = pool.batch(cfg.batch_size, step=epoch * cfg.steps_per_epoch + step)
            x, y = recipe.inputs_targets(batch)
            x, y = _to(x, device).contiguous(memory_format=torch.channels_last), _to(y, device)
            with autocast:
                loss = recipe.loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            if bar:
                bar.update()
        if bar:
            bar.close()
        model.eval()
        scores = recipe.evaluate(model, val)
        state["epoch"] = epoch + 1
        state["seconds"] = time.perf_counter() - t0
        state["history"].append({"epoch": epoch + 1, "loss": running / cfg.steps_per_epoch, **scores,
                                 "minutes": state["seconds"] / 60})
        score = scores[recipe.score_name]
        log.info("epoch %d: loss %.4f, validation %s", epoch + 1, running / cfg.steps_per_epoch,
                 ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        if score > state["best"]:
            state.update(best=score, best_metrics=scores, bad_epochs=0, best_epoch=epoch + 1)
            torch.save(model.state_dict(), best_path)
        else:
            state["bad_epochs"] += 1
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "state": json.dumps(state)}, ckpt_path)
        if state["bad_epochs"] >= cfg.patience:
            log.info("early stopping: no better %s for %d epochs", recipe.score_name, cfg.patience)
            break
        if state["seconds"] > cfg.max_minutes * 60:
            log.info("time budget of %.1f min reached", cfg.max_minutes)
            break
    model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    card = {"training_set": {"kind": recipe.data_kind, "config": to_dict(recipe.data_config),
                             "seed_streams": "train: SeedSequence per step from the run seed; val: split 'val'"},
            "seed": cfg.seed, "metrics": state["best_metrics"],
            "description": f"deepmosaic {cfg.kind} network trained by `deepmosaic train {cfg.kind}`",
            "extra": {"train_config": to_dict(cfg), "epochs_run": state["epoch"], "best_epoch": state.get("best_epoch"),
                      "minutes": round(state["seconds"] / 60, 2), "device": device.type,
                      "history": state["history"]}}
    card["extra"]["init_sha256"] = _init_sha(cfg.init)
    return save_model(model, os.path.join(out_dir, cfg.kind), card, dtype=cfg.weights_dtype, overwrite=True)


def _init_sha(init):
    if not init:
        return None
    from .weights_io import read_card
    return read_card(init).get("weights", {}).get("sha256")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
