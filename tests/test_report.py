"""The HTML report: it runs, its images exist and open, its links are relative, one table row per stage."""
from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import zarr
from PIL import Image

from deepmosaic.pipeline import store as st
from deepmosaic.pipeline.errors import StoreError
from deepmosaic.pipeline.evaluate import evaluate_store
from deepmosaic.pipeline.report import default_report_dir, make_report

from conftest import simulated_run

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """A 512^2 simulated field run through sep and photutils, plus a fake third stage (a copy of sep)."""
    f = simulated_run(tmp_path_factory.mktemp("reportfield"), seed=2)
    store = f["store"]
    st.write_catalog(str(store), "copy_of_sep", st.read_catalog(str(store), "sep"), {})
    seg = zarr.open_array(f"{store}/maps/sep/segmentation", mode="r")[...]
    g = zarr.open_group(str(store), mode="r+")["maps"].require_group("copy_of_sep")
    a = g.create_array("segmentation", shape=seg.shape, dtype="int64", chunks=(256, 256), fill_value=0)
    a[...] = seg
    return f


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.imgs, self.rows = [], [], []
        self._table = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "table":
            self._table = a.get("class")
        if tag == "tr" and self._table == "summary" and a.get("class") == "stage":
            self.rows.append([])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self.rows and self._table == "summary" and data.strip() and len(self.rows[-1]) == 0:
            self.rows[-1].append(data.strip())


@pytest.fixture(scope="module")
def report(field, tmp_path_factory):
    evaluate_store(field["store"], field["truth"])
    out = tmp_path_factory.mktemp("report") / "html"
    index = make_report(field["store"], out_dir=out)
    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    return {"index": index, "dir": out, "parsed": parser}


def test_report_images_exist_and_open(report):
    imgs = report["parsed"].imgs
    names = {Path(s).name for s in imgs}
    assert {"curves_mag.png", "curves_snr.png", "iou_hist.png", "flux_residual.png", "gallery_sep.png",
            "gallery_photutils.png", "gallery_copy_of_sep.png"} <= names
    for src in imgs:
        path = report["dir"] / src
        assert path.is_file(), src
        assert path.suffix == ".png"
        with Image.open(path) as im:
            im.load()
            assert im.width > 100 and im.height > 100
            px = np.asarray(im.convert("L"))
            assert px.std() > 5  # not a blank canvas


def test_report_links_are_relative(report):
    links = report["parsed"].links
    assert links  # images and summary.json at least
    for link in links:
        u = urlparse(link)
        assert not u.scheme and not u.netloc, link
        assert not link.startswith(("/", "\\")), link
        assert ".." not in Path(u.path).parts, link
        assert (report["dir"] / u.path).exists(), link


def test_report_has_one_row_per_stage(report):
    rows = [r[0] for r in report["parsed"].rows]
    assert rows == ["sep", "photutils", "copy_of_sep"]
    html = report["index"].read_text(encoding="utf-8")
    assert 'class="versus"' in html  # the non-baseline stage is compared with the baselines
    assert (report["dir"] / "summary.json").is_file()


def test_report_needs_an_evaluation(field, tmp_path):
    store = tmp_path / "fresh.zarr"
    shutil.copytree(field["store"], store)
    shutil.rmtree(store / "reports")
    zarr.open_group(str(store), mode="r+").require_group("reports")
    with pytest.raises(StoreError, match="deepmosaic evaluate"):
        make_report(store, out_dir=tmp_path / "r")
    # with --truth the CLI evaluates first; default folder: fresh_report beside fresh.zarr
    from deepmosaic.workflows.cli import main
    assert main(["report", str(store), "--truth", field["truth"]]) == 0
    out = default_report_dir(store)
    assert out == tmp_path / "fresh_report"
    assert (out / "index.html").is_file() and (out / "gallery_sep.png").is_file()
    assert set(zarr.open_group(str(store), mode="r")["reports"].group_keys()) == {"sep", "photutils",
                                                                                   "copy_of_sep"}


def test_report_renders_in_a_headless_browser(report, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed: the page is only checked by parsing, not rendered")
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           f"--screenshot={shot}", "--window-size=1280,2400", report["index"].resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    with Image.open(shot) as im:
        px = np.asarray(im.convert("L"))
    assert px.size and px.std() > 5  # something besides a white page
    assert (px < 128).mean() > 0.005  # dark pixels: text and figures
