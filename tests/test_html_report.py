"""dials.q_consistency.html opened in a real browser (headless Chromium through
selenium and Debian's chromedriver) with the network off: no JavaScript error,
every chart drawn with its traces, the verdict the same words as the log and
the JSON, and hovering a spot shows that reflection's Miller index.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from dials_qconsistency.command_line.q_consistency import main
from dials_qconsistency.io.refl import ReflectionTable
from conftest import EXAMPLES, SHARED_DATA

#: Charts of the page and the number of traces each must draw (the arrows chart:
#: the panels, the arrows and, beyond rounding, their heads).
TRACES = {"detector": 2, "arrows": 3, "components_fast": 3, "components_slow": 3, "vs_resolution": 1, "vs_image": 1,
          "histogram": 1}

#: Charts of stills only (the trumpet, Δ2θ against 2θ, the per-still RMS histogram).
STILLS_TRACES = {"trumpet": 1, "delta_two_theta": 1, "per_still": 1}

#: Charts of polychromatic (time-of-flight) data: |Δq| and the time-of-flight error against wavelength.
LAUE_TRACES = {"vs_wavelength": 1, "tof_vs_wavelength": 1}

#: (label, experiment list, table, options): stills, rotation, scan-varying, 64 panels, time of flight, the bundled examples.
PAIRS = [
    ("stills", os.path.join(SHARED_DATA, "ssx_CuNiR_test_data", "indexed"), []),
    ("rotation", os.path.join(SHARED_DATA, "dials_current", "centroid_refined"), []),
    ("scan-varying", os.path.join(SHARED_DATA, "quartz_processed", "refined"), []),
    ("64 panels", os.path.join(SHARED_DATA, "dials_current", "cspad_stills_refined"), []),
    ("time of flight", os.path.join(SHARED_DATA, "tof_sxd_nacl", "sxd_refined"), ["q_pixel.source=observed"]),
    ("example rotation", os.path.join(EXAMPLES, "rotation"), ["q_pixel.source=observed"]),
    ("example stills", os.path.join(EXAMPLES, "stills"), []),
]


@pytest.fixture(scope="module")
def browser():
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        reason = "headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
                     "--enable-unsafe-swiftshader", "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                           {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    yield driver
    driver.quit()


def open_report(driver, path):
    driver.get_log("browser")  # forget what the page before said
    driver.get("file://" + str(path))
    driver.execute_async_script(  # every chart drawn
        "const done = arguments[arguments.length - 1];"
        "const wait = () => (document.querySelectorAll('.chart').length && "
        "[...document.querySelectorAll('.chart')].every(c => c._fullLayout)) ? done() : setTimeout(wait, 50);"
        "wait();")


@pytest.mark.parametrize("label, stem, options", PAIRS, ids=[p[0] for p in PAIRS])
def test_the_report_opens_offline_and_says_what_the_log_says(browser, tmp_path, monkeypatch, label, stem, options):
    if stem.startswith(SHARED_DATA) and not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real DIALS data folder {SHARED_DATA} is absent (CI always has it)")
    monkeypatch.chdir(tmp_path)
    assert main([stem + ".expt", stem + ".refl", "output.json=qc.json", "output.reflections=None",
                 "backend=standalone", *options]) in (0, 2)
    report = tmp_path / "dials.q_consistency.html"
    assert report.stat().st_size < 10e6
    open_report(browser, report)

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    drawn = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.chart')].map(c => "
        "[c.id.slice(6), [c._fullData.length, c.querySelectorAll('.main-svg').length, c.querySelectorAll('canvas').length]]))")
    traces = {name: count for name, (count, _, _) in drawn.items()}
    arrows_title = browser.execute_script("return document.getElementById('chart-arrows')._fullLayout.title.text")
    traces["arrows"] += "none beyond rounding" in arrows_title  # no heads on arrows of rounding
    stills = "stills" in label or "64 panels" in label
    assert traces == {**TRACES, **(STILLS_TRACES if stills else {}), **(LAUE_TRACES if "time" in label else {})}
    assert all(svg > 0 for _, svg, _ in drawn.values())
    assert drawn["detector"][2] > 0  # the spots are WebGL: drawn into a canvas

    headline = json.load(open("qc.json"))["verdict"]["headline"]
    assert browser.find_element("id", "verdict").text == headline
    log = (tmp_path / "dials.q_consistency.log").read_text()
    assert f"Verdict: {headline}\n" in log
    notes = [line[len("Note: "):] for line in log.splitlines() if line.startswith("Note: ")]
    shown = [item.text for item in browser.find_elements("css selector", "#notes li")]
    assert shown == [note[0].upper() + note[1:] for note in notes]  # SXD's s0_cal note was left out

    # hovering a spot shows a Miller index of the table (which one: the next test)
    _, text = hover_the_most_isolated_spot(browser)
    hkl = tuple(int(v) for v in re.search(r"hkl \((-?\d+), (-?\d+), (-?\d+)\)", text).groups())
    assert hkl in {tuple(int(v) for v in row) for row in ReflectionTable.from_file(stem + ".refl").get("miller_index")}


def hover_the_most_isolated_spot(driver):
    """Move the mouse onto the spot farthest from any other (so that the hover
    is its own); (its point number, the hover label's text)."""
    from selenium.webdriver.common.action_chains import ActionChains

    point, dx, dy = driver.execute_script("""
        const c = document.getElementById('chart-detector'); c.scrollIntoView();
        const t = c._fullData[1], xa = c._fullLayout.xaxis, ya = c._fullLayout.yaxis;
        const P = Array.from(t.x, (x, i) => [xa._offset + xa.l2p(x), ya._offset + ya.l2p(t.y[i])]);
        let best = -1, far = -1;
        for (let i = 0; i < P.length; i++) {
          let near = Infinity;
          for (let j = 0; j < P.length; j++) if (j !== i) near = Math.min(near, Math.hypot(P[i][0] - P[j][0], P[i][1] - P[j][1]));
          if (near > far) { far = near; best = i; }
        }
        const r = c.getBoundingClientRect();
        return [best, P[best][0] - r.width / 2, P[best][1] - r.height / 2];""")
    chart = driver.find_element("id", "chart-detector")
    ActionChains(driver).move_to_element_with_offset(chart, int(round(dx)), int(round(dy))).perform()
    text = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; let tries = 0;"
        "const look = () => { const t = document.querySelector('#chart-detector .hoverlayer').textContent;"
        "  (t || tries++ > 40) ? done(t) : setTimeout(look, 25); }; look();")
    return point, text


@pytest.mark.parametrize("stem, remark", [
    (os.path.join(SHARED_DATA, "centroid_test_data", "indexed"), "not a failure: q_pred follows the observations"),
    (os.path.join(SHARED_DATA, "centroid_test_data", "experiments.json"),
     "The table's s1 agrees with neither spot position under these models")])
def test_the_report_gives_the_self_tests_as_the_log_does(tmp_path, monkeypatch, stem, remark):
    """After dials.index q_pred follows the observations: the log leaves
    |q_bragg - q_pred| out of its self-tests and says why, and so does the
    page now (it showed 1.081e-03 as a self-test); an s1 of other models is
    explained on both (the page did not say it)."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real DIALS data folder {SHARED_DATA} is absent (CI always has it)")
    monkeypatch.chdir(tmp_path)
    expt = stem if stem.endswith(".json") else stem + ".expt"
    refl = stem.replace("experiments.json", "integrated") + ".refl"
    main([expt, refl, "output.reflections=None", "backend=standalone"])
    log = (tmp_path / "dials.q_consistency.log").read_text()
    page = (tmp_path / "dials.q_consistency.html").read_text().replace("&#39;", "'")
    assert remark in log and f"Experiment 0: {remark}" in page
    row = re.search(r'<table id="self-tests">.*?</tr>\s*<tr>(.*?)</tr>', page, re.S).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    (tests,) = [line for line in log.splitlines() if line.startswith("  expt 0: |q_pixel(xyzcal) - q_pred|")]
    assert "|q_bragg - q_pred|" not in tests and cells[5] == "–", cells


def test_the_hover_names_the_reflection_it_is_on(browser, tmp_path, monkeypatch):
    """A known reflection: on the bundled stills every used row is drawn in table
    order, so the k-th spot is the k-th used row; its hover gives its hkl and panel."""
    monkeypatch.chdir(tmp_path)
    stem = os.path.join(EXAMPLES, "stills")
    assert main([stem + ".expt", stem + ".refl", "output.reflections=out.refl", "backend=standalone"]) == 0
    out = ReflectionTable.from_file(str(tmp_path / "out.refl"))
    used = np.flatnonzero(np.isfinite(out.get("delta_q.norm")))
    open_report(browser, tmp_path / "dials.q_consistency.html")
    k, text = hover_the_most_isolated_spot(browser)
    row = used[k]
    h, kk, l = (int(v) for v in out.get("miller_index")[row])
    assert f"hkl ({h}, {kk}, {l})" in text and f"panel {int(out.get('panel')[row])}," in text, (k, text)
    assert f"|Δq| {out.get('delta_q.norm')[row]:.3g}" in text
    assert "image" not in text  # a still has no image number (it read "image 0" for experiment 0)


def test_the_report_of_a_run_over_many_files(shared, browser, tmp_path, monkeypatch):
    """Three real pairs at once: the merged verdict as the log and JSON say it,
    the two charts drawn, every file in the table with the largest mean first."""
    pairs = [("ssx_CuNiR_test_data", "indexed"), ("quartz_processed", "refined"), ("dials_current", "cspad_stills_refined")]
    inputs = [shared(f, n + ext) for f, n in pairs for ext in (".expt", ".refl")]
    monkeypatch.chdir(tmp_path)
    assert main(inputs + ["output.json=qc.json", "output.reflections=None", "backend=standalone"]) == 0
    open_report(browser, tmp_path / "dials.q_consistency.html")
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    drawn = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.chart')].map(c => [c.id.slice(6), c._fullData.length]))")
    assert drawn == {"histogram": 1, "per_file": 1}
    report = json.load(open("qc.json"))
    images = len(report["images"])  # fewer than the 200 the table shows at most: its title says how many, no "at most"
    assert 10 < images < 200 and f"Images (stills: experiments), the largest mean |Δq| first ({images})" in (
        tmp_path / "dials.q_consistency.html").read_text()
    headline = report["verdict"]["headline"]
    assert browser.find_element("id", "verdict").text == headline.replace("  ", " ")
    assert f"Verdict: {headline}\n" in (tmp_path / "dials.q_consistency.log").read_text()
    rows = browser.execute_script(
        "return [...document.querySelectorAll('table.statistics')[0].querySelectorAll('tr')].slice(1)"
        ".map(r => [...r.children].map(c => c.textContent))")
    means = sorted(((f["delta_q"]["mean"], f["reflections"]) for f in report["files"]), reverse=True)
    assert [row[1] for row in rows] == [name for _, name in means]
    # the computation choices as the log gives them (quartz: a scan-varying sweep)
    (choices,) = [line for line in (tmp_path / "dials.q_consistency.log").read_text().splitlines()
                  if line.startswith("q_pixel from ")]
    assert "q_bragg at the calculated rotation angle; scan-varying model state: auto" in choices
    assert choices + "." in (tmp_path / "dials.q_consistency.html").read_text()


def test_the_residual_and_cell_tables_equal_a_direct_computation(shared, tmp_path, monkeypatch):
    """The CSPAD stills with observed positions: per quadrant the weighted RMSD and
    the correlations with Δψ from the written table's own columns, and the cell
    spread from the .expt's real-space axes, computed here directly."""
    from dials_qconsistency.report.residual_tables import residual_tables
    from dials_qconsistency.core.q_vectors import Options, compute_q, rows_used_in_refinement
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.io.expt import read_experiments

    expt, refl = shared("dials_current", "cspad_stills_refined.expt"), shared("dials_current", "cspad_stills_refined.refl")
    monkeypatch.chdir(tmp_path)
    assert main([expt, refl, "q_pixel.source=observed", "output.reflections=out.refl", "backend=standalone"]) == 0
    out = ReflectionTable.from_file(str(tmp_path / "out.refl"))
    flagged = ((out.get("flags") & 8) != 0) & np.isfinite(out.get("delta_q.norm"))
    xy, var = out.get("delta_q.xy.mm")[flagged], out.get("xyzobs.mm.variance")[flagged, :2]
    psi = np.degrees(out.get("delta_q.delpsi.rad")[flagged])
    experiments = read_experiments(expt)
    groups = experiments[0].detector.groups_at_depth(1)
    panel = out.get("panel")[flagged].astype(int)

    table = ReflectionTable.from_file(refl)
    columns = table.columns()
    result = compute_q(experiments, columns, table.identifiers, Options(q_pixel_source="observed"))
    about, _ = rows_used_in_refinement(result, columns["flags"])
    residuals, cells = residual_tables(experiments, about, decompose(experiments, about), columns["xyzobs.mm.variance"])
    rows = {row[0]: row for row in residuals["rows"]}
    for name, mine in [("all", np.ones(panel.size, bool))] + [(g.name, np.isin(panel, list(g.panels))) for g in groups]:
        weighted = 1000 * np.sqrt(np.sum(xy[mine] ** 2 / var[mine]) / np.sum(1 / var[mine]))
        assert rows[name][1] == int(mine.sum()) and float(rows[name][3]) == pytest.approx(weighted, abs=0.05)
        r_radial = np.corrcoef(out.get("delta_q.radial.mm")[flagged][mine], psi[mine])[0, 1]
        assert float(rows[name][4]) == pytest.approx(r_radial, abs=0.005)
    document = json.load(open(expt))
    a = np.array([np.linalg.norm(c["real_space_a"]) for c in document["crystal"]])
    assert cells["rows"][0][0] == "a (Å)" and float(cells["rows"][0][1]) == pytest.approx(a.mean(), abs=5e-5)
    assert float(cells["rows"][0][2]) == pytest.approx(a.std(), abs=5e-5)


def test_no_correlation_is_given_for_residuals_or_angles_of_rounding(shared):
    """At the calculated positions a consistent model's residuals are ~1e-14 mm,
    and at the calculated φ its Δφ ~1e-14°, even with observed positions:
    their correlation is that of rounding, so none is given. The CSPAD stills'
    observed residuals and Δψ (tens of µm, tenths of a degree) get theirs."""
    from dials_qconsistency.report.residual_tables import residual_tables
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.io.expt import read_experiments

    for name, source in (("centroid_refined", "calculated"), ("centroid_refined", "observed"),
                         ("cspad_stills_refined", "observed")):
        experiments = read_experiments(shared("dials_current", name + ".expt"))
        table = ReflectionTable.from_file(shared("dials_current", name + ".refl"))
        result = compute_q(experiments, table.columns(), table.identifiers, Options(q_pixel_source=source))
        parts = decompose(experiments, result)
        residuals = residual_tables(experiments, result, parts, None)[0]
        rms_mm = np.sqrt(np.nanmean(parts.radial_mm[result.used] ** 2))
        rms_deg = np.degrees(np.sqrt(np.nanmean(parts.angle[result.used] ** 2)))
        rounding = rms_mm < 1e-9 or rms_deg < 1e-9
        assert rounding == (name == "centroid_refined"), (name, source, rms_mm, rms_deg)
        cells = [cell for row in residuals["rows"] for cell in row[4:6]]
        assert set(cells) == {"–"} if rounding else all(cell != "–" for cell in cells), cells


def test_the_residual_sums_on_threads_are_the_same_floats(shared, monkeypatch):
    """The residual tables' per-group sums of 50-row blocks summed by three
    threads are added in block order: one thread's floats exactly."""
    from concurrent.futures import ThreadPoolExecutor

    from dials_qconsistency.core import blocks
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.io.expt import read_experiments
    from dials_qconsistency.report.residual_tables import _group_sums

    expt, refl = shared("dials_current", "cspad_stills_refined.expt"), shared("dials_current", "cspad_stills_refined.refl")
    experiments = read_experiments(expt)
    table = ReflectionTable.from_file(refl)
    columns = table.columns()
    result = compute_q(experiments, columns, table.identifiers, Options(q_pixel_source="observed"))
    parts = decompose(experiments, result)
    used = np.flatnonzero(result.used)
    label = result.panel[used] % 4
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 50)
    one = _group_sums(result, parts, columns["xyzobs.mm.variance"], used, label, 4)
    with ThreadPoolExecutor(3) as pool:
        three = _group_sums(result, parts, columns["xyzobs.mm.variance"], used, label, 4, pool)
    assert used.size > 1000 and one["w"][:4].min() > 0
    for name, values in one.items():
        assert values.tobytes() == three[name].tobytes(), name


def test_the_weighted_rmsd_weights_each_row_by_its_variances():
    """The detector_residuals-style weighted RMSD, from sums over blocks: a row
    whose σ² is infinite on one axis still counts (weight 0 there), a row with
    a σ² of 0 does not; the value is sqrt(Σ(x²/σx² + y²/σy²) / Σ(1/σx² + 1/σy²))."""
    from types import SimpleNamespace

    from dials_qconsistency.report.residual_tables import _group_sums

    xy = np.array([[0.01, 0.02], [0.03, -0.04], [-0.02, 0.01], [0.5, 0.5]])
    variance = np.array([[1e-4, 1e-4, 0], [np.inf, 4e-4, 0], [1e-4, 1e-4, 0], [0.0, 1e-4, 0]])
    parts = SimpleNamespace(delta_xy=xy, angle=np.zeros(4), radial_mm=np.zeros(4), transverse_mm=np.zeros(4))
    result = SimpleNamespace(reason=np.zeros(4, dtype=np.int8))
    sums = _group_sums(result, parts, variance, np.arange(4), np.zeros(4, dtype=np.int64), 1)
    rows = variance[:3, :2]  # the row with σx² = 0 is left out
    expected = np.sqrt(np.sum(xy[:3] ** 2 / rows) / np.sum(1 / rows))
    assert np.sqrt(sums["w_xy2"][0] / sums["w"][0]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.018150, abs=1e-6)  # the row with an infinite σx² kept: 0.015811 without it
    assert sums["n_xy"][0] == 4 and sums["xy2"][0] == pytest.approx(np.sum(xy ** 2), rel=1e-12)


def test_the_report_imports_finish_before_the_interpreter_shuts_down(monkeypatch):
    """The thread importing the report's libraries is not a daemon: a run that
    fails early ends after it (a daemon thread still importing at shutdown
    crashed the process, SIGSEGV, in 8 of 180 runs under load)."""
    import threading

    from dials_qconsistency.report import html

    started = []

    class Recorded(threading.Thread):
        def start(self):
            started.append(self)
            super().start()

    monkeypatch.setattr(html.threading, "Thread", Recorded)
    html.prepare_in_background()
    for thread in started:
        thread.join()
    assert [t.name for t in started] == ["report imports"] and not started[0].daemon


@pytest.mark.parametrize("backend", ["standalone", pytest.param("native", marks=pytest.mark.dials)])
def test_a_beam_change_alone_gives_its_report_and_figures(shared, tmp_path, monkeypatch, backend):
    """The quartz sweep's beam tilted 0.2° about y: Δq = Δs0 in every row, so
    |Δq| spans a few ulps, and the histogram stopped the default run with an
    internal error before any output. Now the run writes everything, and the
    histogram holds every used row in one bin of the width it was given."""
    document = json.load(open(shared("quartz_processed", "refined.expt")))
    beam = document["beam"][0]
    angle = np.radians(0.2)
    turn = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    beam["direction"] = (turn @ np.array(beam["direction"])).tolist()
    tilted = tmp_path / "tilted.expt"
    tilted.write_text(json.dumps(document))
    monkeypatch.chdir(tmp_path)
    status = main([str(tilted), shared("quartz_processed", "refined.refl"), "output.plots=figs/", "output.html=qc.html",
                   "output.json=qc.json", f"backend={backend}"])
    assert status == 0 and os.path.exists("qc.html") and os.path.exists("figs/histogram.png")
    assert '"histogram"' in open("qc.html").read()
    report = json.load(open("qc.json"))
    assert report["overall"]["delta_q"]["n"] == 380
    # every row's |Δq| is |Δs0| (the spots' s1 keep their directions and length)
    direction = np.array(json.load(open(shared("quartz_processed", "refined.expt")))["beam"][0]["direction"])
    direction /= np.linalg.norm(direction)
    delta_s0 = np.linalg.norm(turn @ direction - direction) / document["beam"][0]["wavelength"]
    assert report["overall"]["delta_q"]["max"] - report["overall"]["delta_q"]["median"] < 1e-12
    assert report["overall"]["delta_q"]["median"] == pytest.approx(delta_s0, rel=1e-9)


@pytest.mark.parametrize("pair, source, angle", [
    (("dials_current", "centroid_refined"), "observed", "Δφ (deg)"),
    (("dials_current", "cspad_stills_refined"), "observed", "Δψ (deg)"),
    (("tof_sxd_nacl", "sxd_refined"), "observed", None)])
def test_the_detector_chart_menu_names_each_view_and_its_unit(shared, pair, source, angle):
    """Each view of the detector chart gives its colour bar its own unit (the
    angle's read Å⁻¹), names the angle the data have (Δφ for a sweep, Δψ for
    stills), offers none for time-of-flight rows (all NaN), and the first view
    has the colour limits its button gives it."""
    from dials_qconsistency.report.charts import charts
    from dials_qconsistency.report.points import point_sample
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.io.expt import read_experiments

    experiments = read_experiments(shared(pair[0], pair[1] + ".expt"))
    table = ReflectionTable.from_file(shared(pair[0], pair[1] + ".refl"))
    result = compute_q(experiments, table.columns(), table.identifiers, Options(q_pixel_source=source))
    parts = decompose(experiments, result)
    sample = point_sample(result, parts, None, table.columns()["miller_index"])
    (detector,) = [c for c in charts(experiments, result, sample) if c["id"] == "detector"]
    buttons = detector["layout"]["updatemenus"][0]["buttons"]
    units = {b["label"]: b["args"][0]["marker.colorbar.title.text"][0] for b in buttons}
    expected = {"|Δq| (Å⁻¹)": "Å⁻¹", "Δq_x (Å⁻¹)": "Å⁻¹", "Δq_y (Å⁻¹)": "Å⁻¹", "Δq_z (Å⁻¹)": "Å⁻¹",
                "|q_bragg| - |q_pixel| (Å⁻¹)": "Å⁻¹"}
    assert units == (dict(expected, **{angle: "deg"}) if angle else expected)
    marker = detector["data"][1]["marker"]
    assert (marker["cmin"], marker["cmax"]) == (0.0, buttons[0]["args"][0]["marker.cmax"][0]) and marker["cmax"] > 0


def test_the_arrows_have_heads_along_them_over_the_panels(shared, tmp_path):
    """The refined sweep's detector moved 0.5 mm along lab x: every in-plane
    residual (model spot − q_pixel spot) points one way, and each arrow's head
    is turned along its own segment (plotly turns markers clockwise from up);
    the panel is outlined beneath."""
    import base64

    from dials_qconsistency.report.charts import charts
    from dials_qconsistency.report.points import point_sample
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.io.expt import read_experiments

    document = json.load(open(shared("dials_current", "centroid_refined.expt")))
    document["detector"][0]["hierarchy"]["origin"][0] += 0.5
    moved = tmp_path / "moved.expt"
    moved.write_text(json.dumps(document))
    experiments = read_experiments(str(moved))
    table = ReflectionTable.from_file(shared("dials_current", "centroid_refined.refl"))
    result = compute_q(experiments, table.columns(), table.identifiers, Options())
    parts = decompose(experiments, result)
    sample = point_sample(result, parts, None, table.columns()["miller_index"])
    (arrows,) = [c for c in charts(experiments, result, sample) if c["id"] == "arrows"]
    panels, lines, heads = arrows["data"]
    assert panels["name"] == "panels" and len(panels["x"]) == 6  # one panel: four corners, closed, and a break
    values = lambda typed: np.frombuffer(base64.b64decode(typed["bdata"]), "<f4")  # noqa: E731
    x, y = values(lines["x"]).reshape(-1, 3), values(lines["y"]).reshape(-1, 3)
    along = np.degrees(np.arctan2(x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]))
    angle = values(heads["marker"]["angle"])
    assert angle.size == int(np.count_nonzero(result.used)) and np.allclose(angle, along, atol=0.5)
    assert np.ptp(angle) < 10  # one shift: one direction
    np.testing.assert_allclose(values(heads["x"]), x[:, 1], atol=1e-3)


def test_the_next_step_names_strategy_files_that_exist():
    """The next step for a detector mistake names the refinement strategies by
    their full path, where they are (installed with the package as
    dials_qconsistency/phil, or the source tree's phil/): a user outside the
    source tree could not find 'phil/refine_1_detector_beam.phil'."""
    from dials_qconsistency.report.html import _fix

    text = _fix("beam_centre_shift")
    paths = re.findall(r"(/\S+\.phil)", text)
    assert [os.path.basename(p) for p in paths] == [
        "refine_1_detector_beam.phil", "refine_2_all_free.phil", "refine_stills.phil"], text
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
    assert open(paths[0]).read().startswith("# Step 1 of 2: refine the detector and the beam")


def test_the_page_gives_dials_refine_rmsds(shared, tmp_path, monkeypatch):
    """With observed positions and angles the refined sweep's residuals are
    dials.refine's RMSDs: RMS of xyzcal − xyzobs in x, y (mm) and φ (degrees)
    over the rows refinement used, computed here from the input table. The
    page's per-experiment table gives them (it gave the in-plane RMS alone)."""
    refl = shared("dials_current", "centroid_refined.refl")
    monkeypatch.chdir(tmp_path)
    assert main([shared("dials_current", "centroid_refined.expt"), refl, "q_pixel.source=observed", "phi=observed",
                 "output.reflections=None", "backend=standalone"]) == 0
    table = ReflectionTable.from_file(refl)
    used = (table.get("flags") & 8) != 0
    difference = (table.get("xyzcal.mm") - table.get("xyzobs.mm.value"))[used]
    rms = np.sqrt(np.mean(difference ** 2, axis=0))
    page = (tmp_path / "dials.q_consistency.html").read_text()
    per_experiment = page[page.index("<h3>Per experiment</h3>"):]
    header = re.findall(r"<th>(.*?)</th>", per_experiment[:per_experiment.index("</tr>")])
    cells = re.findall(r"<td>(.*?)</td>", per_experiment[per_experiment.index("</tr>"):])[:len(header)]
    row = dict(zip(header, cells))
    assert row["n"] == str(int(used.sum()))
    assert float(row["x (mm)"]) == pytest.approx(rms[0], abs=5e-5)
    assert float(row["y (mm)"]) == pytest.approx(rms[1], abs=5e-5)
    assert float(row["Δφ / Δψ (°)"]) == pytest.approx(np.degrees(rms[2]), abs=5e-5)
    assert 0.05 < rms[0] < 0.06 and 0.05 < rms[1] < 0.07 and 0.1 < np.degrees(rms[2]) < 0.13  # dials.refine's


def test_image_numbers_are_one_numbering_clamped_to_the_scan(shared):
    """The page's |Δq|-against-image chart and the campaign's per-image table
    number images alike: the image φ falls in, numbered from the scan's first
    image, rows predicted beyond an end counted in its end image (the chart
    gave images -1, 0, 10 and 11 of a 9-image sweep, and, for a scan starting
    at image 5, numbers 4 too high)."""
    from dials_qconsistency.batch.campaign import image_keys
    from dials_qconsistency.report.charts import image_numbers
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.io.expt import read_experiments

    experiments = read_experiments(shared("dials_current", "centroid_refined.expt"))
    table = ReflectionTable.from_file(shared("dials_current", "centroid_refined.refl"))
    result = compute_q(experiments, table.columns(), table.identifiers, Options())
    scan = experiments[0].scan
    rows = np.flatnonzero(result.used)
    frame = (result.phi[rows] - scan.oscillation[0]) / scan.oscillation[1]  # 0 at the start of the first image
    assert (frame < 0).any() and (frame >= scan.num_images).any()  # predicted beyond both ends
    for first in (1, 5):
        scan.image_range = (first, first + scan.num_images - 1)  # renumbered: the same angles
        expected = np.clip(np.floor(frame), 0, scan.num_images - 1).astype(int) + first
        np.testing.assert_array_equal(image_numbers(experiments, result)[rows], expected)
        np.testing.assert_array_equal(image_keys(experiments, result, rows)[1], expected)


def test_colours_of_rounding_are_drawn_as_zero(shared):
    """A consistent model at its calculated positions has |Δq| ~1e-16 Å⁻¹: its
    detector chart's colour scale starts at numerical precision (1e-9 Å⁻¹),
    so rounding shows as the zero it is, not as a pattern; residuals beyond
    it keep their own range."""
    from dials_qconsistency.report.charts import charts
    from dials_qconsistency.report.points import point_sample
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.io.expt import read_experiments

    experiments = read_experiments(shared("dials_current", "centroid_refined.expt"))
    table = ReflectionTable.from_file(shared("dials_current", "centroid_refined.refl"))
    for source in ("calculated", "observed"):
        result = compute_q(experiments, table.columns(), table.identifiers, Options(q_pixel_source=source))
        parts = decompose(experiments, result)
        sample = point_sample(result, parts, None, table.columns()["miller_index"])
        (detector,) = [c for c in charts(experiments, result, sample) if c["id"] == "detector"]
        limits = {b["label"]: b["args"][0]["marker.cmax"][0] for b in detector["layout"]["updatemenus"][0]["buttons"]}
        largest = float(np.max(np.linalg.norm(result.delta_q[result.used], axis=1)))
        if source == "calculated":
            assert largest < 1e-14 and limits["|Δq| (Å⁻¹)"] == 1e-9 and limits["Δφ (deg)"] == np.degrees(1e-9)
        else:
            assert limits["|Δq| (Å⁻¹)"] == pytest.approx(largest, rel=1e-6) and largest > 1e-3  # float32 colours


def test_stills_delta_two_theta_of_rounding_is_said_so(shared):
    """The CSPAD stills at their calculated positions: Δ2θ is ~1e-14° of
    rounding, drawn on an axis of numerical precision and titled so (the ticks
    read femto-degrees); with observed positions the data set the axis."""
    from dials_qconsistency.report.charts import charts
    from dials_qconsistency.report.points import point_sample
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.core.statistics import summarise
    from dials_qconsistency.io.expt import read_experiments

    experiments = read_experiments(shared("dials_current", "cspad_stills_refined.expt"))
    table = ReflectionTable.from_file(shared("dials_current", "cspad_stills_refined.refl"))
    for source, rounding in (("calculated", True), ("observed", False)):
        result = compute_q(experiments, table.columns(), table.identifiers, Options(q_pixel_source=source))
        parts = decompose(experiments, result)
        sample = point_sample(result, parts, None, table.columns()["miller_index"])
        drawn = {c["id"]: c for c in charts(experiments, result, sample, summarise(result, experiments, parts))}
        for name in ("trumpet", "delta_two_theta"):
            layout = drawn[name]["layout"]
            assert ("none beyond rounding" in layout["title"]["text"]) == rounding
            assert (layout["yaxis"].get("range") == [-np.degrees(1e-9), np.degrees(1e-9)]) == rounding
