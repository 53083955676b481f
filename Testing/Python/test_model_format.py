"""model.pt records the version of its layout; a file of another version is refused in one line. Its masks and labels
take the least room that holds them."""

import numpy as np
import SimpleITK as sitk
import torch

from STNeRPLib.model import MODEL_FORMAT, SeriesModel
from STNeRPLib.phantom import breathing_series
from test_padding import cylinder, padded
from worker_cli import stnerp


def test_model_of_another_format_is_refused_in_one_line(tmp_path):
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=2, noise_hu=0)
    for i, image in enumerate(series.images):
        sitk.WriteImage(image, str(tmp_path / f"p{i}.nrrd"))
    trained = stnerp("train", "--reference", tmp_path / "p0.nrrd", "--follow-up", tmp_path / "p1.nrrd", 1,
                     "--iterations", 3, "--no-report", "--output", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert model["format"] == MODEL_FORMAT
    model["format"] = MODEL_FORMAT + 1
    torch.save(model, tmp_path / "run" / "model.pt")
    refused = stnerp("predict", "--run", tmp_path / "run", "--times", 0.5, "--output", tmp_path / "p")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"format {MODEL_FORMAT + 1}" in errors[0] and "train the run again" in errors[0]
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").glob("t_*"))


def test_model_file_stores_fields_of_view_as_bits_and_labels_as_bytes_and_reads_both_back(tmp_path):
    """A partial field of view is kept one bit a voxel and a labelmap of labels below 256 one byte a voxel (not one
    byte and four bytes: 512 x 512 x 300 voxels of labels took 315 MB of model.pt); a file written the old way still
    reads, to the same masks and labels."""
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=2, noise_hu=0)
    sitk.WriteImage(series.images[0], str(tmp_path / "p0.nrrd"))
    sitk.WriteImage(padded(series.images[1], -3024.0), str(tmp_path / "p1.nrrd"))
    sitk.WriteImage(series.labelmaps[0], str(tmp_path / "labels.nrrd"))
    trained = stnerp("train", "--reference", tmp_path / "p0.nrrd", "--follow-up", tmp_path / "p1.nrrd", 1,
                     "--segmentation", tmp_path / "labels.nrrd", "--iterations", 3, "--no-report",
                     "--output", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    path = tmp_path / "run" / "model.pt"
    stored = torch.load(path, weights_only=True)
    [(time, view)] = stored["views"]
    voxels = 24 * 24 * 16
    assert stored["labelmap"].dtype == torch.uint8
    assert view.dtype == torch.uint8 and view.numel() == voxels // 8
    inside = cylinder(series.images[1])
    labels = sitk.GetArrayFromImage(series.labelmaps[0])
    model = SeriesModel.load(path, torch.device("cpu"))
    assert np.array_equal(model.views[1.0], inside) and np.array_equal(model.labelmap, labels)
    stored["labelmap"] = torch.from_numpy(labels.astype(np.int32))       # the layout before
    stored["views"] = [[time, torch.from_numpy(np.ascontiguousarray(inside))]]
    torch.save(stored, path)
    model = SeriesModel.load(path, torch.device("cpu"))
    assert np.array_equal(model.views[1.0], inside) and np.array_equal(model.labelmap, labels)
