"""report.html opens in a real headless Chromium with every figure decoded (skipped only without a browser;
`apt-get install -y chromium` on Debian provides one)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layerzip.io import write_report
from layerzip.report import PLOTS

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium installed (apt-get install -y chromium)")


def rendered_images(page) -> tuple[int, int]:
    """(loaded, total) images, as counted by the page's own script after the browser's load event."""
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, dom[:500]
    return int(loaded.group(1)), int(total.group(1))


def analysis_of(source, out, calib, samples, seq_len):
    from layerzip.jobs import analyze_model
    analyze_model(source, out, calib, samples, seq_len, keep=0.5, progress=False)
    return out / "analysis.json"


@pytest.mark.slow
def test_minilm_report_renders(calib_file, tmp_path):
    path = analysis_of("minilm", tmp_path / "minilm", calib_file, 16, 64)
    assert rendered_images(tmp_path / "minilm" / "report.html") == (len(PLOTS), len(PLOTS))
    # plots come from the saved JSON alone: redraw elsewhere from the file
    files = write_report(path, tmp_path / "again")
    assert rendered_images(files["html"]) == (len(PLOTS), len(PLOTS))


@pytest.mark.slow
def test_gemma_report_renders(calib_file, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    data = pytest.importorskip("data", reason="bench/data.py not found")
    try:
        gemma = data.gemma_dir()
    except FileNotFoundError:
        pytest.skip("Gemma-3-270M not prepared (python bench/prepare.py)")
    analysis_of(str(gemma), tmp_path / "gemma", calib_file, 2, 64)
    assert rendered_images(tmp_path / "gemma" / "report.html") == (len(PLOTS), len(PLOTS))
    assert json.loads((tmp_path / "gemma" / "analysis.json").read_text())["num_blocks"] == 18


def test_broken_image_is_detected(tmp_path):
    """The check can fail: a page with a corrupt image reports fewer loaded than total."""
    from layerzip.report import CHECK_IMAGES
    page = tmp_path / "bad.html"
    page.write_text('<html><body><span id="image-check"></span>'
                    '<img src="data:image/png;base64,iVBORw0KGgoAAAAN"><img src="data:image/png;base64,'
                    'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==">'
                    + CHECK_IMAGES + '</body></html>')
    assert rendered_images(page) == (1, 2)
