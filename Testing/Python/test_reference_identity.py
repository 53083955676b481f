"""The field at the reference time is the identity by construction (u(p, t_ref) = 0), in the
Deformation itself, in the written outputs of a real run (continuous time and pairwise), and in
a model queried later; a model file of the older format, which lacks this, is refused clearly."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib.deformation import Deformation
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.presets import DEFAULT


def stnerp(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "STNeRPLib", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def largest_displacement_mm(path) -> float:
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return float(np.linalg.norm(field, axis=-1).max())


def test_velocity_is_zero_at_the_reference_time_and_continuous_around_it():
    deformation = Deformation(DEFAULT, (5, 6, 7), 0.4, None, torch.Generator().manual_seed(1))
    with torch.no_grad():
        deformation.nets[0].mlp[-1].weight.mul_(100)        # a net far from zero everywhere
        v = deformation.velocity([0.0, 0.4, 0.4 + 1e-4, 1.0])
        u = deformation.displacement([0.4, 0.9])
    assert v[0].abs().max() > 1e-2 and v[3].abs().max() > 1e-2
    assert torch.equal(v[1], torch.zeros_like(v[1]))
    assert 0 < v[2].abs().max() < 1e-3 * v[3].abs().max()   # no jump next to the reference time
    assert torch.equal(u[0], torch.zeros_like(u[0])) and u[1].abs().max() > 1e-2


def test_pairwise_deformation_is_zero_at_the_reference_time():
    deformation = Deformation(DEFAULT, (4, 4, 4), 0.0, [0.5, 1.0], torch.Generator().manual_seed(1))
    with torch.no_grad():
        for net in deformation.nets:
            net.mlp[-1].bias.fill_(0.1)
        u = deformation.displacement([0.0, 0.5])
    assert torch.equal(u[0], torch.zeros_like(u[0])) and u[1].abs().min() > 0.05
    assert len(deformation.nets) == 2                        # no network for the reference time


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """4 phases; the reference is phase 1, so its normalised time (1/3) is inside the range."""
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 14.0), n_phases=4, noise_hu=0)
    return series, write_series(series, tmp_path_factory.mktemp("phantom"))


def train(phantom, output, *extra) -> subprocess.CompletedProcess:
    series, files = phantom
    args = ["train", "--reference", files["images"][1], "--reference-time", 1, "--output", output,
            "--iterations", 40, *extra]
    for k in (0, 2, 3):
        args += ["--follow-up", files["images"][k], series.times[k]]
    return stnerp(*args)


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "train"
    result = train(phantom, output)
    assert result.returncode == 0, result.stderr
    return output


def test_written_field_at_the_reference_time_is_the_identity(trained):
    assert largest_displacement_mm(trained / "t_1/displacement.nrrd") < 0.01
    assert largest_displacement_mm(trained / "t_3/displacement.nrrd") > 1.0    # the others did move


def test_pairwise_run_writes_the_identity_at_the_reference_time(phantom, tmp_path):
    result = train(phantom, tmp_path / "pairwise", "--pairwise")
    assert result.returncode == 0, result.stderr
    assert largest_displacement_mm(tmp_path / "pairwise/t_1/displacement.nrrd") < 0.01
    assert largest_displacement_mm(tmp_path / "pairwise/t_3/displacement.nrrd") > 1.0


def test_saved_model_queried_at_the_reference_time_gives_the_identity(trained, tmp_path):
    result = stnerp("predict", "--run", trained, "--times", 1, 1.5, "--output", tmp_path / "p")
    assert result.returncode == 0, result.stderr
    assert largest_displacement_mm(tmp_path / "p/t_1/displacement.nrrd") < 0.01
    assert largest_displacement_mm(tmp_path / "p/t_1.5/displacement.nrrd") > 0.1


def test_model_of_the_older_format_is_refused_with_a_clear_message(trained, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    data = torch.load(trained / "model.pt", weights_only=True)
    del data["format"]                                        # format 1 had no "format" key
    torch.save(data, old / "model.pt")
    run = json.loads((trained / "run.json").read_text())
    (old / "run.json").write_text(json.dumps(run))
    result = stnerp("predict", "--run", old, "--times", 1.5, "--output", tmp_path / "p")
    assert result.returncode == 2
    assert "older STNeRP" in result.stderr and "train the series again" in result.stderr
    assert json.loads((tmp_path / "p/run.json").read_text())["status"] == "failed"
