"""`dvc plots show` renders the training curves and CMC curves: the HTML is built by DVC from a
small fake metrics tree in a temporary git + DVC repo, opened in headless Chromium, and must show
one rendered chart per plot and no error.

Offline: DVC's page loads vega, vega-lite and vega-embed from a CDN; the test points those
<script> tags at local copies of the same builds (``build/vega/node_modules``, installed by
``.ci/run`` with npm, or a folder named by ``DMF_VEGA_JS``). Skipped, with the reason, when
Chromium or those files are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VEGA_FILES = {"vega": "vega/build/vega.min.js", "vega-lite": "vega-lite/build/vega-lite.min.js",
              "vega-embed": "vega-embed/build/vega-embed.min.js"}
NPM_HINT = ("npm install --prefix build/vega --legacy-peer-deps --ignore-scripts "
            "vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2")

# The top-level `plots:` section this test renders when dvc.yaml has none yet (the same text is
# proposed for dvc.yaml; once it is there, the test renders dvc.yaml's own section).
DEFAULT_PLOTS = yaml.safe_load("""
plots:
  - metrics/plots/train:
      template: train_curves
      x: epoch
      y: [loss, id_loss, triplet_loss, align_loss, lr]
  - metrics/plots/cmc:
      template: simple
      x: rank
      y: cmc
""")["plots"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _vega_dir() -> Path | None:
    for base in (os.environ.get("DMF_VEGA_JS"), ROOT / "build" / "vega" / "node_modules"):
        if base and all((Path(base) / rel).is_file() for rel in VEGA_FILES.values()):
            return Path(base)
    return None


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _plots_section() -> list:
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return dvc_yaml.get("plots") or DEFAULT_PLOTS


def _write_metrics(repo: Path) -> int:
    """Train curves of three stages and CMC curves of four cells, in the pipeline's formats."""
    from dmf_core.track import write_tsv
    from dmf_core.train.loop import CURVE_COLUMNS

    assert CURVE_COLUMNS == ["epoch", "loss", "id_loss", "triplet_loss", "align_loss", "attribute_loss",
                             "teacher_loss", "triplets_satisfied", "triplets_ordered", "lr"]
    rng = np.random.default_rng(0)
    for stage in ("pretrain", "finetune_sp_market", "finetune_sp_msmt"):
        rows = []
        for epoch in range(1, 9):
            id_loss, tri = 4.0 / epoch + rng.random() * 0.1, 1.0 / epoch
            rows.append({"epoch": epoch, "loss": id_loss + tri, "id_loss": id_loss, "triplet_loss": tri,
                         "align_loss": 0.0, "attribute_loss": 0.0, "teacher_loss": 0.0,
                         "triplets_satisfied": epoch / 10, "triplets_ordered": epoch / 10,
                         "lr": 1e-3 * (0.5 + 0.5 * np.cos(np.pi * epoch / 8))})
        write_tsv(repo / f"metrics/plots/train/{stage}.tsv", rows, CURVE_COLUMNS)
    cells = ["sp_market__sp_cuhk", "sp_market__sp_msmt", "sp_msmt__sp_cuhk", "sp_msmt__sp_market"]
    for cell in cells:
        cmc = np.sort(rng.random(50))
        rows = [{"rank": r + 1, "cmc": float(v)} for r, v in enumerate(cmc)]
        write_tsv(repo / f"metrics/plots/cmc/{cell}.tsv", rows, ["rank", "cmc"])
    return 3 + len(cells)


@pytest.fixture(scope="module")
def plots_html(tmp_path_factory) -> tuple[Path, int]:
    repo = tmp_path_factory.mktemp("plots_repo")
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    templates = ROOT / ".dvc" / "plots"
    if templates.is_dir():
        shutil.copytree(templates, repo / ".dvc" / "plots", dirs_exist_ok=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": _plots_section()}, sort_keys=False))
    expected = _write_metrics(repo)
    _run(["dvc", "plots", "show", "-o", "plots_out"], repo)
    html = repo / "plots_out" / "index.html"
    assert html.is_file()
    return html, expected


def test_dvc_builds_one_vega_plot_per_curve_file(plots_html):
    html, expected = plots_html
    text = html.read_text()
    assert len(re.findall(r"vegaEmbed\(", text)) == expected
    for name in ("finetune_sp_market.tsv", "pretrain.tsv", "sp_msmt__sp_cuhk.tsv"):
        assert name in text
    # losses and the learning rate of a stage are in one plot, on two panels
    assert '"lr"' in text and "learning rate" in text


def _localise(text: str, vega: Path) -> str:
    """Point DVC's CDN <script> tags at the local builds of the same packages."""
    for pkg, rel in VEGA_FILES.items():
        text, n = re.subn(rf"https://cdn\.jsdelivr\.net/npm/{re.escape(pkg)}@[0-9.]+", (vega / rel).as_uri(), text)
        assert n == 1, f"DVC's page no longer loads {pkg} from the CDN the way this test expects"
    return text


def test_chromium_renders_every_plot(plots_html, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian package `chromium`; .ci/run installs it)")
    vega = _vega_dir()
    if vega is None:
        pytest.skip(f"local vega/vega-lite/vega-embed builds missing (the page cannot load them offline): {NPM_HINT}")
    html, expected = plots_html
    local = html.with_name("offline.html")
    local.write_text(_localise(html.read_text(), vega))
    base = [chromium, *CHROMIUM_FLAGS, "--allow-file-access-from-files", "--virtual-time-budget=15000",
            "--enable-logging=stderr", "--v=0"]
    proc = subprocess.run([*base, f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", local.as_uri()],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dom = proc.stdout
    canvases = re.findall(r'<canvas width="(\d+)" height="(\d+)" class="marks"', dom)
    svgs = re.findall(r'<svg[^>]*class="marks"', dom)
    assert len(canvases) + len(svgs) == expected, dom[-3000:]
    assert all(int(w) > 100 and int(h) > 100 for w, h in canvases)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not [c for c in console if re.search(r"error|uncaught", c, re.I)], "\n".join(console)
    body = re.sub(r"<script.*?</script>", "", dom, flags=re.S)
    assert not re.search(r"\b(Error|error:)", body), body[:2000]

    shot = tmp_path / "plots.png"
    subprocess.run([*base, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1400,1800",
                    f"--screenshot={shot}", local.as_uri()], capture_output=True, timeout=90)
    from PIL import Image

    with Image.open(shot) as im:
        colours = len(set(im.convert("RGB").resize((280, 360)).getdata()))
    assert colours > 50, "the screenshot is (almost) blank"
