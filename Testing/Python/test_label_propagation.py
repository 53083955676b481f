"""Carrying the reference labelmap to another time (warping.propagate_labels): nearest neighbour (the
paper's eq. 7-8) and label-wise trilinear (the default), checked against ITK's own interpolators and
against a ball shrunk by a known motion."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib.geometry import Grid
from STNeRPLib.metrics import dice_per_label
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.warping import propagate_labels
from worker_cli import stnerp

GRID = Grid((24, 22, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
CENTRE = np.array([11.3, 10.6, 9.8])                  # mm = voxel index here
RADIUS, SHELL, SHRINK = 4.2, 2.0, 0.75


def ball(radius: float, outer: float, centre: np.ndarray = CENTRE) -> np.ndarray:
    """[z, y, x] labelmap: 1 at voxel centres within `radius` of `centre`, 2 out to `outer`."""
    distance = np.linalg.norm(GRID.points() - centre, axis=1).reshape(GRID.shape)
    labels = np.where(distance <= outer, 2, 0).astype(np.uint16)
    labels[distance <= radius] = 1
    return labels


def test_label_wise_linear_follows_a_shrinking_ball_closer_than_nearest():
    """A 4.2 mm ball in a 2 mm shell, on 1 mm voxels, shrunk to 0.75 about its centre at 8 sub-voxel
    placements (u maps a point q of the shrunk time to the reference point c + (q - c) / 0.75), against
    the ball and shell drawn at that size: label-wise linear puts the boundary on the half level of the
    interpolated indicator, not on the staircase of voxel faces, and scores the higher Dice at every
    placement (by 0.033 and 0.029 on average when written)."""
    rng = np.random.default_rng(0)
    gains = []
    for _ in range(8):
        centre = np.array([11.0, 10.5, 9.5]) + rng.uniform(-0.5, 0.5, 3)
        index = GRID.to_index(centre + (GRID.points() - centre) / SHRINK)
        truth = ball(RADIUS * SHRINK, (RADIUS + SHELL) * SHRINK, centre)
        dice = {how: dice_per_label(propagate_labels(ball(RADIUS, RADIUS + SHELL, centre), index, how)
                                    .reshape(GRID.shape), truth) for how in ("nearest", "linear")}
        gains.append([dice["linear"][label] - dice["nearest"][label] for label in (1, 2)])
    assert np.min(gains) > 0 and np.all(np.mean(gains, axis=0) > 0.02), gains


@pytest.mark.parametrize("how, interpolator", [("nearest", sitk.sitkNearestNeighbor), ("linear", sitk.sitkLabelLinear)])
def test_propagated_labels_equal_itks(how, interpolator):
    """Every voxel as ITK's resampler labels it through the same motion, beyond the grid included."""
    reference = GRID.image(ball(RADIUS, RADIUS + SHELL))
    points = GRID.points()
    moved = CENTRE + (points - CENTRE) / 0.6 + np.array([2.3, -1.7, 0.9])       # reaches beyond the grid
    field = GRID.image((moved - points).reshape(*GRID.shape, 3), vector=True)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    itk = sitk.GetArrayFromImage(sitk.Resample(reference, field, transform, interpolator, 0))
    ours = propagate_labels(ball(RADIUS, RADIUS + SHELL), GRID.to_index(moved), how).reshape(GRID.shape)
    assert (ours == 0).sum() > 1000 and set(np.unique(ours)) == {0, 1, 2}
    assert np.array_equal(ours, itk)


def test_label_wise_linear_breaks_a_tie_to_the_smaller_label_and_keeps_labels_it_can():
    labels = np.zeros((2, 2, 2), np.uint16)
    labels[:, :, 0], labels[:, :, 1] = 7, 3                              # x = 0: label 7, x = 1: label 3
    index = np.array([[0.5, 0.5, 0.5], [0.25, 0.5, 0.5], [0.75, 0.2, 0.9], [-0.4, 0.0, 0.0], [1.6, 0.0, 0.0]])
    assert propagate_labels(labels, index, "linear").tolist() == [3, 7, 3, 7, 0]
    assert propagate_labels(labels, index, "nearest").tolist() == [7, 7, 3, 7, 0]   # rint rounds 0.5 to 0


def test_unknown_label_interpolation_is_refused():
    with pytest.raises(ValueError, match="label interpolation 'cubic'"):
        propagate_labels(np.zeros((2, 2, 2), np.uint16), np.zeros((1, 3)), "cubic")


def _trained(folder, *flag: str) -> tuple[dict, object]:
    """A real worker's run on a 3-phase phantom (100 iterations, voxels drawn uniformly: its field moves the
    boundaries far enough between voxel centres for the two carries to differ in 19 voxels at t = 1; the
    segmentation-guided fit, 5), and the phantom."""
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=3, noise_hu=0)
    files = write_series(series, folder / "series")
    args = ["train", "--reference", files["images"][0], "--segmentation", files["labelmaps"][0], "--iterations", 100,
            "--structure-points", 0, "--output", folder / "run", "--no-report", *flag]
    for path, t in zip(files["images"][1:], series.times[1:]):
        args += ["--follow-up", path, t]
    result = stnerp(*args)
    assert result.returncode == 0, result.stderr
    return json.loads((folder / "run" / "run.json").read_text()), series


def _carried(series, folder, point: dict) -> dict[int, np.ndarray]:
    """The reference segmentation through a written time point's displacement.nrrd, by ITK, both ways."""
    field = sitk.ReadImage(str(folder / point["displacement"]))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return {how: sitk.GetArrayFromImage(sitk.Resample(series.labelmaps[0], field, transform, how, 0))
            for how in (sitk.sitkLabelLinear, sitk.sitkNearestNeighbor)}


@pytest.mark.parametrize("flag, interpolator", [((), sitk.sitkLabelLinear),
                                                (("--label-interpolation", "nearest"), sitk.sitkNearestNeighbor)])
def test_train_writes_the_labelmap_its_field_carries(tmp_path, flag, interpolator):
    """stnerp train: the default carries the segmentation label-wise linear, --label-interpolation nearest as
    the paper; run.json records which, and each labelmap.nrrd is ITK's of the reference segmentation through
    that time's displacement.nrrd."""
    run, series = _trained(tmp_path, *flag)
    assert run["parameters"]["preset"]["label_interpolation"] == ("nearest" if flag else "linear")
    for point in run["time_points"][1:]:
        carried = _carried(series, tmp_path / "run", point)
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "run" / point["labelmap"])))
        assert (written != carried[interpolator]).sum() <= 2, point["time"]     # 0 when written; ties aside
        assert (carried[sitk.sitkLabelLinear] != carried[sitk.sitkNearestNeighbor]).sum() > 10   # 19 at t = 1


def test_a_model_saved_before_the_option_predicts_its_labels_nearest(tmp_path):
    """A model.pt written before label_interpolation existed (its preset without it) was trained, and its run's
    labelmaps written, nearest-neighbour: `stnerp predict` from it carries them the same way."""
    _, series = _trained(tmp_path)
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    del model["preset"]["label_interpolation"]
    torch.save(model, tmp_path / "run" / "model.pt")
    result = stnerp("predict", "--run", tmp_path / "run", "--times", 1, "--output", tmp_path / "new")
    assert result.returncode == 0, result.stderr
    point = json.loads((tmp_path / "new" / "run.json").read_text())["time_points"][0]
    carried = _carried(series, tmp_path / "new", point)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "new" / point["labelmap"])))
    assert (written != carried[sitk.sitkNearestNeighbor]).sum() <= 2
    assert (written != carried[sitk.sitkLabelLinear]).sum() > 10


def unread_lung_voxels(displacement: Path, labels: np.ndarray, count: int) -> np.ndarray:
    """(z, y, x) of `count` lung voxels (labels 2, 3) of the reference labelmap that no voxel of a time reads by
    nearest carrying through that time's displacement.nrrd (every 7th of them): a one-voxel structure there is
    lost at that time."""
    field = sitk.ReadImage(str(displacement))
    grid = Grid.of(field)
    read = np.rint(grid.to_index(grid.points() + sitk.GetArrayFromImage(field).reshape(-1, 3))).astype(int)
    read = read[np.all((read >= 0) & (read < labels.shape[::-1]), axis=1)]     # the rest read beyond the grid
    unread = np.ones(labels.shape, bool)
    unread[read[:, 2], read[:, 1], read[:, 0]] = False
    voxels = np.argwhere(unread & np.isin(labels, (2, 3)))[::7][:count]
    assert len(voxels) == count
    return voxels


def test_structures_lost_in_propagation_are_recorded_and_said(tmp_path):
    """Where the lungs expand, nearest-neighbour carrying reads no reference voxel in places: a structure of one
    such voxel has no voxel at that time. Three of them (labels 10-12), put into a trained model's segmentation at
    lung voxels that no voxel of time 1 reads through the run's own displacement.nrrd, are lost by `stnerp predict
    --times 1`: its labels_lost says so, as its written labelmap shows, and its log names them."""
    run, series = _trained(tmp_path, "--label-interpolation", "nearest")
    assert all(point["labels_lost"] == [] for point in run["time_points"])
    lost = unread_lung_voxels(tmp_path / "run" / run["time_points"][1]["displacement"],
                              sitk.GetArrayFromImage(series.labelmaps[0]), 3)
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for label, (z, y, x) in enumerate(lost, 10):
        model["labelmap"][z, y, x] = label
    torch.save(model, tmp_path / "run" / "model.pt")
    result = stnerp("predict", "--run", tmp_path / "run", "--times", 1, "--output", tmp_path / "new")
    assert result.returncode == 0, result.stderr
    point = json.loads((tmp_path / "new" / "run.json").read_text())["time_points"][0]
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "new" / point["labelmap"])))
    assert point["labels_lost"] == [10, 11, 12] and not np.isin(written, [10, 11, 12]).any()
    assert "time 1: label 10, label 11, label 12 of the segmentation lost" in result.stderr


def test_a_structure_lost_along_the_short_range_chain_stays_listed_at_every_later_time(tmp_path):
    """--scheme short carries each time's labelmap to the next, so a structure lost at time 1 is absent from what
    time 2 starts from: time 2's labels_lost must still name it (against the reference segmentation). Drawn
    uniformly under the squared error, the fit does not read the segmentation, so the structures put at lung voxels
    that no voxel of time 1 reads (nearest carrying) leave its fields as they were."""
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=3, noise_hu=0)
    files = write_series(series, tmp_path / "series")
    labels = sitk.GetArrayFromImage(series.labelmaps[0])

    def short_range(name: str, segmentation) -> dict:
        sitk.WriteImage(segmentation, str(tmp_path / f"{name}.nrrd"))
        args = ["train", "--reference", files["images"][0], "--segmentation", tmp_path / f"{name}.nrrd",
                "--scheme", "short", "--label-interpolation", "nearest", "--structure-points", 0, "--similarity",
                "mse", "--iterations", 30, "--output", tmp_path / name, "--no-report"]
        for path, t in zip(files["images"][1:], series.times[1:]):
            args += ["--follow-up", path, t]
        result = stnerp(*args)
        assert result.returncode == 0, result.stderr
        return {p["time"]: p for p in json.loads((tmp_path / name / "run.json").read_text())["time_points"]}

    plain = short_range("plain", series.labelmaps[0])
    displacement = tmp_path / "plain" / plain[1.0]["displacement"]
    field = sitk.ReadImage(str(displacement))
    for label, (z, y, x) in enumerate(unread_lung_voxels(displacement, labels, 3), 10):
        labels[z, y, x] = label
    segmentation = sitk.GetImageFromArray(labels)
    segmentation.CopyInformation(series.labelmaps[0])
    marked = short_range("marked", segmentation)
    again = sitk.ReadImage(str(tmp_path / "marked" / marked[1.0]["displacement"]))
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(field))
    for t in (1.0, 2.0):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "marked" / marked[t]["labelmap"])))
        assert not np.isin(written, [10, 11, 12]).any()
        assert marked[t]["labels_lost"] == [10, 11, 12], t
