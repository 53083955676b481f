"""The decisions the STNeRP panel takes, without Qt: where runs go, which volumes to offer first,
which segments to propagate, whether torch is usable. The widget asks these and forwards the
answers to its Qt controls, so pytest checks them against a real MRML scene.
"""
from __future__ import annotations

import importlib.metadata
import os
import tempfile
from collections.abc import Collection, Sequence

import vtk

import slicer
from STNeRPLib import contract

from .scene_utils import nodes_of_class

#: the oldest torch the worker runs with (torch.load(weights_only=...), torch.func)
MINIMUM_TORCH = (2, 0)
#: folder name of the runs under the user's default scene folder
RUNS_FOLDER_NAME = "STNeRP runs"


class PanelError(ValueError):
    """A choice in the panel that cannot work; the message is one line for the user."""


# -- run folders -----------------------------------------------------------------------------
def runs_folder(chosen: str, defaults: list[str]) -> str:
    """The absolute, writable folder that new runs go into.

    chosen: the user's setting ("" when never set; a ctkDirectoryButton that was never set
    reports "."). defaults: candidate folders in order of preference (the application's user-data
    and temporary folders). A chosen folder that is relative or not writable is an error, not
    silently replaced: the user picked it."""
    if chosen and chosen != ".":
        if not os.path.isabs(chosen):
            raise PanelError(f"The runs folder '{chosen}' is not an absolute path: choose a folder in Settings.")
        if not _writable(chosen):
            raise PanelError(f"The runs folder '{chosen}' cannot be written: choose another folder in Settings.")
        return os.path.normpath(chosen)
    for folder in defaults:
        if folder and os.path.isabs(folder) and _writable(folder):
            return os.path.normpath(folder)
    raise PanelError("No writable folder for the runs was found: choose a folder in Settings.")


def default_runs_folders(default_scene_path: str, temporary_path: str) -> list[str]:
    """The default runs folder under the user's default scene folder (kept, like saved scenes),
    then under the application's temporary folder."""
    return [os.path.join(default_scene_path, RUNS_FOLDER_NAME), os.path.join(temporary_path, RUNS_FOLDER_NAME)]


def _writable(folder: str) -> bool:
    """Whether a file can be created in `folder` (made if missing)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


# -- volumes ---------------------------------------------------------------------------------
def scalar_volumes(scene: slicer.vtkMRMLScene) -> list[slicer.vtkMRMLScalarVolumeNode]:
    """Scalar volumes of the scene that the volume selectors show (labelmaps left out)."""
    return [n for n in nodes_of_class(scene, "vtkMRMLScalarVolumeNode")
            if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetHideFromEditors()]


def default_reference(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLScalarVolumeNode | None:
    """The first scalar volume, or None."""
    volumes = scalar_volumes(scene)
    return volumes[0] if volumes else None


def default_follow_up(scene: slicer.vtkMRMLScene, reference: slicer.vtkMRMLScalarVolumeNode | None,
                      used: Sequence[slicer.vtkMRMLScalarVolumeNode] = ()) -> slicer.vtkMRMLScalarVolumeNode | None:
    """The first scalar volume that is neither the reference nor already a follow-up, or None."""
    taken = [reference, *used]
    return next((v for v in scalar_volumes(scene) if all(v is not n for n in taken)), None)


# -- segments --------------------------------------------------------------------------------
def segments(segmentation_node: slicer.vtkMRMLSegmentationNode | None,
             excluded_ids: Collection[str]) -> list[tuple[str, str, bool]]:
    """(segment ID, name, checked) of every segment now in the segmentation: a segment added
    later is checked, a deleted one is gone."""
    if segmentation_node is None:
        return []
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    out = []
    for i in range(ids.GetNumberOfValues()):
        sid = ids.GetValue(i)
        out.append((sid, segmentation.GetSegment(sid).GetName(), sid not in set(excluded_ids)))
    return out


def chosen_segment_ids(segmentation_node: slicer.vtkMRMLSegmentationNode | None,
                       excluded_ids: Collection[str]) -> list[str]:
    """IDs of the segments to propagate, in the segmentation's order; PanelError when every
    segment is left out."""
    chosen = [sid for sid, _, checked in segments(segmentation_node, excluded_ids) if checked]
    if segmentation_node is not None and not chosen:
        raise PanelError("Every segment is unchecked: check the segments to propagate, or choose no segmentation.")
    return chosen


# -- unfinished runs -------------------------------------------------------------------------
def resumable_run(run_dir: str) -> bool:
    """Whether the run in run_dir can be continued from its checkpoint (train --resume)."""
    try:
        return bool(run_dir) and contract.resumable(contract.read_run(run_dir))
    except (OSError, ValueError):
        return False


# -- report ----------------------------------------------------------------------------------
def report_page(run_dir: str) -> str | None:
    """The run's report page (absolute path) if the run wrote one, else None."""
    page = os.path.join(run_dir, *contract.REPORT_PAGE.split("/")) if run_dir else ""
    return page if page and os.path.isfile(page) else None


# -- torch -----------------------------------------------------------------------------------
def torch_problem() -> str | None:
    """Why the installed torch cannot run the worker ("" or None when it can), read from the
    package metadata: importing torch into Slicer's own process is not needed and would lock
    its files against a reinstall."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "PyTorch is not installed"
    if _version_tuple(version) < MINIMUM_TORCH:
        return f"PyTorch {version} is older than {'.'.join(map(str, MINIMUM_TORCH))}"
    return None


def torch_requirement() -> str:
    """The version requirement to give the PyTorch extension's installer."""
    return f">={'.'.join(map(str, MINIMUM_TORCH))}"


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)
