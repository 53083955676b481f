"""`stnerp report` and the report that `stnerp train` writes: one self-contained page with every
figure, structure names in its tables, structure volume curves that agree with the propagated
labelmaps, a report failure that only warns, and the page as a browser shows it."""
import base64
import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from STNeRPLib import report
from STNeRPLib.contract import SIMILARITIES
from STNeRPLib.model import SeriesModel
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.presets import LEVEL_GAIN
from STNeRPLib.warping import map_to_reference
from worker_cli import stnerp

NAMES = {"1": "tumour", "2": "right lung", "3": "left lung"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=3, noise_hu=0)
    files = write_series(series, folder)
    names = folder / "labels.json"
    names.write_text(json.dumps(NAMES))
    return series, files, names


def train(phantom, output: Path, *extra) -> subprocess.CompletedProcess:
    series, files, _ = phantom
    args = ["train", "--reference", files["images"][0], "--output", output, "--iterations", "40", "--prior", "image",
            "--segmentation", files["labelmaps"][0], *extra]
    for path, t in zip(files["images"][1:], series.times[1:]):
        args += ["--follow-up", path, t]
    return stnerp(*args)


@pytest.fixture(scope="module")
def run(phantom, tmp_path_factory):
    series, files, names = phantom
    output = tmp_path_factory.mktemp("runs") / "train"
    result = train(phantom, output, "--label-names", names, "--predict-times", 1.5,
                   "--ground-truth", files["labelmaps"][2], series.times[2])
    assert result.returncode == 0, result.stderr
    return output


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_writes_a_self_contained_report_with_every_figure(run):
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and record["report"] == "report/index.html"
    page = (run / "report" / "index.html").read_text()
    pngs = sorted((run / "report").glob("*.png"))
    names = {p.name for p in pngs}
    for t in ("0", "1", "1.5", "2"):
        assert {f"t_{t}_slices.png", f"t_{t}_jacobian_histogram.png"} <= names
    assert {"volumes.png", "centroid.png", "motion_and_jacobian.png", "losses.png"} <= names
    inlined = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(s) for s in inlined) == sorted(p.read_bytes() for p in pngs)
    assert not re.search(r'(src|href)="(?!data:)', page)             # nothing loaded from elsewhere
    assert "Dice tumour" in page and "Dice 1" not in page             # structures by name
    assert "reference volume" in page                                # the det J caption says which way


def test_report_says_how_the_fit_went_as_run_json_records_it(run):
    record = json.loads((run / "run.json").read_text())
    page = (run / "report" / "index.html").read_text()
    ratio, = record["velocity_level_ratios"]
    decision = "kept" if record["velocity_levels_kept"] == 2 else "dropped"
    assert "<td>Def-Net iterations run</td><td>40 of 40</td>" in page
    assert f"<td>velocity levels kept</td><td>{record['velocity_levels_kept']} of 2</td>" in page
    assert record["velocity_level_keep_below"] == pytest.approx(1 - LEVEL_GAIN)
    assert f"<td>{ratio:.3f} ({decision}: kept below {1 - LEVEL_GAIN:.2f})</td>" in page
    averaged = "the mean over its last 25% of iterations (tail averaging)"       # the default's average_last
    assert f"<td>Def-Net&#x27;s final weights</td><td>{averaged}</td>" in page
    # the default preset guided by the run's segmentation
    assert "<td>Def-Net&#x27;s loss</td><td>Charbonnier penalty (the squared error below 0.01" in page
    assert ("<td>voxels drawn</td><td>10% about the segmentation&#x27;s structures (9 mm either side of each "
            "boundary), the rest uniformly within 9 mm of the body (voxels above 6.7% of the intensity window: "
            "-900 HU in CT)</td>") in page
    assert "<td>scans as fitted</td><td>as scanned</td>" in page                  # the default smooths nothing
    assert "<td>intensities mapped to [0, 1]</td><td>the CT window, -1000 to 500 HU</td>" in page
    assert record["def_time_sigma"] == 0.25                                     # 3 scans: the default's 0.5 halved
    assert ("<td>Def-Net&#x27;s time scale (Fourier σ of time)</td><td>0.25, half the preset&#x27;s 0.5: a series of "
            "fewer than 5 scans</td>") in page


def test_the_fit_table_says_a_run_on_scans_not_in_hounsfield_units_was_normalised_by_its_percentiles():
    record = {"intensity_window": [12.0, 1843.5], "parameters": {"preset": {}}, "defnet_iterations": 10}
    assert ("<td>intensities mapped to [0, 1]</td><td>the reference&#x27;s 0.5th to 99.5th percentiles, 12 to 1843.5 "
            "(scans not in HU)</td>") in "".join(report._fit_section(record))


def test_the_metrics_table_names_the_structures_each_time_lost():
    points = [{"time": 0.0, "metrics": {}, "labels_lost": []}, {"time": 1.0, "metrics": {}, "labels_lost": [1, 4]}]
    page = report._metrics_table({"time_points": points}, report.Names({1: "GTV"}))
    assert "<th>structures lost</th>" in page
    assert "<td>none</td>" in page and "<td>GTV, label 4</td>" in page
    assert "structures lost" not in report._metrics_table({"time_points": [{"time": 0.0, "metrics": {}}]},
                                                          report.Names())


@pytest.mark.parametrize("preset, says", [({}, "as scanned"), ({"smoothing_sigma": 0.0}, "as scanned"),
                                          ({"smoothing_sigma": 1.25}, "smoothed by a Gaussian of 1.25 voxel")])
def test_the_fit_table_says_what_the_fit_saw_of_the_scans(preset, says):
    rows = dict(report._fit_rows({"defnet_iterations": 10}, {"def_iterations": 10, **preset}, ""))
    assert rows["scans as fitted"].startswith(says)


def test_the_fit_table_says_a_share_of_the_voxels_was_drawn_about_the_structures():
    rows = dict(report._fit_rows({"defnet_iterations": 10}, {"def_iterations": 10, "structure_points": 0.1}, ""))
    assert rows["voxels drawn"] == ("10% about the segmentation's structures (9 mm either side of each boundary), "
                                    "the rest uniformly over the grid")


@pytest.mark.parametrize("preset, says", [({}, "uniformly over the grid"),                 # a record from before it
                                          ({"body_mask": False}, "uniformly over the grid"),
                                          ({"body_mask": True}, "uniformly within 9 mm of the body (voxels above "
                                                                "6.7% of the intensity window: -900 HU in CT)")])
def test_the_fit_table_says_whether_the_voxels_were_drawn_in_the_body_only(preset, says):
    rows = dict(report._fit_rows({"defnet_iterations": 10}, {"def_iterations": 10, **preset}, ""))
    assert rows["voxels drawn"] == says


@pytest.mark.parametrize("facts, says", [({}, None),                                       # a record from before it
                                         ({"def_time_sigma": None}, None),                 # one Def-Net per scan
                                         ({"def_time_sigma": 0.5}, "0.5")])
def test_the_fit_table_gives_the_time_scale_only_as_a_continuous_time_fit_recorded_it(facts, says):
    preset = {"def_iterations": 10, "def_time_sigma": 0.5, "time_sigma_halved_below": 5}
    rows = dict(report._fit_rows({"defnet_iterations": 10, **facts}, preset, ""))
    assert rows.get("Def-Net's time scale (Fourier σ of time)") == says


def test_the_report_names_every_similarity_the_worker_accepts():
    assert set(report.SIMILARITY_NAMES) == set(SIMILARITIES)


def test_volume_curves_agree_with_the_propagated_labelmaps(run):
    """The model's curve (inverse map, integrated over the reference structure) against voxel
    counts of the propagated labelmap at each written time; the lungs are large enough for 4 %."""
    curve = {(float(r["time"]), r["name"]): r for r in rows(run / "report" / "structures_over_time.csv")}
    written = rows(run / "report" / "jacobian_by_structure.csv")
    assert {r["name"] for r in written} == set(NAMES.values())
    lungs = [r for r in written if "lung" in r["name"]]
    for r in lungs:
        model = curve[(float(r["time"]), r["name"])]
        assert abs(float(model["volume_ml"]) / float(r["volume_ml"]) - 1) < 0.04, (r, model)
        assert abs(float(model["mean_jacobian"]) - float(r["jacobian_mean"])) < 0.04, (r, model)
    times = sorted({t for t, _ in curve})
    assert len(times) >= 50 and times[0] == 0.0 and times[-1] == 2.0


def test_volume_curves_equal_the_partial_volume_of_the_forward_map(run):
    """Two independent integrals of the same model: the curve (det J of the inverse map over the
    reference structure) and the time-t voxels' partial-volume share of the reference structure
    at their reference points (trilinear), at every written time: within 3 %, or half a voxel's volume for
    the tumour (9 voxels of 9 mm), below which the trilinear share cannot tell them apart."""
    record = json.loads((run / "run.json").read_text())
    model = SeriesModel.load(run / record["model"], torch.device("cpu"))
    curve = {(float(r["time"]), int(r["label"])): float(r["volume_ml"])
             for r in rows(run / "report" / "structures_over_time.csv")}
    voxel_ml = np.prod(model.grid.spacing) / 1000
    for entry in record["time_points"]:
        reference_points = map_to_reference(model, entry["time"], model.grid.points())
        index = model.grid.to_index(reference_points)[:, ::-1].T          # (z, y, x) rows
        for label in (1, 2, 3):
            share = ndimage.map_coordinates((model.labelmap == label).astype(float), index, order=1)
            volume = share.sum() * voxel_ml
            tolerance = max(0.03 * volume, 0.5 * voxel_ml)
            assert abs(curve[(entry["time"], label)] - volume) < tolerance, (entry["time"], label, volume)


def test_structure_curves_inverted_at_their_points_equal_those_inverted_over_the_grid(run, monkeypatch):
    """The curves invert the map at their structures' points, each started from exp(-v) (sparse_inverse_map); the
    outputs start each voxel from the inverse on every 4th voxel of the grid (inverse_map): at clinical size the
    curves took 22.2 s that way and 3.2-3.7 s now (1 thread). Both converge to the same inverse: volumes to 1e-5,
    centroids and largest motions to 1e-3 mm (2e-7 and 1e-4 mm measured at 512 x 512 x 300)."""
    from STNeRPLib import warping
    record = json.loads((run / "run.json").read_text())
    model = SeriesModel.load(run / record["model"], torch.device("cpu"))
    times = np.linspace(0.0, 2.0, 7)
    sparse = report.structure_curves(model, times)
    monkeypatch.setattr(report, "sparse_inverse_map", warping.inverse_map)
    dense = report.structure_curves(model, times)
    assert sorted(sparse.volume) == sorted(dense.volume) == [1, 2, 3]
    for label in dense.volume:
        assert np.allclose(sparse.volume[label], dense.volume[label], rtol=1e-5, atol=0)
        assert np.allclose(sparse.mean_jacobian[label], dense.mean_jacobian[label], rtol=1e-5, atol=0)
        assert np.abs(sparse.centroid[label] - dense.centroid[label]).max() < 1e-3
        assert np.abs(sparse.max_motion[label] - dense.max_motion[label]).max() < 1e-3
    assert np.ptp(dense.volume[2]) > 0.01 * dense.volume[2].mean()           # the lungs breathe


def test_structure_statistics_are_those_of_every_voxel_of_each_label(run):
    """structures_at looks for each label within its bounding box (at 512 x 512 x 300, 0.45 s for three structures
    against 1.2-1.7 s over the whole grid per label): its counts, centroids and det J statistics are those of
    every voxel of the label in the whole grid, to the bit."""
    record = json.loads((run / "run.json").read_text())
    for entry in record["time_points"]:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(run / entry["labelmap"])))
        jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(run / entry["jacobian"]))).astype(np.float64)
        found = report.structures_at(run, entry)
        assert sorted(found) == sorted(set(np.unique(labels)) - {0})
        for label, structure in found.items():
            where = np.nonzero(labels == label)
            values = jacobian[where]
            assert structure.voxels == len(values) and structure.mean == values.mean()
            assert (structure.minimum, structure.maximum) == (values.min(), values.max())
            assert structure.folded == np.count_nonzero(values <= 0)
            assert np.array_equal(structure.centroid_index, [w.mean() for w in where[::-1]])     # x, y, z
            assert structure.histogram.sum() == len(values)


def test_report_command_writes_the_report_of_a_run(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "report")
    result = stnerp("report", "--run", copy, "--curve-times", 4)
    assert result.returncode == 0, result.stderr
    times = {float(r["time"]) for r in rows(copy / "report" / "structures_over_time.csv")}
    assert len(times) == 6                            # 0, 2/3, 4/3, 2 and the written 1, 1.5
    assert (copy / "report" / "index.html").is_file()


def test_report_of_an_older_run_gives_the_level_decision_it_took_not_one_by_todays_bar(run, tmp_path):
    """A run.json written under the 0.95 bar, before the bar was recorded: a ratio of 0.96 whose level
    the run dropped is reported dropped, with no bar claimed."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    record = json.loads((copy / "run.json").read_text())
    del record["velocity_level_keep_below"]
    record.update(velocity_levels_kept=1, velocity_level_ratios=[0.96])
    (copy / "run.json").write_text(json.dumps(record))
    result = stnerp("report", "--run", copy, "--curve-times", 4)
    assert result.returncode == 0, result.stderr
    assert "<td>0.960 (dropped)</td>" in (copy / "report" / "index.html").read_text()


def test_label_names_saved_with_a_byte_order_mark_are_read(tmp_path):
    """A JSON file saved by Windows editors as "UTF-8 with BOM" names the labels as the same file without it."""
    path = tmp_path / "names.json"
    path.write_bytes('{"1": "GTV", "2": "Lunge links"}'.encode("utf-8-sig"))
    names = report.structure_names({"inputs": {}}, tmp_path, str(path))
    assert (names[1], names[2], names[3]) == ("GTV", "Lunge links", "label 3")


def test_report_of_a_folder_without_a_run_is_refused(tmp_path):
    result = stnerp("report", "--run", tmp_path)
    assert result.returncode == 2 and "run.json" in result.stderr


def test_report_failure_leaves_the_run_complete(phantom, tmp_path):
    bad = tmp_path / "names.json"
    bad.write_text("[1, 2")
    result = train(phantom, tmp_path / "run", "--label-names", bad)
    assert result.returncode == 0, result.stderr
    assert "warning: the report was not written" in result.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "complete" and "report" not in record


def test_no_report_flag(phantom, tmp_path):
    result = train(phantom, tmp_path / "run", "--no-report")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "run" / "report").exists()


def test_slice_figures_show_every_map_through_the_focus_along_each_axis(tmp_path):
    """Each voxel's value says where it is (100 z + 10 y + x), so a plane taken along the wrong axis,
    at the wrong index or transposed shows other numbers; a focus beyond the grid is clamped to it."""
    z, y, x = np.meshgrid(np.arange(5), np.arange(6), np.arange(7), indexing="ij")     # [z, y, x]
    where = (100 * z + 10 * y + x).astype(np.float32)
    maps = {"jacobian": where, "image": where + 1000, "labelmap": (x % 3).astype(np.uint8),
            "displacement": np.stack([3 * where, 4 * where, 0 * where], axis=-1)}       # |u| = 5 * where
    entry = {}
    for name, array in maps.items():
        image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
        image.SetSpacing((1.0, 2.0, 3.0))
        sitk.WriteImage(image, str(tmp_path / f"{name}.nrrd"))
        entry[name] = f"{name}.nrrd"
    reader = report._information(tmp_path / "jacobian.nrrd")
    axial, coronal, sagittal = report._planes(tmp_path, entry, reader, np.array([9, -2, 3]), None, None)
    assert (axial.name, coronal.name, sagittal.name) == ("axial", "coronal", "sagittal")
    np.testing.assert_array_equal(axial.jacobian, 300 + 10 * np.arange(6)[:, None] + np.arange(7))   # z = 3: [y, x]
    np.testing.assert_array_equal(coronal.jacobian, 100 * np.arange(5)[:, None] + np.arange(7))      # y = 0: [z, x]
    np.testing.assert_array_equal(sagittal.jacobian, 100 * np.arange(5)[:, None] + 10 * np.arange(6) + 6)  # x = 6
    for plane in (axial, coronal, sagittal):
        np.testing.assert_allclose(plane.magnitude, 5 * plane.jacobian, rtol=1e-6)
        np.testing.assert_array_equal(plane.image, plane.jacobian + 1000)
    np.testing.assert_array_equal(axial.labels, np.broadcast_to(np.arange(7) % 3, (6, 7)))
    assert sagittal.labels.tolist() == np.zeros((5, 6)).tolist()                       # x = 6: 6 % 3
    assert axial.extent == (0.0, 7.0, 12.0, 0.0) and axial.origin == "upper"           # mm: 7 x 1, 6 x 2
    assert sagittal.extent == (0.0, 12.0, 0.0, 15.0) and sagittal.origin == "lower"    # 6 x 2, 5 x 3


def chromium() -> str | None:
    """A Chromium for playwright: the system's, or playwright's own download."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_opens_in_a_real_browser(run):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = chromium()
    with sync_api.sync_playwright() as p:
        if executable is None and not Path(p.chromium.executable_path).exists():
            pytest.skip("no Chromium: install the system's (apt-get install chromium) or `playwright install chromium`")
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto((run / "report" / "index.html").as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        finally:
            browser.close()
    assert len(images) == len(list((run / "report").glob("*.png")))
    assert all(complete and width > 0 for complete, width in images), images
    assert problems == []
