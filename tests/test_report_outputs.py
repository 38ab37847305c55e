"""Figures, the JSON report, the new columns and the fail_if gate."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dials_qconsistency.core.decomposition import spot_lab_positions
from dials_qconsistency.core.row_statistics import take_rows
from dials_qconsistency.report import figures as plots
from dials_qconsistency.report.points import point_sample
from dials_qconsistency.core.decomposition import decompose
from simulation.gallery import rotation_cases
from dials_qconsistency.io.refl import ReflectionTable
from conftest import EXAMPLES, run_core
from test_command_line import run_command

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _panels_drawn(fig):
    return sum(1 for patch in fig.axes[0].patches if (patch.get_label() or "").startswith("panel "))


@pytest.mark.parametrize("stem", ["rotation", "stills"])
def test_every_figure_is_written_and_non_empty(tmp_path, stem):
    experiments, _, _, result = run_core(os.path.join(EXAMPLES, stem + ".expt"), os.path.join(EXAMPLES, stem + ".refl"), q_pixel_source="observed")
    parts = decompose(experiments, result)
    rendered = plots.render_plots(str(tmp_path) + os.sep, experiments, result, point_sample(result, parts, 20_000))
    names = {os.path.basename(p) for p in rendered}
    expected = {f"detector_{q}.png" for q in plots.HEATMAPS} | {
        "detector_arrows.png", "components_vs_pixel.png", "histogram.png", "vs_resolution.png",
    }
    if stem == "rotation":
        expected.add("vs_image.png")
    assert names == expected
    assert {os.path.dirname(p) for p in rendered} == {str(tmp_path)}
    for path, data in rendered.items():
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path
    assert os.listdir(tmp_path) == []  # rendering writes nothing; the command stages the files


def test_detector_views_draw_every_panel_of_the_cspad(shared):
    experiments, _, _, result = run_core(
        shared("dials_current", "cspad_stills_refined.expt"), shared("dials_current", "cspad_stills_refined.refl"),
        q_pixel_source="observed",
    )
    parts = decompose(experiments, result)
    for quantity in plots.HEATMAPS:
        fig, n = plots.detector_heatmap(experiments, result, parts, quantity)
        assert n == 64 and _panels_drawn(fig) == 64
    fig, n = plots.arrow_map(experiments, result, parts)
    assert _panels_drawn(fig) == 64
    # the spots lie inside the drawn layout, seen from the sample (mm)
    view = plots.DetectorView(experiments)
    assert not view.angular and view.labels == ("mm across the beam (lab X side)", "mm")
    xy = view.project(spot_lab_positions(experiments, result)[result.used])
    corners = np.concatenate([view.outline(p) for p in experiments[0].detector.panels])
    assert xy.min(axis=0).tolist() >= (corners.min(axis=0) - 1).tolist()
    assert xy.max(axis=0).tolist() <= (corners.max(axis=0) + 1).tolist()


def test_a_detector_around_the_sample_is_drawn_by_direction(shared):
    """ISIS SXD's 11 panels sit beside, behind and before the sample: seen from
    the sample along the beam, back-scatter panels folded onto forward ones
    (3 onto 5, 2 onto 0, 7 onto 9) and the side ones into lines. Drawn by
    direction (2θ from the beam at the azimuth about it), every spot lies in
    its own panel's outline and in no other panel's, and 2θ is the distance
    from the centre (checked against the spot's own direction)."""
    from matplotlib.path import Path

    experiments, _, _, result = run_core(shared("tof_sxd_nacl", "sxd_refined.expt"),
                                         shared("tof_sxd_nacl", "sxd_refined.refl"))
    view = plots.DetectorView(experiments)
    assert view.angular and view.labels[0].startswith("2θ · cos(azimuth) (deg")
    lab = spot_lab_positions(experiments, result)[result.used]
    xy = view.project(lab)
    beam = experiments[0].beam.along_s0 / np.linalg.norm(experiments[0].beam.along_s0)
    two_theta = np.degrees(np.arccos(lab @ beam / np.linalg.norm(lab, axis=1)))
    np.testing.assert_allclose(np.linalg.norm(xy, axis=1), two_theta, atol=1e-9)
    outlines = [Path(view.outline(p)) for p in experiments[0].detector.panels]
    panel = result.panel[result.used]
    inside = np.array([outline.contains_points(xy, radius=1e-6) for outline in outlines])  # (panels, spots)
    position, size = result.position_mm[result.used], np.array([p.size_mm for p in experiments[0].detector.panels])
    on_panel = ((position >= 0) & (position <= size[panel])).all(axis=1)  # SXD predicts some spots ~2 px beyond
    assert on_panel.mean() > 0.9 and inside[panel, np.arange(panel.size)][on_panel].all()  # in its own outline
    assert inside.sum(axis=0).max() == 1  # and in no other
    fig, n = plots.arrow_map(experiments, result, decompose(experiments, result))
    assert n == 11 and _panels_drawn(fig) == 11


def test_plot_names_prefix_directory_and_none(tmp_path):
    assert plots.plot_path("run1_", "histogram") == "run1_histogram.png"
    assert plots.plot_path(str(tmp_path), "histogram") == os.path.join(str(tmp_path), "histogram.png")
    done = run_command(
        os.path.join(EXAMPLES, "stills.expt"), os.path.join(EXAMPLES, "stills.refl"), "output.plots=None", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("*.png"))


def test_json_report_schema_and_gate(tmp_path):
    done = run_command(
        os.path.join(EXAMPLES, "rotation.expt"), os.path.join(EXAMPLES, "rotation.refl"), "q_pixel.source=observed",
        "output.json=report.json", "output.plots=figs/", "fail_if.mean_delta_q=0.05", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"overall", "per_experiment", "per_panel", "per_panel_group", "per_resolution_shell", "diagnosis", "settings"} <= set(report)
    assert report["settings"]["q_pixel_source"] == "observed" and report["settings"]["phi"] == "calculated"
    table = ReflectionTable.from_file(str(tmp_path / "q_consistency.refl"))
    norms = table.get("delta_q.norm")
    used = np.isfinite(norms)
    assert report["overall"]["delta_q"]["mean"] == pytest.approx(norms[used].mean(), rel=1e-12)
    assert report["overall"]["delta_q"]["n"] == int(used.sum())
    assert len(report["per_panel"]) == 4 and sum(p["n"] for p in report["per_panel"]) == used.sum()
    assert sum(s["n"] for s in report["per_resolution_shell"]) == used.sum()
    assert [d["scope"] for d in report["diagnosis"]] == ["pooled", "experiment 0"]
    assert all(d["consistent"] for d in report["diagnosis"])
    xy = table.get("delta_q.xy.mm")[used]
    rms_xy = np.sqrt(np.mean(np.sum(xy**2, axis=1)))
    assert report["per_experiment"][0]["residuals"]["rms_in_plane_mm"] == pytest.approx(rms_xy, rel=1e-12)
    assert len(list((tmp_path / "figs").glob("*.png"))) == 12

    # the same run with a bound it cannot meet: exit 2, one line, outputs still written
    done = run_command(
        os.path.join(EXAMPLES, "rotation.expt"), os.path.join(EXAMPLES, "rotation.refl"), "q_pixel.source=observed",
        "output.plots=None", f"fail_if.max_delta_q={0.5 * norms[used].max()}", "output.reflections=gated.refl", cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "max |delta_q|" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "gated.refl").exists()


def test_broken_model_named_in_log_and_json(tmp_path):
    case = next(c for c in rotation_cases() if c.name == "minus90_about_x")
    (tmp_path / "broken.expt").write_text(json.dumps(case.document))
    case.table.write(str(tmp_path / "truth.refl"))
    done = run_command("broken.expt", "truth.refl", "output.json=r.json", "output.plots=None", "fail_if.mean_delta_q=0.02", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "lab_axis_rotation" in done.stdout and "about lab X" in done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    finding = report["diagnosis"][0]["findings"][0]
    assert finding["mistake"] == "lab_axis_rotation" and abs(finding["size"]["angle_deg"] - 90) < 0.1


def test_decomposition_columns_in_output(tmp_path):
    done = run_command(os.path.join(EXAMPLES, "stills.expt"), os.path.join(EXAMPLES, "stills.refl"), "output.plots=None", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = ReflectionTable.from_file(str(tmp_path / "q_consistency.refl"))
    delpsi = table.get("delta_q.delpsi.rad")
    used = np.isfinite(table.get("delta_q.norm"))
    # the simulator writes DIALS' delpsical.rad; the program recovers it from the models
    assert np.abs(delpsi[used] - table.get("delpsical.rad")[used]).max() <= 1e-12
    assert np.isnan(table.get("delta_q.delphi.rad")).all()
    assert table.column_type("delta_q.xy.mm") == "vec2<double>"


def test_figures_of_points_draw_an_even_sample_and_the_histogram_counts_every_row(monkeypatch, tmp_path):
    experiments, _, _, result = run_core(os.path.join(EXAMPLES, "rotation.expt"), os.path.join(EXAMPLES, "rotation.refl"),
                                         q_pixel_source="observed")
    parts = decompose(experiments, result)
    used = np.flatnonzero(result.used)
    step = -(-used.size // 50)
    drawn = {}

    def record(fig):
        points = [len(c.get_offsets()) for ax in fig.axes for c in ax.collections if len(c.get_offsets())]
        bars = sum(p.get_height() for ax in fig.axes for p in ax.patches if hasattr(p, "get_height"))
        drawn[len(drawn)] = (points, bars, [t.get_text() for t in fig.texts])
        return png(fig)

    png = plots._png
    monkeypatch.setattr(plots, "_png", record)
    rendered = plots.render_plots(str(tmp_path) + os.sep, experiments, result, point_sample(result, parts, 50))
    by_name = dict(zip([os.path.basename(p)[:-4] for p in rendered], drawn.values()))
    shown = len(used[::step])
    assert 25 < shown <= 50
    note = f"{shown} of {used.size} reflections shown (1 in {step} of the used rows, in table order)"
    for name, (points, bars, texts) in by_name.items():
        if name == "histogram":
            assert bars == used.size and note not in texts  # every used row counted
        else:
            assert note in texts, name
    assert by_name["detector_norm"][0][0] == shown and by_name["components_vs_pixel"][0] == [shown] * 6
    # the points drawn are those rows' values
    sampled = take_rows(result, used[::step], len(result.reason))
    assert np.array_equal(sampled.q_bragg, result.q_bragg[used[::step]]) and sampled.notes == result.notes
    assert sampled.observed_to_pred.shape == (shown,) and sampled.used.all()
