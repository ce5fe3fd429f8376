"""Galaxy morphology regression: a small CNN with Gaussian (mean, sigma) heads trained by negative log-likelihood.

Inputs (:func:`prepare_inputs`): a stamp in units of the pixel noise sigma (background subtracted) is divided by
its own brightness scale ``s = max(1, peak of the 3x3 box-smoothed centre)``, so bright and faint galaxies
look alike while the noise level (``1 / s``) still tells the network the S/N; ``log s``, the PSF FWHM (px)
and Moffat beta ride along as constant planes (channels 1..3), read by the head, not by the convolutions.

Outputs (:meth:`MorphNet.forward`): ``[B, 11]`` raw values, decoded by :func:`decode`: means of
``log hlr`` (px, circularised, pre-PSF), ``log n`` (single-Sersic index), ``q``, ``cos 2 theta``,
``sin 2 theta``, ``B/T`` (of an n=4 bulge + n=1 disk model), and log sigmas of ``log hlr``, ``log n``, ``q``,
the angle components (one shared sigma) and ``B/T``. ``n`` is learned only from single-Sersic stamps and B/T
only from bulge + disk stamps (masked likelihood), so each answers "if the galaxy were such a model".
A buffer ``sigma_scale`` (``[cal_bins, 5]``: one factor per sigma in each of ``cal_bins`` bins of the log
brightness scale, i.e. of S/N; 1 until calibrated; bin edges in the buffer ``cal_edges``) rescales the sigmas
so that the 68 % intervals cover 68 % of a held-out validation set in every bin (:func:`calibrate`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepmosaic.pipeline.config import field, from_mapping, require, to_dict

from .registry import register

#: decoded parameter names (the catalog columns; each has ``<name>_err``)
PARAMS = ("r_half", "sersic_n", "q", "pa", "bulge_frac")
#: number of sigma heads: log hlr, log n, q, angle components, B/T
N_SIGMA = 5
#: constant planes after the image: log brightness scale, PSF FWHM / 4 px, (beta - 3.5)
N_SCALARS = 3


#: column of the bulge + disk logit in the raw output of a network with ``bd_head``
BD_COLUMN = 6 + N_SIGMA


def split_raw(raw: torch.Tensor):
    """Raw outputs -> ``(means [B, 6], log sigmas [B, 5] clamped to [-7, 3], bulge + disk logit [B] or None)``:
    the one place that knows the output layout."""
    bd = raw[:, BD_COLUMN] if raw.shape[1] > BD_COLUMN else None
    return raw[:, :6], raw[:, 6:BD_COLUMN].clamp(-7.0, 3.0), bd


@dataclass(frozen=True)
class MorphNetConfig:
    """Architecture of a :class:`MorphNet` (saved in the model card)."""

    stamp_size: int = field(48, "stamp side in px (must be a multiple of 8)")
    channels: tuple[int, ...] = field((24, 32, 48, 80, 80, 128, 128),
                                      "widths of the 7 conv layers: 1 at full size, 1 stride-2, 1 at 1/2, "
                                      "2 at 1/4, 2 at 1/8 resolution")
    hidden: int = field(192, "width of the MLP head")
    dropout: float = field(0.0, "dropout before the last layer")
    cal_bins: int = field(1, "bins of the log brightness scale (S/N) with their own sigma calibration factors")
    bd_head: bool = field(False, "one more output: the logit of 'a bulge + disk galaxy' (trained with binary "
                                 "cross-entropy beside the NLL), which also teaches the shared features to tell "
                                 "the two kinds apart")

    def validate(self, where: str = "morphnet") -> None:
        require(self.stamp_size >= 16 and self.stamp_size % 8 == 0, where, "stamp_size", self.stamp_size,
                "use a multiple of 8 >= 16, e.g. 48.")
        require(len(self.channels) == 7 and all(int(c) >= 1 for c in self.channels), where, "channels",
                self.channels, "give 7 positive widths.")
        require(self.hidden >= 1, where, "hidden", self.hidden, "use at least 1.")
        require(0.0 <= self.dropout < 1.0, where, "dropout", self.dropout, "use a value in [0, 1).")
        require(isinstance(self.cal_bins, int) and 1 <= self.cal_bins <= 32, where, "cal_bins", self.cal_bins,
                "an integer in [1, 32], e.g. 4.")

    def to_dict(self) -> dict:
        return to_dict(self)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@register("morphnet", MorphNetConfig)
class MorphNet(nn.Module):
    """7 conv layers + MLP head -> 6 means and 5 log sigmas (see the module docstring)."""

    def __init__(self, config: MorphNetConfig | dict | None = None):
        super().__init__()
        if not isinstance(config, MorphNetConfig):
            config = from_mapping(MorphNetConfig, dict(config or {}), where="morphnet")
        config.validate()
        self.config = config
        c = [int(v) for v in config.channels]
        self.features = nn.Sequential(
            _conv(1, c[0]), _conv(c[0], c[1], 2), _conv(c[1], c[2]), nn.MaxPool2d(2),
            _conv(c[2], c[3]), _conv(c[3], c[4]), nn.MaxPool2d(2), _conv(c[4], c[5]), _conv(c[5], c[6]),
            nn.AdaptiveAvgPool2d(3))
        self.head = nn.Sequential(
            nn.Linear(9 * c[6] + N_SCALARS, config.hidden), nn.ReLU(inplace=True),
            nn.Linear(config.hidden, config.hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout),
            nn.Linear(config.hidden, BD_COLUMN + int(bool(config.bd_head))))
        self.register_buffer("sigma_scale", torch.ones(config.cal_bins, N_SIGMA))
        self.register_buffer("cal_edges", torch.zeros(max(config.cal_bins - 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, 1 + N_SCALARS, S, S] (:func:`prepare_inputs`) -> raw ``[B, 11]`` (``[B, 12]`` with
        ``bd_head``: the last column is the bulge + disk logit)."""
        s = self.config.stamp_size
        if x.ndim != 4 or x.shape[1] != 1 + N_SCALARS or x.shape[-2:] != (s, s):
            raise ValueError(f"MorphNet input of shape {tuple(x.shape)}: expected [B, {1 + N_SCALARS}, {s}, {s}] "
                             "from deepmosaic.models.morphology.prepare_inputs.")
        f = self.features(x[:, :1]).flatten(1)
        return self.head(torch.cat([f, x[:, 1:, 0, 0]], dim=1))

    def mean_sigma(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means [B, 6] and calibrated sigmas [B, 5] (sigmas clamped to exp([-7, 3]) before the scale)."""
        mu, log_sig, _ = split_raw(self(x))
        if self.config.cal_bins > 1:
            scale = self.sigma_scale[torch.bucketize(x[:, 1, 0, 0].contiguous(), self.cal_edges)]
        else:
            scale = self.sigma_scale[0]
        return mu, torch.exp(log_sig) * scale

    def bd_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Probability [B] that each stamp is a bulge + disk galaxy (needs ``bd_head``)."""
        if not self.config.bd_head:
            raise ValueError("MorphNet.bd_prob: this network has no bulge + disk head (config bd_head=False).")
        return torch.sigmoid(split_raw(self(x))[2])


# ------------------------------------------------------------------------------------------- inputs

def brightness_scale(stamps: np.ndarray) -> np.ndarray:
    """Per-stamp scale ``max(1, peak of the 3x3 box-smoothed central 9x9 px)`` of stamps in noise units."""
    a = np.asarray(stamps, np.float32)
    s = a.shape[-1]
    c = s // 2
    win = a[..., c - 5:c + 5, c - 5:c + 5]
    sm = sum(win[..., i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9.0
    return np.maximum(sm.reshape(*a.shape[:-2], -1).max(-1), 1.0)


def prepare_inputs(stamps: np.ndarray, psf_fwhm, psf_beta) -> np.ndarray:
    """Network input from stamps in units of the pixel noise sigma.

    Parameters
    ----------
    stamps : array [B, S, S] or [B, 1, S, S]
        Background-subtracted stamps divided by the noise sigma, the galaxy near the centre ``(S-1)/2``.
    psf_fwhm, psf_beta : float or array [B]
        PSF FWHM (px) and Moffat beta.

    Returns
    -------
    float32 [B, 1 + N_SCALARS, S, S]
    """
    a = np.asarray(stamps, np.float32)
    if a.ndim == 4:
        a = a[:, 0]
    n, s = a.shape[0], a.shape[-1]
    scale = brightness_scale(a)
    out = np.empty((n, 1 + N_SCALARS, s, s), np.float32)
    out[:, 0] = a / scale[:, None, None]
    scalars = np.stack([np.log(scale), np.broadcast_to(np.asarray(psf_fwhm, np.float32), (n,)) / 4.0,
                        np.broadcast_to(np.asarray(psf_beta, np.float32), (n,)) - 3.5], axis=1)
    out[:, 1:] = scalars[:, :, None, None]
    return out


# ------------------------------------------------------------------------------------------- targets

def targets(batch: dict) -> np.ndarray:
    """``[B, 8]``: log hlr, log n, q, cos 2theta, sin 2theta, B/T, n-mask (single Sersic), B/T-mask (bulge+disk)."""
    th = np.radians(np.asarray(batch["angle"], np.float64)) * 2.0
    bd = np.asarray(batch["is_bd"], bool)
    return np.stack([np.log(batch["hlr"]), np.log(batch["sersic_n"]), batch["q"], np.cos(th), np.sin(th),
                     batch["bulge_frac"], (~bd).astype(np.float64), bd.astype(np.float64)], 1).astype(np.float32)


#: weight of the bulge + disk classification loss beside the NLL (networks with ``bd_head``)
BD_LOSS_WEIGHT = 1.0


def nll(raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean Gaussian negative log-likelihood (constant dropped) of raw outputs against :func:`targets`; with a
    bulge + disk logit (a 12th column), plus ``BD_LOSS_WEIGHT`` times its binary cross-entropy."""
    mu, log_sig, bd_logit = split_raw(raw)
    # sigma per mean: log hlr, log n, q, cos, sin (shared), B/T
    ls = torch.stack([log_sig[:, 0], log_sig[:, 1], log_sig[:, 2], log_sig[:, 3], log_sig[:, 3], log_sig[:, 4]], 1)
    term = 0.5 * ((y[:, :6] - mu) * torch.exp(-ls)) ** 2 + ls
    w = torch.ones_like(term)
    w[:, 1] = y[:, 6]
    w[:, 5] = y[:, 7]
    loss = (term * w).sum() / w.sum()
    if bd_logit is not None:
        loss = loss + BD_LOSS_WEIGHT * nn.functional.binary_cross_entropy_with_logits(bd_logit, y[:, 7])
    return loss


def decode(mu: np.ndarray, sig: np.ndarray) -> dict[str, np.ndarray]:
    """Catalog values from means [B, 6] and sigmas [B, 5].

    Returns ``r_half`` (px) and ``sersic_n`` with 1-sigma errors from the log-space sigma (``value * sigma``),
    ``q`` (clipped to [0.05, 1]), ``pa`` (deg, [0, 180), counter-clockwise from +x) with ``pa_err`` =
    ``sigma_e / (2 |e|)`` in degrees (capped at 90), ``bulge_frac`` (clipped to [0, 1]), each with ``*_err``.
    """
    mu = np.asarray(mu, np.float64)
    sig = np.asarray(sig, np.float64)
    r = np.exp(mu[:, 0])
    n = np.exp(mu[:, 1])
    emag = np.hypot(mu[:, 3], mu[:, 4])
    pa = (np.degrees(0.5 * np.arctan2(mu[:, 4], mu[:, 3]))) % 180.0
    pa_err = np.minimum(np.degrees(sig[:, 3] / (2.0 * np.maximum(emag, 1e-6))), 90.0)
    return {"r_half": r, "r_half_err": r * sig[:, 0], "sersic_n": n, "sersic_n_err": n * sig[:, 1],
            "q": np.clip(mu[:, 2], 0.05, 1.0), "q_err": sig[:, 2], "pa": pa, "pa_err": pa_err,
            "bulge_frac": np.clip(mu[:, 5], 0.0, 1.0), "bulge_frac_err": sig[:, 4]}


@torch.no_grad()
def predict(model: MorphNet, x: np.ndarray, batch_size: int = 256, device: str | torch.device = "cpu"
            ) -> tuple[np.ndarray, np.ndarray]:
    """Means [B, 6] and calibrated sigmas [B, 5] for prepared inputs ``x``, in batches."""
    model.eval()
    model.to(memory_format=torch.channels_last)    # ~1.5x faster convolutions on CPU
    mus, sigs = [], []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).to(device)
        xb = xb.contiguous(memory_format=torch.channels_last)
        m, s = model.mean_sigma(xb)
        mus.append(m.float().cpu().numpy())
        sigs.append(s.float().cpu().numpy())
    if not mus:
        return np.zeros((0, 6), np.float32), np.zeros((0, N_SIGMA), np.float32)
    return np.concatenate(mus), np.concatenate(sigs)


# ------------------------------------------------------------------------------------------- scoring

def errors_vs_truth(pred: dict, batch: dict) -> dict[str, np.ndarray]:
    """Per-galaxy errors of decoded predictions against a morphology batch's truth (NaN where not scored):
    :func:`deepmosaic.pipeline.eval_morphology.galaxy_errors` (``r_rel``, ``n_rel``, ``q_abs``, ``pa_abs``,
    ``bt_abs`` and the 68 % interval hits ``r_in``, ``n_in``, ``q_in``, ``pa_in``, ``bt_in``)."""
    from deepmosaic.pipeline.eval_morphology import galaxy_errors
    return galaxy_errors(pred, batch)


# ------------------------------------------------------------------------------------------- calibration

#: which decoded-error column tests each sigma head
_CAL_COLUMNS = ("r_in", "n_in", "q_in", "pa_in", "bt_in")


def calibrate(model, x: np.ndarray, batch: dict, target: float = 0.6827) -> np.ndarray:
    """Set ``model.sigma_scale`` so that each parameter's 68 % interval covers ``target`` of the validation
    stamps ``x`` (prepared) with truth ``batch``, separately in each of the model's calibration bins (equal
    counts of the log brightness scale, edges stored in ``model.cal_edges``): per bin and head, the smallest
    factor (bisection in log) whose coverage reaches the target. Returns the factors ``[bins, 5]``."""
    shape = tuple(model.sigma_scale.shape)
    n_bins = shape[0] if len(shape) == 2 else 1
    model.sigma_scale.fill_(1.0)
    mu, sig = predict(model, x)
    which = np.zeros(len(x), int)
    if n_bins > 1:
        ls = np.asarray(x[:, 1, 0, 0], np.float64)
        edges = np.quantile(ls, np.arange(1, n_bins) / n_bins)
        model.cal_edges.copy_(torch.from_numpy(edges).to(model.cal_edges.dtype))
        which = np.searchsorted(model.cal_edges.numpy().astype(np.float64), ls, side="left")  # == bucketize
    scales = np.ones((n_bins, N_SIGMA))
    for b in range(n_bins):
        sel = which == b
        sub = {k: np.asarray(v)[sel] for k, v in batch.items()}
        for k, col in enumerate(_CAL_COLUMNS):
            lo, hi = math.log(0.05), math.log(20.0)
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                s2 = sig[sel].copy()
                s2[:, k] *= math.exp(mid)
                cov = np.nanmean(errors_vs_truth(decode(mu[sel], s2), sub)[col])
                lo, hi = (mid, hi) if cov < target else (lo, mid)
            scales[b, k] = math.exp(hi)
    model.sigma_scale.copy_(torch.from_numpy(scales.reshape(shape)).to(model.sigma_scale.dtype))
    return scales


_CAL_BUFFERS = ("sigma_scale", "cal_edges")


def load_trained(model, state: dict, where: str) -> None:
    """Every trained tensor of ``state`` into ``model``, strictly, except the calibration buffers, which are
    left as they are in ``model`` (their shape follows its ``cal_bins``, whatever the source had)."""
    state = {k: v for k, v in state.items() if k not in _CAL_BUFFERS}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:     # a tensor of another shape (other widths)
        raise ValueError(f"{where}: tensors do not fit this MorphNet's config ({e})") from None
    if set(missing) - set(_CAL_BUFFERS) or unexpected:
        raise ValueError(f"{where}: tensors do not fit a MorphNet: missing {missing}, unexpected {unexpected}")


def coverage_per_bin(model, x: np.ndarray, batch: dict) -> list[dict]:
    """Fraction of truths inside each parameter's 68 % interval (``_CAL_COLUMNS``) in each of the model's
    calibration bins (as :meth:`MorphNet.mean_sigma` picks them), with the bin's stamp count ``n``."""
    err = errors_vs_truth(decode(*predict(model, x)), batch)
    n_bins = model.sigma_scale.shape[0] if model.sigma_scale.ndim == 2 else 1
    ls = torch.from_numpy(np.ascontiguousarray(x[:, 1, 0, 0]))
    which = torch.bucketize(ls, model.cal_edges).numpy() if n_bins > 1 else np.zeros(len(x), int)
    out = []
    for b in range(n_bins):
        sel = which == b
        out.append({"n": int(sel.sum()), **{c: round(float(np.nanmean(err[c][sel])), 4) for c in _CAL_COLUMNS}})
    return out


def calibrate_weights(src, dst, n: int = 8000, seed: int = 7, bins: int = 6, population=None,
                      description: str | None = None, extra: dict | None = None) -> dict:
    """Calibrate the sigmas of trained weights ``src`` on ``n`` fresh validation stamps and save them as ``dst``.

    The stamps are ``make_morph_batch(population, seed, n, split='val')``, ``population`` by default
    :func:`~deepmosaic.models.morph_data.mosaic_population` (the galaxies and PSF of the simulated mosaics the
    stage is used on, S/N 10-500), not the broader training ranges, whose intervals would be too wide here.
    The 'val' split never shares a draw with the training pool or the benchmark's 'test' split; use a seed
    that no training run used for validation. Each parameter's sigma gets its own factor in each of ``bins``
    bins (equal counts) of the log brightness scale (the network's S/N input). The card keeps the source's
    training set, seed and history, and records the calibration set (config, seed, split, n), the factors,
    the bin edges and the coverage before and after, per bin, plus ``extra``.
    """
    from safetensors.torch import load_file

    from .morph_data import _config, make_morph_batch, mosaic_population
    from .registry import build
    from .weights_io import WeightsError, _base, _sha256, _with, read_card, save_model
    card = read_card(src)
    path = _with(_base(src), ".safetensors")
    if _sha256(path) != card["weights"]["sha256"]:
        raise WeightsError(f"{path}: sha256 differs from its card's; refusing to calibrate it.")
    model = build("morphnet", **{**card["config"], "cal_bins": int(bins)})
    load_trained(model, {k: v.float() for k, v in load_file(str(path)).items()}, str(src))
    model.eval()
    cfg = mosaic_population() if population is None else _config(population)
    batch = make_morph_batch(cfg, seed=seed, n=n, split="val")
    x = prepare_inputs(batch["image"], batch["psf_fwhm"], batch["psf_beta"])
    scales = calibrate(model, x, batch)   # sets the bin edges too
    after = coverage_per_bin(model, x, batch)
    model.sigma_scale.fill_(1.0)
    before = coverage_per_bin(model, x, batch)
    model.sigma_scale.copy_(torch.from_numpy(scales).to(model.sigma_scale.dtype))
    extra = {**(card.get("extra") or {}), **(extra or {})}
    extra["calibration"] = {"heads": list(_CAL_COLUMNS), "sigma_scale": np.round(scales, 4).tolist(),
                            "log_brightness_edges": model.cal_edges.tolist()[:bins - 1],
                            "set": {"kind": "morphology", "config": to_dict(cfg), "seed": seed, "split": "val",
                                    "n": n}, "coverage_before": before, "coverage_after": after}
    new = {"training_set": card.get("training_set"), "seed": card.get("seed"), "metrics": card.get("metrics"),
           "description": description or card.get("description"), "extra": extra}
    return save_model(model.to(memory_format=torch.contiguous_format), dst, new,
                      dtype=card["weights"].get("dtype", "float32"), overwrite=True)


# ------------------------------------------------------------------------------------------- training recipe

class MorphologyRecipe:
    """``deepmosaic train morphology``: MorphNet on :mod:`deepmosaic.models.morph_data` stamps (a pool of
    noise-free unit-S/N scenes, each batch with fresh S/N, flips and noise), Gaussian NLL. Validation score:
    minus the median |relative error| of the half-light radius at S/N >= 20 (higher is better); also the
    median |rel err| of n, the mean NLL and the B/T median absolute error."""

    arch = "morphnet"
    data_kind = "morphology"
    default_model: dict = {}
    score_name = "neg_r_med_rel"

    def __init__(self, data_config: dict | None):
        from . import morph_data
        self.morph_data = morph_data
        self.data_config = from_mapping(morph_data.MorphSetConfig, data_config or {},
                                        where="train.data (morphology)").validate()

    def batch(self, split: str, seed: int, n: int) -> dict:
        return self.morph_data.make_morph_batch(self.data_config, seed=seed, n=n, split=split)

    def pool(self, seed: int, generation: int, size: int):
        return self.morph_data.MorphPool(self.data_config, seed=seed, size=size, split="train",
                                         start=generation * size)

    def init_from(self, model, source) -> None:
        """``train.init``: continue from a trained MorphNet (every tensor, strictly; the calibration buffers
        are not taken, so a calibrated source with any number of bins fits a new network; sigmas unscaled).
        A network with ``bd_head`` starts from one without it as the same regression (the new output's
        weights at zero: probability 0.5)."""
        state = dict(source.state_dict())
        last = f"head.{len(model.head) - 1}"
        own = model.state_dict()
        if own[f"{last}.weight"].shape[0] == state[f"{last}.weight"].shape[0] + 1:
            for k in ("weight", "bias"):
                grown = torch.zeros_like(own[f"{last}.{k}"])
                grown[:-1] = state[f"{last}.{k}"]
                state[f"{last}.{k}"] = grown
        load_trained(model, state, "train.init")
        model.sigma_scale.fill_(1.0)

    def inputs_targets(self, batch: dict):
        x = prepare_inputs(batch["image"], batch["psf_fwhm"], batch["psf_beta"])
        return torch.from_numpy(x), torch.from_numpy(targets(batch))

    def loss(self, model, x, y):
        return nll(model(x), y)

    @torch.no_grad()
    def evaluate(self, model, batch: dict) -> dict:
        x, y = self.inputs_targets(batch)
        raw = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
        loss = float(nll(raw, y))
        mu, log_sig, bd_logit = split_raw(raw)
        mu, sig = mu.numpy(), torch.exp(log_sig).numpy()
        err = errors_vs_truth(decode(mu, sig), batch)
        good = np.asarray(batch["snr"]) >= 20
        r_med = float(np.median(np.abs(err["r_rel"][good])))
        out = {"neg_r_med_rel": -r_med, "r_med_rel": r_med,
               "n_med_rel": float(np.nanmedian(np.abs(err["n_rel"][good]))),
               "bt_med_abs": float(np.nanmedian(err["bt_abs"][good])), "nll": loss}
        if bd_logit is not None:
            from deepmosaic.pipeline.metrics import roc_auc
            bright = np.asarray(batch["snr"]) >= 100
            out["bd_auc_snr100"] = roc_auc(bd_logit.numpy()[bright], np.asarray(batch["is_bd"])[bright])
        return out


__all__ = ["MorphNet", "MorphNetConfig", "MorphologyRecipe", "PARAMS", "prepare_inputs", "brightness_scale",
           "targets", "nll", "decode", "predict", "errors_vs_truth", "calibrate", "calibrate_weights",
           "coverage_per_bin"]
