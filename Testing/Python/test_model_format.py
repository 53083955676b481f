"""model.pt records the version of its layout; a file of another version is refused in one line."""

import SimpleITK as sitk
import torch

from STNeRPLib.model import MODEL_FORMAT
from STNeRPLib.phantom import breathing_series
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
