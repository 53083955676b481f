"""STNeRP: spatial-temporal neural representation with prior embedding, as a Slicer module.

Pick a reference volume, follow-ups (a list of volumes with times, or a volume sequence) and
optionally a segmentation and landmarks; Apply trains the STNeRPLib worker in a background
process (Slicer's own Python) and loads per time point the displacement-field transform, the
propagated segmentation, the Jacobian determinant map and the predicted image, plus sequences
and a metrics table. The time slider asks the trained model for any other time.

The Qt panel (STNeRPWidget) only forwards its signals: every decision is taken in the Qt-free
package STNeRPModuleLib, tested with pytest on a real MRML scene (see ARCHITECTURE.md).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from STNeRPLib import contract
from STNeRPModuleLib import core_logic, panel, parameters, predictions, run_import, scene_files

if TYPE_CHECKING:
    from STNeRPLib.phantom import PhantomSeries

#: application setting that holds the user's runs folder ("" = the default)
RUNS_FOLDER_SETTING = "STNeRP/RunsFolder"


class STNeRP(ScriptedLoadableModule):
    """Slicer's description of the module (title, category, help, acknowledgement); it also has the STNeRP
    grid transforms of every scene loaded later set back to linear interpolation."""
    def __init__(self, parent: qt.QObject) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ST-NeRP"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["STNeRP developers"]
        self.parent.helpText = """
Registers a whole image series (4D CT breathing phases, or CT fractions over weeks of radiotherapy)
to a reference with one spatial-temporal implicit neural network (ST-NeRP), propagates contours
to every time point, maps the Jacobian determinant of each deformation, and predicts images,
transforms and contours at unscanned times. Training runs in a background process; torch comes
from the PyTorch extension. Runs are written to the runs folder shown under Settings.
"""
        self.parent.acknowledgementText = """
Method: ST-NeRP, spatial-temporal neural representation learning with prior embedding for
patient-specific imaging study. Background-process pattern after SlicerMONAIAuto3DSeg; torch through
SlicerPyTorch.
"""
        # after the event loop starts: at start-up and when the module is loaded later alike
        qt.QTimer.singleShot(0, lambda: scene_files.observe_scene_loading(slicer.mrmlScene))


class STNeRPWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: forwards its signals to the parameter node and the logic, polls the jobs."""

    POLL_INTERVAL_MS = 200

    # the panel's state (set on the instance as it changes)
    logic: STNeRPLogic  # set in setup(), before any signal is connected
    _parameterNode: slicer.vtkMRMLScriptedModuleNode | None = None
    _segmentationNode: slicer.vtkMRMLSegmentationNode | None = None
    _updatingGUI: bool = False
    _job: core_logic.Job | None = None
    _predictions: predictions.TimeSliderPredictions | None = None

    def __init__(self, parent: qt.QWidget | None = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    # -- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Called when the user opens the module the first time: build the panel from its .ui file, connect
        its signals, observe scene closes and show the runs folder."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/STNeRP.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = STNeRPLogic()
        self._fillComboBoxes()

        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for widget, signal, slot in self._connections():
            widget.connect(signal, slot)
        self._showRunsFolder()
        self.initializeParameterNode()

    def _connections(self) -> list[tuple[qt.QObject, str, Callable[..., None]]]:
        """(widget, Qt signal, handler) of every control: a setting goes to the parameter node, an
        action to its handler."""
        ui, toParameterNode = self.ui, self.updateParameterNodeFromGUI
        settings = [(selector, "currentNodeChanged(vtkMRMLNode*)")
                    for selector in (ui.referenceVolumeSelector, ui.followUpSequenceSelector,
                                     ui.segmentationSelector, ui.referenceLandmarksSelector)]
        settings += [(combo, "currentIndexChanged(int)")
                     for combo in (ui.followUpModeComboBox, ui.presetComboBox, ui.deviceComboBox, ui.priorComboBox,
                                   ui.prealignComboBox, ui.similarityComboBox, ui.intensityComboBox,
                                   ui.labelInterpolationComboBox, ui.anchorReferenceComboBox,
                                   ui.stopOnConvergenceComboBox, ui.calibrateIntensitiesComboBox)]
        settings += [(ui.referenceTimeSpinBox, "valueChanged(double)"), (ui.iterationsSpinBox, "valueChanged(int)"),
                     (ui.velocityLevelsSpinBox, "valueChanged(int)"),
                     (ui.structurePointsSpinBox, "valueChanged(double)"),
                     (ui.createSequencesCheckBox, "toggled(bool)"),
                     (ui.predictTimesLineEdit, "editingFinished()"),
                     (ui.segmentsListWidget, "itemChanged(QListWidgetItem*)"),
                     (ui.followUpTable, "cellChanged(int,int)")]
        actions: list[tuple[qt.QObject, str, Callable[..., None]]] = [
            (ui.segmentationSelector, "currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged),
            (ui.runsFolderButton, "directoryChanged(QString)", self.onRunsFolderChanged),
            (ui.timeSlider, "valueChanged(double)", self.onTimeSliderChanged)]
        actions += [(button, "clicked(bool)", slot) for button, slot in (
            (ui.addFollowUpButton, self.onAddFollowUp), (ui.removeFollowUpButton, self.onRemoveFollowUp),
            (ui.applyButton, self.onApplyButton), (ui.resumeButton, self.onResumeButton),
            (ui.predictButton, self.onPredictButton), (ui.openReportButton, self.onOpenReport))]
        return [(widget, signal, toParameterNode) for widget, signal in settings] + actions

    def _fillComboBoxes(self) -> None:
        """The choices the worker contract offers (one definition, in STNeRPLib.contract)."""
        for combo, choices in ((self.ui.presetComboBox, contract.PRESET_NAMES),
                               (self.ui.deviceComboBox, contract.DEVICES),
                               (self.ui.priorComboBox, parameters.PRIOR_CHOICES),
                               (self.ui.prealignComboBox, contract.PREALIGNMENTS),
                               (self.ui.similarityComboBox, parameters.SIMILARITY_CHOICES),
                               (self.ui.intensityComboBox, contract.INTENSITIES),
                               (self.ui.labelInterpolationComboBox, parameters.LABEL_INTERPOLATION_CHOICES),
                               (self.ui.anchorReferenceComboBox, parameters.SWITCH_CHOICES),
                               (self.ui.stopOnConvergenceComboBox, parameters.SWITCH_CHOICES),
                               (self.ui.calibrateIntensitiesComboBox, parameters.SWITCH_CHOICES)):
            combo.clear()
            for choice in choices:
                combo.addItem(choice)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed: cancel a running training,
        close the time-slider predictions and stop polling."""
        self.removeObservers()
        if self._job is not None:
            self._job.cancel()
        self._closePredictions()
        if hasattr(self, "timer"):
            self.timer.stop()

    def enter(self) -> None:
        """Called each time the user opens this module: observe the parameter node and show it in the panel."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module: stop updating the panel from the parameter node."""
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller: slicer.vtkMRMLScene, event: str) -> None:
        """Node IDs are reused by the next scene: forget every node of this one."""
        if self._job is not None:
            self._job.cancel()   # still polled: it ends cancelled, imports nothing, removes its inputs
        self._closePredictions()
        self._observeSegmentation(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: slicer.vtkMRMLScene, event: str) -> None:
        """Called just after the scene is closed: observe the new scene's parameter node if the module is open."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Observe the module's parameter node (created with defaults if missing); with no reference volume set,
        choose the scene's first scalar volume."""
        self.setParameterNode(self.logic.getParameterNode())
        pn = self._parameterNode
        if pn is not None and pn.GetNodeReference(parameters.REFERENCE_VOLUME) is None:
            reference = panel.default_reference(slicer.mrmlScene)
            if reference is not None:
                pn.SetNodeReferenceID(parameters.REFERENCE_VOLUME, reference.GetID())

    def setParameterNode(self, node: slicer.vtkMRMLScriptedModuleNode | None) -> None:
        """Show and observe this parameter node instead of the current one (None: none)."""
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    # -- parameter node <-> GUI ------------------------------------------------------------
    def updateGUIFromParameterNode(self, caller: slicer.vtkMRMLScriptedModuleNode | None = None,
                                   event: str | None = None) -> None:
        """Called when the parameter node is modified: show its inputs, settings, segments, last run and the
        state of the buttons in the panel."""
        pn = self._parameterNode
        if pn is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            ui = self.ui
            ui.referenceVolumeSelector.setCurrentNode(pn.GetNodeReference(parameters.REFERENCE_VOLUME))
            ui.followUpSequenceSelector.setCurrentNode(pn.GetNodeReference(parameters.FOLLOW_UP_SEQUENCE))
            ui.segmentationSelector.setCurrentNode(pn.GetNodeReference(parameters.SEGMENTATION))
            ui.referenceLandmarksSelector.setCurrentNode(pn.GetNodeReference(parameters.REFERENCE_LANDMARKS))
            ui.referenceTimeSpinBox.value = parameters.get_float(pn, "ReferenceTime")
            sequenceMode = pn.GetParameter("FollowUpMode") == "sequence"
            ui.followUpModeComboBox.currentIndex = 1 if sequenceMode else 0
            ui.followUpVolumesWidget.visible = not sequenceMode
            ui.followUpSequenceSelector.visible = sequenceMode
            ui.followUpSequenceLabel.visible = sequenceMode
            self._setComboText(ui.presetComboBox, pn.GetParameter("Preset"))
            self._setComboText(ui.deviceComboBox, pn.GetParameter("Device"))
            self._setComboText(ui.priorComboBox, pn.GetParameter("Prior"))
            ui.iterationsSpinBox.value = parameters.get_int(pn, "Iterations")
            self._setComboText(ui.prealignComboBox, pn.GetParameter("Prealign"))
            self._setComboText(ui.similarityComboBox, pn.GetParameter("Similarity"))
            self._setComboText(ui.intensityComboBox, pn.GetParameter("Intensity"))
            self._setComboText(ui.labelInterpolationComboBox, pn.GetParameter("LabelInterpolation"))
            ui.velocityLevelsSpinBox.value = parameters.get_int(pn, "VelocityLevels")
            self._setComboText(ui.anchorReferenceComboBox, pn.GetParameter("AnchorReference"))
            self._setComboText(ui.stopOnConvergenceComboBox, pn.GetParameter("StopOnConvergence"))
            self._setComboText(ui.calibrateIntensitiesComboBox, pn.GetParameter("CalibrateIntensities"))
            ui.structurePointsSpinBox.value = parameters.get_float(pn, "StructurePoints",
                                                                   parameters.STRUCTURE_POINTS_PRESET)
            ui.createSequencesCheckBox.checked = parameters.get_bool(pn, "CreateSequences")
            ui.predictTimesLineEdit.text = " ".join(
                contract.format_time(t) for t in parameters.get_json(pn, "PredictTimes") or [])
            rows = parameters.get_follow_ups(pn)
            self._updateFollowUpTable(rows)
            self._defaultFollowUpSelection(rows)
            self._observeSegmentation(pn.GetNodeReference(parameters.SEGMENTATION))
            self._updateSegmentList()
            self._updateRunSection()
            self._updateButtons()
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *args: Any) -> None:
        """Called when the user changes an input or a setting, and before Apply or Resume: write every control's
        value to the parameter node in one modification."""
        pn = self._parameterNode
        if pn is None or self._updatingGUI:
            return
        ui = self.ui
        wasModified = pn.StartModify()
        try:
            pn.SetNodeReferenceID(parameters.REFERENCE_VOLUME, ui.referenceVolumeSelector.currentNodeID)
            pn.SetNodeReferenceID(parameters.FOLLOW_UP_SEQUENCE, ui.followUpSequenceSelector.currentNodeID)
            pn.SetNodeReferenceID(parameters.SEGMENTATION, ui.segmentationSelector.currentNodeID)
            pn.SetNodeReferenceID(parameters.REFERENCE_LANDMARKS, ui.referenceLandmarksSelector.currentNodeID)
            pn.SetParameter("ReferenceTime", repr(float(ui.referenceTimeSpinBox.value)))
            pn.SetParameter("FollowUpMode", "sequence" if ui.followUpModeComboBox.currentIndex == 1 else "volumes")
            pn.SetParameter("Preset", ui.presetComboBox.currentText)
            pn.SetParameter("Device", ui.deviceComboBox.currentText)
            pn.SetParameter("Prior", ui.priorComboBox.currentText)
            pn.SetParameter("Iterations", str(int(ui.iterationsSpinBox.value)))
            pn.SetParameter("Prealign", ui.prealignComboBox.currentText)
            pn.SetParameter("Similarity", ui.similarityComboBox.currentText)
            pn.SetParameter("Intensity", ui.intensityComboBox.currentText)
            pn.SetParameter("LabelInterpolation", ui.labelInterpolationComboBox.currentText)
            pn.SetParameter("VelocityLevels", str(int(ui.velocityLevelsSpinBox.value)))
            pn.SetParameter("AnchorReference", ui.anchorReferenceComboBox.currentText)
            pn.SetParameter("StopOnConvergence", ui.stopOnConvergenceComboBox.currentText)
            pn.SetParameter("CalibrateIntensities", ui.calibrateIntensitiesComboBox.currentText)
            pn.SetParameter("StructurePoints", parameters.structure_points_text(ui.structurePointsSpinBox.value))
            pn.SetParameter("CreateSequences", "true" if ui.createSequencesCheckBox.checked else "false")
            try:
                times = [float(v) for v in ui.predictTimesLineEdit.text.replace(",", " ").split()]
                parameters.set_json(pn, "PredictTimes", times)
            except ValueError:
                slicer.util.warningDisplay("Extra times must be numbers separated by spaces.")
            parameters.set_follow_ups(pn, self._followUpsFromTable())
            parameters.set_json(pn, "ExcludedSegmentIDs", self._uncheckedSegments())
        finally:
            pn.EndModify(wasModified)

    @staticmethod
    def _setComboText(combo: qt.QComboBox, text: str | None) -> None:
        index = combo.findText(text or "")
        if index >= 0:
            combo.currentIndex = index

    # -- runs folder -----------------------------------------------------------------------
    def onRunsFolderChanged(self, path: str) -> None:
        """Called when the user picks a runs folder: save it in the application settings and show the folder
        runs really go to."""
        qt.QSettings().setValue(RUNS_FOLDER_SETTING, path)
        self._showRunsFolder()

    def _showRunsFolder(self) -> None:
        """Show the folder runs really go to (a ctkDirectoryButton that was never set shows '.')."""
        button = self.ui.runsFolderButton
        button.blockSignals(True)
        try:
            button.directory = self.logic.runsFolder()
            button.toolTip = f"Runs are written to {button.directory}"
        except panel.PanelError as error:
            button.toolTip = str(error)
        finally:
            button.blockSignals(False)

    # -- follow-up table -------------------------------------------------------------------
    def _updateFollowUpTable(self, rows: list[parameters.FollowUp]) -> None:
        table = self.ui.followUpTable
        table.blockSignals(True)
        try:
            table.setRowCount(len(rows))
            for index, row in enumerate(rows):
                nameItem = qt.QTableWidgetItem(row.volume.GetName())
                nameItem.setData(qt.Qt.UserRole, row.volume.GetID())
                nameItem.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(index, 0, nameItem)
                table.setItem(index, 1, qt.QTableWidgetItem(contract.format_time(row.time)))
                self._cellComboBox(index, 2, "vtkMRMLMarkupsFiducialNode").setCurrentNode(row.landmarks)
                self._cellComboBox(index, 3, "vtkMRMLSegmentationNode").setCurrentNode(row.ground_truth)
        finally:
            table.blockSignals(False)

    def _cellComboBox(self, row: int, column: int, nodeType: str) -> slicer.qMRMLNodeComboBox:
        """The node selector in a cell of the follow-up table (made on first use); its changes
        go to the parameter node."""
        table = self.ui.followUpTable
        combo = table.cellWidget(row, column)
        if combo is None:
            combo = slicer.qMRMLNodeComboBox()
            combo.nodeTypes = [nodeType]
            combo.noneEnabled = True
            combo.addEnabled = combo.removeEnabled = combo.renameEnabled = False
            combo.setMRMLScene(slicer.mrmlScene)
            combo.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
            table.setCellWidget(row, column, combo)
        return combo

    def _followUpsFromTable(self) -> list[parameters.FollowUp]:
        table = self.ui.followUpTable
        rows = []
        for index in range(table.rowCount):
            nameItem = table.item(index, 0)
            volume = slicer.mrmlScene.GetNodeByID(nameItem.data(qt.Qt.UserRole)) if nameItem else None
            if volume is None:
                continue
            try:
                t = float(table.item(index, 1).text())
            except (AttributeError, ValueError):
                slicer.util.warningDisplay(f"The time of {volume.GetName()} must be a number.")
                return parameters.get_follow_ups(self._parameterNode)
            landmarks, truth = (table.cellWidget(index, c).currentNode() for c in (2, 3))
            rows.append(parameters.FollowUp(volume, t, landmarks, truth))
        return rows

    def _defaultFollowUpSelection(self, rows: list[parameters.FollowUp]) -> None:
        """Offer a volume that is neither the reference nor already a follow-up."""
        pn = cast("slicer.vtkMRMLScriptedModuleNode", self._parameterNode)
        reference = pn.GetNodeReference(parameters.REFERENCE_VOLUME)
        current = self.ui.followUpVolumeSelector.currentNode()
        if current is None or current is reference or any(current is row.volume for row in rows):
            candidate = panel.default_follow_up(slicer.mrmlScene, reference, [row.volume for row in rows])
            self.ui.followUpVolumeSelector.setCurrentNode(candidate)

    def onAddFollowUp(self) -> None:
        """Add button: append the chosen volume as a follow-up, one time unit after the latest time (the
        reference's included); a volume already listed is ignored."""
        volume = self.ui.followUpVolumeSelector.currentNode()
        pn = self._parameterNode
        if volume is None or pn is None:
            return
        rows = parameters.get_follow_ups(pn)
        if any(row.volume is volume for row in rows):
            return
        used = [row.time for row in rows] + [parameters.get_float(pn, "ReferenceTime")]
        parameters.set_follow_ups(pn, rows + [parameters.FollowUp(volume, max(used) + 1.0)])

    def onRemoveFollowUp(self) -> None:
        """Remove button: drop the follow-ups that have a selected cell in the table."""
        selected = {index.row() for index in self.ui.followUpTable.selectedIndexes()}
        rows = parameters.get_follow_ups(self._parameterNode)
        parameters.set_follow_ups(self._parameterNode, [row for i, row in enumerate(rows) if i not in selected])

    # -- segments --------------------------------------------------------------------------
    def onSegmentationChanged(self, node: slicer.vtkMRMLNode | None) -> None:
        """Called when the user picks another segmentation: every one of its segments is included again."""
        if self._parameterNode is not None and not self._updatingGUI:
            parameters.set_json(self._parameterNode, "ExcludedSegmentIDs", [])

    def _observeSegmentation(self, node: slicer.vtkMRMLSegmentationNode | None) -> None:
        """Keep the segment list in step with the segmentation (segments added or removed later)."""
        if node is self._segmentationNode:
            return
        events = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                  slicer.vtkSegmentation.SegmentModified)
        for event in events:
            if self._segmentationNode is not None:
                self.removeObserver(self._segmentationNode, event, self.onSegmentsModified)
            if node is not None:
                self.addObserver(node, event, self.onSegmentsModified)
        self._segmentationNode = node

    def onSegmentsModified(self, caller: slicer.vtkMRMLSegmentationNode, event: str) -> None:
        """Called when a segment of the chosen segmentation is added, removed or modified: refresh the segment
        list and the buttons."""
        self._updateSegmentList()
        self._updateButtons()

    def _updateSegmentList(self) -> None:
        listWidget = self.ui.segmentsListWidget
        excluded = parameters.get_json(self._parameterNode, "ExcludedSegmentIDs") or []
        listWidget.blockSignals(True)
        try:
            listWidget.clear()
            for sid, name, checked in panel.segments(self._segmentationNode, excluded):
                item = qt.QListWidgetItem(name)
                item.setData(qt.Qt.UserRole, sid)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
                listWidget.addItem(item)
        finally:
            listWidget.blockSignals(False)

    def _uncheckedSegments(self) -> list[str]:
        listWidget = self.ui.segmentsListWidget
        items = [listWidget.item(i) for i in range(listWidget.count)]
        return [item.data(qt.Qt.UserRole) for item in items if item.checkState() != qt.Qt.Checked]

    # -- buttons and the run section -------------------------------------------------------
    def _updateButtons(self) -> None:
        pn = self._parameterNode
        training = self._job is not None
        ready = False
        if pn is not None and not training:
            try:
                parameters.job_inputs(pn).validate()
                ready = True
                self.ui.applyButton.toolTip = "Train on the series in the background and load the results."
            except ValueError as error:
                self.ui.applyButton.toolTip = str(error)
        self.ui.applyButton.text = "Cancel" if training else "Apply"
        self.ui.applyButton.enabled = training or ready
        unfinished = pn.GetParameter("UnfinishedRunDirectory") if pn is not None else ""
        self.ui.resumeButton.visible = bool(unfinished)   # set only for a resumable run (record_training)
        self.ui.resumeButton.enabled = ready and not training
        self.ui.resumeButton.toolTip = f"Continue {unfinished} from its last checkpoint (same inputs and settings)."
        self.ui.inputsCollapsibleButton.enabled = not training
        self.ui.settingsCollapsibleButton.enabled = not training
        hasRun = pn is not None and bool(pn.GetParameter("LastRunDirectory"))
        self.ui.predictButton.enabled = hasRun and not training
        self.ui.timeSlider.enabled = hasRun and not training
        self.ui.openReportButton.enabled = (pn is not None
                                            and panel.report_page(pn.GetParameter("LastRunDirectory")) is not None)

    def _updateRunSection(self) -> None:
        pn = cast("slicer.vtkMRMLScriptedModuleNode", self._parameterNode)
        self.ui.runDirectoryLabel.text = pn.GetParameter("LastRunDirectory") or "(none yet)"
        times = parameters.get_json(pn, "LastTimes") or []
        if times:
            lo, hi = min(times), max(times)
            margin = 0.25 * (hi - lo if hi > lo else 1.0)
            self.ui.timeSlider.minimum = lo - margin
            self.ui.timeSlider.maximum = hi + margin
            self.ui.timeSlider.value = parameters.get_float(pn, "PredictTime", (lo + hi) / 2.0)

    # -- actions ---------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        """Apply button: check torch, confirm overlapping segments, then train on the panel's inputs in the
        background; while a training runs the button reads Cancel and cancels it."""
        if self._job is not None:
            self._job.cancel()   # returns at once; the timer sees the worker end
            return
        with slicer.util.tryWithErrorDisplay("Failed to start STNeRP.", waitCursor=True):
            self.updateParameterNodeFromGUI()
            if not self.ensureTorch():
                return
            overlap = self.logic.segmentOverlapWarning(self._parameterNode)
            if overlap and not slicer.util.confirmOkCancelDisplay(overlap, windowTitle="STNeRP: overlapping segments"):
                return
            self.ui.logTextEdit.clear()
            if overlap:
                self.ui.logTextEdit.appendPlainText(overlap)
            self._job = self.logic.startTraining(self._parameterNode)
            self._showStart(self._job)

    def onResumeButton(self) -> None:
        """Resume button: continue the unfinished run from its last checkpoint, with the same inputs and settings."""
        with slicer.util.tryWithErrorDisplay("Failed to resume STNeRP.", waitCursor=True):
            self.updateParameterNodeFromGUI()
            if not self.ensureTorch():
                return
            self.ui.logTextEdit.clear()
            self._job = self.logic.startTraining(self._parameterNode, resume=True)
            self._showStart(self._job)

    def onTimeSliderChanged(self, value: float) -> None:
        """Called when the time slider moves: remember the time and ask the trained model for it (as Predict)."""
        if self._parameterNode is None or self._updatingGUI:
            return
        self._parameterNode.SetParameter("PredictTime", repr(float(value)))
        self.onPredictButton()

    def onOpenReport(self) -> None:
        """Open report button: open the last run's report page (index.html) with the desktop's default application."""
        pn = cast("slicer.vtkMRMLScriptedModuleNode", self._parameterNode)
        page = panel.report_page(pn.GetParameter("LastRunDirectory"))
        if page is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(page))

    def onPredictButton(self) -> None:
        """Predict button: show the last run's prediction at the time slider's time, computed by the worker in
        the background (or imported from disk when that time was predicted before); starts polling."""
        with slicer.util.tryWithErrorDisplay("Failed to start the prediction.", waitCursor=True):
            pn = cast("slicer.vtkMRMLScriptedModuleNode", self._parameterNode)
            if self._predictions is None or self._predictions.run_dir != pn.GetParameter("LastRunDirectory"):
                self._closePredictions()
                self._predictions = self.logic.timeSliderPredictions(pn)
            self._predictions.request(float(self.ui.timeSlider.value))
            self.timer.start()

    def _closePredictions(self) -> None:
        if self._predictions is not None:
            self._predictions.close()
            self._predictions = None

    def _showStart(self, job: core_logic.Job) -> None:
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = job.status_text
        for line in job.log_lines:
            self.ui.logTextEdit.appendPlainText(line)
        self.timer.start()
        self._updateButtons()

    def onTimer(self) -> None:
        """Called by the timer every POLL_INTERVAL_MS ms: show the training's events, progress and end and poll
        the time-slider predictions; stops the timer when nothing is left running."""
        try:
            if self._job is not None:
                job = self._job
                self._showEvents(job.poll())
                self.ui.progressBar.value = int(1000 * job.progress)
                self.ui.statusLabel.text = job.status_text
                if job.finished:
                    self._onTrainingFinished(job)
            if self._predictions is not None:
                self._showEvents(self._predictions.poll())
                self.ui.predictButton.toolTip = self._predictions.message or ""
        except Exception as error:  # never leave the timer running on an unexpected error
            logging.exception("STNeRP: polling the worker failed")
            slicer.util.errorDisplay(f"STNeRP: {error}")
            self._job = None
        if self._job is None and (self._predictions is None or not self._predictions.busy):
            self.timer.stop()

    def _showEvents(self, events: list[dict]) -> None:
        for event in events:
            kind = event.get("event")
            if kind == "log":
                self.ui.logTextEdit.appendPlainText(event.get("text", ""))
            elif kind == contract.EVENT_ERROR:
                self.ui.logTextEdit.appendPlainText(f"ERROR: {event.get('message')}")

    def _onTrainingFinished(self, job: core_logic.Job) -> None:
        self._job = None
        self.ui.logTextEdit.appendPlainText(f"[{job.state}] {job.message or job.status_text}")
        if self._parameterNode is not None:
            parameters.record_training(self._parameterNode, job)
        if job.state == "complete":
            self.logic.showResult(job.result)
        elif job.state == "failed":
            slicer.util.errorDisplay(f"STNeRP failed: {job.message}", detailedText="\n".join(job.log_lines[-200:]))
        self._updateButtons()
        self.updateGUIFromParameterNode()

    def ensureTorch(self) -> bool:
        """torch is needed by the worker (which shares Slicer's Python packages): offer to install
        it through the PyTorch extension, after the user's confirmation."""
        problem = panel.torch_problem()
        if problem is None:
            return True
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(f"{problem}. STNeRP needs the PyTorch extension: install it with the "
                                     "Extensions Manager and restart Slicer.")
            return False
        if not slicer.util.confirmOkCancelDisplay(
                f"{problem}. STNeRP will now install it through the PyTorch extension ({panel.torch_requirement()}). "
                "This downloads about 1 GB and takes several minutes, during which Slicer does not respond."):
            return False
        self.ui.statusLabel.text = "Installing PyTorch, this takes several minutes..."
        slicer.app.processEvents()
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=panel.torch_requirement())
        self.ui.statusLabel.text = ""
        if torch is None or panel.torch_problem() is not None:
            slicer.util.warningDisplay(f"STNeRP cannot run without PyTorch {panel.torch_requirement()}.")
            return False
        return True


class STNeRPLogic(ScriptedLoadableModuleLogic):
    """Adapter between the application and the Qt-free STNeRPModuleLib: asks the application for
    the scene, the module logics, the runs folder setting and the temporary folder."""

    def getParameterNode(self) -> slicer.vtkMRMLScriptedModuleNode | None:
        """The module's parameter node (created if missing), with every missing parameter set to its default."""
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        return parameters.initialize(node) if node is not None else None

    @staticmethod
    def runsFolder() -> str:
        """The absolute, writable folder new runs go to (PanelError with one line if none)."""
        chosen = str(qt.QSettings().value(RUNS_FOLDER_SETTING, "") or "")
        return panel.runs_folder(chosen, panel.default_runs_folders(slicer.app.defaultScenePath,
                                                                    slicer.app.temporaryPath))

    def core(self) -> core_logic.STNeRPCoreLogic:
        """A Qt-free core logic on the current scene and the runs folder, with temporary files under Slicer's
        temporary folder (PanelError if no runs folder is usable)."""
        return core_logic.STNeRPCoreLogic(slicer.mrmlScene, slicer.modules.segmentations.logic(), self.runsFolder(),
                                          temp_root=os.path.join(slicer.app.temporaryPath, "STNeRP"))

    def startTraining(self, pn: slicer.vtkMRMLScriptedModuleNode, workerCommand: list[str] | None = None,
                      resume: bool = False) -> core_logic.Job:
        """Train on the parameter node's inputs; resume: continue its unfinished run instead."""
        inputs = parameters.job_inputs(pn)
        inputs.validate()
        reference = cast("slicer.vtkMRMLScalarVolumeNode", inputs.reference_volume)
        pn.SetNodeReferenceID(parameters.LAST_REFERENCE_VOLUME, reference.GetID())
        core = self.core()
        if workerCommand:
            core.worker_command = list(workerCommand)
        runDir = pn.GetParameter("UnfinishedRunDirectory") if resume else None
        return core.start_training(inputs, parameters.settings(pn), run_dir=runDir, resume=resume)

    def segmentOverlapWarning(self, pn: slicer.vtkMRMLScriptedModuleNode) -> str | None:
        """One line naming the chosen segments that overlap, to confirm before Apply (None: none do)."""
        return self.core().segment_overlap_warning(parameters.job_inputs(pn))

    def timeSliderPredictions(self, pn: slicer.vtkMRMLScriptedModuleNode,
                              workerCommand: list[str] | None = None) -> predictions.TimeSliderPredictions:
        """Predictions of the last complete run at any time, for the time slider (ValueError if there is none);
        workerCommand replaces the worker command (the self-test passes the stand-in)."""
        runDir = pn.GetParameter("LastRunDirectory")
        if not runDir or not os.path.isdir(runDir):
            raise ValueError("No trained run: press Apply first.")
        core = self.core()
        if workerCommand:
            core.worker_command = list(workerCommand)
        return predictions.TimeSliderPredictions(core, runDir, parameters.get_json(pn, "LastSegmentMap") or None,
                                                 pn.GetNodeReference(parameters.LAST_REFERENCE_VOLUME))

    @staticmethod
    def showResult(result: run_import.ImportedRun | None) -> None:
        """Show the last time point's predicted image and segmentation, and the structure volumes
        against time when the run wrote its report."""
        if result is None or not result.time_points:
            return
        if result.chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(result.chart)
        last = result.time_points[max(result.time_points)]
        if last.get("image") is not None:
            slicer.util.setSliceViewerLayers(background=last["image"], fit=True)
        segmentation = last.get("segmentation")
        if segmentation is not None and segmentation.GetDisplayNode() is not None:
            segmentation.GetDisplayNode().SetVisibility(True)

    @staticmethod
    def runSynchronously(job: core_logic.Job, timeout: float | None = None) -> core_logic.Job:
        """Poll a job until it ends, keeping the application responsive (self-test)."""
        start = time.monotonic()
        while not job.finished:
            if timeout is not None and time.monotonic() - start > timeout:
                job.cancel()
            if not job.poll():
                slicer.app.processEvents()
                time.sleep(0.05)
        return job


class STNeRPTest(ScriptedLoadableModuleTest):
    """The panel's logic in the real application on a small generated sample. Without torch (a
    factory Slicer: the PyTorch extension installs it only on demand) a stand-in worker writes a
    real run folder; with torch the real worker trains for a few iterations too."""

    def setUp(self) -> None:
        """Start each test from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run the stand-in worker and cancel tests, and the real training when torch is available."""
        self.setUp()
        self.test_STNeRP_sceneSide()
        self.setUp()
        self.test_STNeRP_cancel()
        if panel.torch_problem() is None:
            self.setUp()
            self.test_STNeRP_realTraining()
        else:
            self.delayDisplay(f"Real training skipped: {panel.torch_problem()}")

    def _standIn(self) -> list[str]:
        moduleDir = os.path.dirname(slicer.modules.stnerp.path)
        script = os.path.join(moduleDir, "Testing", "Python", "stnerp_standin_worker.py")
        return [core_logic.default_python_executable(), script]

    def _loadSample(self, nPhases: int = 3) -> tuple[PhantomSeries, list[slicer.vtkMRMLScalarVolumeNode],
                                                     slicer.vtkMRMLSegmentationNode]:
        import SimpleITK as sitk
        from STNeRPLib import phantom
        series = phantom.breathing_series(size=(48, 48, 32), n_phases=nPhases)
        folder = os.path.join(slicer.app.temporaryPath, "STNeRPTest")
        os.makedirs(folder, exist_ok=True)
        volumes = []
        for i, image in enumerate(series.images):
            path = os.path.join(folder, f"phase_{i}.nrrd")
            sitk.WriteImage(image, path)
            volumes.append(slicer.util.loadVolume(path, {"name": f"phase {i}"}))
        labelPath = os.path.join(folder, "labels.nrrd")
        sitk.WriteImage(series.labelmaps[0], labelPath)
        return series, volumes, slicer.util.loadSegmentation(labelPath)

    def _parameterNode(self, logic: STNeRPLogic, series: PhantomSeries,
                       volumes: list[slicer.vtkMRMLScalarVolumeNode], segmentation: slicer.vtkMRMLSegmentationNode,
                       iterations: int) -> slicer.vtkMRMLScriptedModuleNode:
        pn = cast("slicer.vtkMRMLScriptedModuleNode", logic.getParameterNode())
        pn.SetNodeReferenceID(parameters.REFERENCE_VOLUME, volumes[0].GetID())
        pn.SetParameter("ReferenceTime", repr(float(series.times[0])))
        parameters.set_follow_ups(pn, [parameters.FollowUp(v, float(t)) for v, t in zip(volumes[1:], series.times[1:])])
        pn.SetNodeReferenceID(parameters.SEGMENTATION, segmentation.GetID())
        pn.SetParameter("Iterations", str(iterations))
        pn.SetParameter("Device", "cpu")
        return pn

    def _checkRun(self, job: core_logic.Job, series: PhantomSeries,
                  segmentation: slicer.vtkMRMLSegmentationNode) -> None:
        self.assertEqual(job.state, "complete", job.message)
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        result = cast("run_import.ImportedRun", job.result)
        times = sorted(result.time_points)
        self.assertTrue({float(t) for t in series.times} <= set(times))
        for t in times:
            entry = result.time_points[t]
            self.assertTrue(entry["transform"].IsA("vtkMRMLGridTransformNode"))
            segments = entry["segmentation"].GetSegmentation()
            self.assertEqual([segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())],
                             names)
            self.assertAlmostEqual(entry["jacobian"].GetDisplayNode().GetLevel(), 1.0)
        self.assertEqual(result.sequences["transform"].GetNumberOfDataNodes(), len(times))

    def test_STNeRP_sceneSide(self) -> None:
        """With the stand-in worker, a training loads per time point a grid transform, the same segments and a
        Jacobian map (level 1), and a transform sequence; the time slider then shows the unscanned time 0.5."""
        self.delayDisplay("Stand-in worker: the scene side without torch")
        series, volumes, segmentation = self._loadSample()
        logic = STNeRPLogic()
        pn = self._parameterNode(logic, series, volumes, segmentation, iterations=3)
        job = logic.runSynchronously(logic.startTraining(pn, self._standIn()), timeout=120)
        self._checkRun(job, series, segmentation)
        parameters.record_training(pn, job)
        slider = logic.timeSliderPredictions(pn, self._standIn())
        slider.quiet = 0.0
        slider.request(0.5)
        start = time.monotonic()
        while slider.shown_time != 0.5 and time.monotonic() - start < 60:
            slider.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(slider.shown_time, 0.5, slider.message)
        slider.close()
        self.delayDisplay("Scene side passed")

    def test_STNeRP_cancel(self) -> None:
        """Cancelling a running training ends the job cancelled, records the run as interrupted and leaves the
        scene's nodes as they were."""
        series, volumes, segmentation = self._loadSample()
        logic = STNeRPLogic()
        pn = self._parameterNode(logic, series, volumes, segmentation, iterations=3)
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        os.environ["STNERP_STANDIN_MODE"] = "slow"
        try:
            job = logic.startTraining(pn, self._standIn())
            start = time.monotonic()
            while not any(e.get("event") == contract.EVENT_PROGRESS for e in job.poll()):
                self.assertLess(time.monotonic() - start, 60, "no progress from the stand-in worker")
                slicer.app.processEvents()
                time.sleep(0.05)
            job.cancel()
            logic.runSynchronously(job, timeout=60)
        finally:
            del os.environ["STNERP_STANDIN_MODE"]
        self.assertEqual(job.state, "cancelled")
        self.assertEqual(run_import.read_record(job.run_dir)["status"], contract.STATUS_INTERRUPTED)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay("Cancel passed")

    def test_STNeRP_realTraining(self) -> None:
        """The real worker trains 20 iterations on the sample and its results load as with the stand-in."""
        self.delayDisplay("Real worker: a tiny training")
        series, volumes, segmentation = self._loadSample()
        logic = STNeRPLogic()
        pn = self._parameterNode(logic, series, volumes, segmentation, iterations=20)
        job = logic.runSynchronously(logic.startTraining(pn), timeout=900)
        self._checkRun(job, series, segmentation)
        self.delayDisplay("Real training passed")
