"""Small scene utilities of the STNeRP module, without Qt: LPS <-> RAS, node removal, a
transaction that undoes a failed import, subject-hierarchy folders.

Files are LPS (ITK), the scene is RAS: x and y change sign between the two.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import vtk

import slicer

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

#: attribute set on every node this module creates, value = run folder
RUN_ATTRIBUTE = "STNeRP.RunDirectory"
#: attribute on imported nodes: the time value (user's units) as text
TIME_ATTRIBUTE = "STNeRP.Time"
#: attribute on imported nodes: the kind of result (transform, segmentation, jacobian, image)
KIND_ATTRIBUTE = "STNeRP.Kind"


def lps_to_ras(point: Sequence[float] | np.ndarray) -> list[float]:
    """A point in LPS (files, ITK) as RAS (the scene): x and y change sign."""
    return [-float(point[0]), -float(point[1]), float(point[2])]


def ras_to_lps(point: Sequence[float] | np.ndarray) -> list[float]:
    """A point in RAS (the scene) as LPS (files, ITK): x and y change sign."""
    return [-float(point[0]), -float(point[1]), float(point[2])]


def register_segmentation_converters() -> None:
    """Register the closed-surface converter rules once (the Slicer app does this at startup;
    the slicer-core wheel does not, and segmentation nodes need them)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    names = {rule.GetClassName() for rule in factory.GetConverterRules() or ()}
    for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if cls.__name__ not in names:
            factory.RegisterConverterRule(cls())


def nodes_of_class(scene: slicer.vtkMRMLScene, class_name: str) -> list[slicer.vtkMRMLNode]:
    """The scene's nodes of a class (its subclasses included), in scene order."""
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def remove_nodes(scene: slicer.vtkMRMLScene, nodes: Iterable[slicer.vtkMRMLNode | None]) -> None:
    """Remove those of `nodes` that are still in the scene: sequence browsers first (a live
    browser would re-create the proxy nodes removed before it), then the others in reverse order
    of creation. Nodes of a closed scene are not in it, so a stale list removes nothing."""
    present = [n for n in nodes if n is not None]
    browsers = [n for n in present if n.IsA("vtkMRMLSequenceBrowserNode")]
    for node in browsers + [n for n in reversed(present) if not n.IsA("vtkMRMLSequenceBrowserNode")]:
        if scene.IsNodePresent(node):
            scene.RemoveNode(node)


def folder_exists(scene: slicer.vtkMRMLScene, item: int) -> bool:
    """Whether a subject-hierarchy item is in the scene's hierarchy (asked without the error log
    that a name lookup of a removed item writes)."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None or not item:
        return False
    children = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), children, True)
    return children.IsId(item) >= 0


def remove_folder(scene: slicer.vtkMRMLScene, item: int, run_dir: str) -> None:
    """Remove a folder item this module made for `run_dir` (item IDs are reused after a scene
    close: the run attribute tells ours from a user's)."""
    sh = scene.GetSubjectHierarchyNode()
    if folder_exists(scene, item) and sh.GetItemAttribute(item, RUN_ATTRIBUTE) == run_dir:
        sh.RemoveItem(item, False, True)


def place_in_folder(sh: slicer.vtkMRMLSubjectHierarchyNode, node: slicer.vtkMRMLNode, folder_item: int) -> None:
    """Put a node under a subject-hierarchy folder (creating its item when no subject
    hierarchy logic made one, as in the slicer-core wheel)."""
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, folder_item)
    else:
        sh.CreateItem(folder_item, node)


class SceneTransaction:
    """Removes every node added to the scene (and a subject-hierarchy folder) when the block
    raises, so a failed import leaves the scene as it was."""

    def __init__(self, scene: slicer.vtkMRMLScene) -> None:
        self.scene = scene
        self.folder_item: int | None = None
        self._before: set[str] = set()

    def __enter__(self) -> SceneTransaction:
        self._before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        return self

    def added_nodes(self) -> list[slicer.vtkMRMLNode]:
        """The scene's nodes added since the block began, in scene order."""
        nodes = (self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes()))
        return [node for node in nodes if node.GetID() not in self._before]

    def rollback(self) -> None:
        """Remove the nodes added since the block began and the folder item (if set and still in the
        subject hierarchy)."""
        remove_nodes(self.scene, self.added_nodes())
        sh = self.scene.GetSubjectHierarchyNode()
        if self.folder_item and folder_exists(self.scene, self.folder_item):
            sh.RemoveItem(self.folder_item, False, True)
        self.folder_item = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc_type is not None:
            try:
                self.rollback()
            except Exception:  # never hide the original error
                logger.exception("STNeRP: rollback after a failed import failed")
        return False


class TemporaryNodes(SceneTransaction):
    """Every node added inside the block is removed at its end (export helpers)."""

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        self.rollback()
        return False
