"""STNeRP: spatial-temporal neural representation with prior embedding, as a Slicer module.

Pick a reference volume, follow-ups (a list of volumes with times, or a volume sequence) and
optionally a segmentation and landmarks; Apply trains the STNeRPLib worker in a background
process (Slicer's own Python) and loads per time point the displacement-field transform, the
propagated segmentation, the Jacobian determinant map and the predicted image, plus sequences
and a metrics table. The time slider asks the trained model for any other time.

The Qt panel (STNeRPWidget) only wires the .ui file to the logic; the scene-side work is in
the Qt-free package STNeRPModuleLib (tested with pytest on a real MRML scene).
"""

import logging
import os
import time

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

from STNeRPModuleLib import core_logic, parameters, scene_io, worker_process


#
# STNeRP
#


class STNeRP(ScriptedLoadableModule):
    def __init__(self, parent):
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
from the PyTorch extension.
"""
        self.parent.acknowledgementText = """
Method: ST-NeRP, spatial-temporal neural representation learning with prior embedding for
patient-specific imaging study. Background-process pattern after SlicerMONAIAuto3DSeg; torch through
SlicerPyTorch.
"""
        slicer.app.connect("startupCompleted()", self.observeSceneLoading)

    @staticmethod
    def observeSceneLoading():
        """Slicer reads saved grid transforms back with cubic interpolation: after every scene
        load, STNeRP's transforms are set linear again, so they map points as ITK does."""
        slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndImportEvent,
                                     lambda scene, event: scene_io.restore_grid_interpolation(scene))


#
# STNeRPWidget
#


class STNeRPWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: reads/writes the parameter node, starts jobs through the logic, polls them."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._job = None
        self._lastPrediction = None

    # -- set-up ----------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/STNeRP.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = STNeRPLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        ui = self.ui
        for selector in (ui.referenceVolumeSelector, ui.followUpSequenceSelector, ui.segmentationSelector,
                         ui.referenceLandmarksSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        ui.referenceTimeSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        ui.followUpModeComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        ui.presetComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        ui.priorComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        ui.iterationsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        ui.prealignCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        ui.createSequencesCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        ui.predictTimesLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        ui.outputDirectoryButton.connect("directoryChanged(QString)", self.updateParameterNodeFromGUI)
        ui.segmentsListWidget.connect("itemChanged(QListWidgetItem*)", self.updateParameterNodeFromGUI)
        ui.followUpTable.connect("cellChanged(int,int)", self.updateParameterNodeFromGUI)
        ui.addFollowUpButton.connect("clicked(bool)", self.onAddFollowUp)
        ui.removeFollowUpButton.connect("clicked(bool)", self.onRemoveFollowUp)
        ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        ui.predictButton.connect("clicked(bool)", self.onPredictButton)
        ui.timeSlider.connect("valueChanged(double)", self.onTimeSliderChanged)

        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self._job is not None and not self._job.finished:
            self._job.cancel()
        if hasattr(self, "timer"):
            self.timer.stop()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        if self._job is not None and not self._job.finished:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        pn = self._parameterNode
        if pn is not None and not pn.GetNodeReference(parameters.REFERENCE_VOLUME):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                pn.SetNodeReferenceID(parameters.REFERENCE_VOLUME, first.GetID())

    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    # -- parameter node <-> GUI ------------------------------------------------------------
    def updateGUIFromParameterNode(self, caller=None, event=None):
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
            ui.prealignCheckBox.checked = pn.GetParameter("Prealign") == "affine"
            ui.createSequencesCheckBox.checked = parameters.get_bool(pn, "CreateSequences")
            ui.predictTimesLineEdit.text = " ".join(
                scene_io.format_time(t) for t in parameters.get_json(pn, "PredictTimes") or [])
            ui.outputDirectoryButton.directory = pn.GetParameter("OutputDirectory") or ""
            self._updateFollowUpTable(parameters.get_follow_ups(pn))
            self._updateSegmentList()
            self._updateRunSection()
            self._updateButtons()
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *args):
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
            pn.SetParameter("Prealign", "affine" if ui.prealignCheckBox.checked else "none")
            pn.SetParameter("CreateSequences", "true" if ui.createSequencesCheckBox.checked else "false")
            pn.SetParameter("OutputDirectory", ui.outputDirectoryButton.directory or "")
            try:
                times = [float(v) for v in ui.predictTimesLineEdit.text.replace(",", " ").split()]
                parameters.set_json(pn, "PredictTimes", times)
            except ValueError:
                slicer.util.warningDisplay("Extra times must be numbers separated by spaces.")
            parameters.set_follow_ups(pn, self._followUpsFromTable())
            checked = []
            for i in range(ui.segmentsListWidget.count):
                item = ui.segmentsListWidget.item(i)
                if item.checkState() == qt.Qt.Checked:
                    checked.append(item.data(qt.Qt.UserRole))
            parameters.set_json(pn, "SegmentIDs", checked)
        finally:
            pn.EndModify(wasModified)

    @staticmethod
    def _setComboText(combo, text):
        index = combo.findText(text or "")
        if index >= 0:
            combo.currentIndex = index

    # -- follow-up table -------------------------------------------------------------------
    def _updateFollowUpTable(self, items):
        table = self.ui.followUpTable
        table.blockSignals(True)
        try:
            table.setRowCount(len(items))
            for row, (volume, t, landmarks) in enumerate(items):
                nameItem = qt.QTableWidgetItem(volume.GetName())
                nameItem.setData(qt.Qt.UserRole, volume.GetID())
                nameItem.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(row, 0, nameItem)
                table.setItem(row, 1, qt.QTableWidgetItem(scene_io.format_time(t)))
                combo = table.cellWidget(row, 2)
                if combo is None:
                    combo = slicer.qMRMLNodeComboBox()
                    combo.nodeTypes = ["vtkMRMLMarkupsFiducialNode"]
                    combo.noneEnabled = True
                    combo.addEnabled = False
                    combo.removeEnabled = False
                    combo.setMRMLScene(slicer.mrmlScene)
                    combo.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
                    table.setCellWidget(row, 2, combo)
                combo.blockSignals(True)
                combo.setCurrentNode(landmarks)
                combo.blockSignals(False)
        finally:
            table.blockSignals(False)

    def _followUpsFromTable(self):
        table = self.ui.followUpTable
        items = []
        for row in range(table.rowCount):
            nameItem = table.item(row, 0)
            if nameItem is None:
                continue
            volume = slicer.mrmlScene.GetNodeByID(nameItem.data(qt.Qt.UserRole))
            if volume is None:
                continue
            try:
                t = float(table.item(row, 1).text())
            except (AttributeError, ValueError):
                t = float(row + 1)
            combo = table.cellWidget(row, 2)
            items.append((volume, t, combo.currentNode() if combo is not None else None))
        return items

    def onAddFollowUp(self):
        volume = self.ui.followUpVolumeSelector.currentNode()
        if volume is None or self._parameterNode is None:
            return
        items = parameters.get_follow_ups(self._parameterNode)
        if any(v is volume for v, _, _ in items):
            return
        used = [t for _, t, _ in items] + [parameters.get_float(self._parameterNode, "ReferenceTime")]
        items.append((volume, max(used) + 1.0, None))
        parameters.set_follow_ups(self._parameterNode, items)

    def onRemoveFollowUp(self):
        rows = sorted({index.row() for index in self.ui.followUpTable.selectedIndexes()}, reverse=True)
        items = parameters.get_follow_ups(self._parameterNode)
        for row in rows:
            if row < len(items):
                del items[row]
        parameters.set_follow_ups(self._parameterNode, items)

    # -- segments --------------------------------------------------------------------------
    def onSegmentationChanged(self, node):
        if self._parameterNode is not None and not self._updatingGUI:
            parameters.set_json(self._parameterNode, "SegmentIDs", [])
        self._updateSegmentList()

    def _updateSegmentList(self):
        listWidget = self.ui.segmentsListWidget
        listWidget.blockSignals(True)
        try:
            listWidget.clear()
            node = self.ui.segmentationSelector.currentNode()
            if node is None:
                return
            chosen = set(parameters.get_json(self._parameterNode, "SegmentIDs") or [])
            segmentation = node.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                sid = segmentation.GetNthSegmentID(i)
                item = qt.QListWidgetItem(segmentation.GetSegment(sid).GetName())
                item.setData(qt.Qt.UserRole, sid)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if (not chosen or sid in chosen) else qt.Qt.Unchecked)
                listWidget.addItem(item)
        finally:
            listWidget.blockSignals(False)

    # -- state of buttons and the run section ----------------------------------------------
    def _busy(self):
        return self._job is not None and not self._job.finished

    def _updateButtons(self):
        pn = self._parameterNode
        busy = self._busy()
        training = busy and self._job.kind == "train"
        ready = False
        if pn is not None:
            try:
                self.logic.inputsFromParameterNode(pn).validate()
                ready = True
                self.ui.applyButton.toolTip = "Train on the series in the background and load the results."
            except ValueError as exc:
                self.ui.applyButton.toolTip = str(exc)
        self.ui.applyButton.text = "Cancel" if busy else "Apply"
        self.ui.applyButton.enabled = busy or ready
        self.ui.inputsCollapsibleButton.enabled = not training
        self.ui.settingsCollapsibleButton.enabled = not training
        hasRun = pn is not None and bool(pn.GetParameter("LastRunDirectory"))
        self.ui.predictButton.enabled = hasRun and not busy
        self.ui.timeSlider.enabled = hasRun and not busy

    def _updateRunSection(self):
        pn = self._parameterNode
        runDir = pn.GetParameter("LastRunDirectory") if pn is not None else ""
        self.ui.runDirectoryLabel.text = runDir or "(none yet)"
        times = parameters.get_json(pn, "LastTimes") if pn is not None else []
        if times:
            ref = parameters.get_float(pn, "ReferenceTime")
            lo, hi = min(times + [ref]), max(times + [ref])
            margin = 0.25 * (hi - lo if hi > lo else 1.0)
            self.ui.timeSlider.minimum = lo - margin
            self.ui.timeSlider.maximum = hi + margin
            self.ui.timeSlider.value = parameters.get_float(pn, "PredictTime", (lo + hi) / 2.0)

    # -- actions ---------------------------------------------------------------------------
    def onApplyButton(self):
        if self._busy():
            self._job.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Failed to start STNeRP.", waitCursor=True):
            self.updateParameterNodeFromGUI()
            if not self.ensureTorch():
                return
            self.ui.logTextEdit.clear()
            self._startJob(self.logic.startTraining(self._parameterNode))

    def onTimeSliderChanged(self, value):
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.SetParameter("PredictTime", repr(float(value)))
            if not self._busy() and self._parameterNode.GetParameter("LastRunDirectory"):
                self.onPredictButton()

    def onPredictButton(self):
        if self._busy():
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the prediction.", waitCursor=True):
            t = float(self.ui.timeSlider.value)
            self._startJob(self.logic.startPrediction(self._parameterNode, [t]))

    def _startJob(self, job):
        self._job = job
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = job.status_text
        for line in job.log_lines:
            self.ui.logTextEdit.appendPlainText(line)
        self.timer.start()
        self._updateButtons()

    def onTimer(self):
        job = self._job
        if job is None:
            self.timer.stop()
            return
        try:
            events = job.poll()
        except Exception as exc:  # never leave the timer running on an unexpected error
            logging.exception("STNeRP: polling the worker failed")
            events = [{"event": "finished", "state": "failed", "message": str(exc)}]
            job.state = "failed"
        for event in events:
            kind = event.get("event")
            if kind == "log":
                self.ui.logTextEdit.appendPlainText(event.get("text", ""))
            elif kind == "error":
                self.ui.logTextEdit.appendPlainText("ERROR: %s" % event.get("message"))
            elif kind == "finished":
                self._onJobFinished(job, event)
        self.ui.progressBar.value = int(1000 * job.progress)
        self.ui.statusLabel.text = job.status_text

    def _onJobFinished(self, job, event):
        self.timer.stop()
        self.ui.logTextEdit.appendPlainText("[%s] %s" % (event.get("state"), event.get("message") or job.status_text))
        if job.state == "complete":
            self.logic.recordFinishedJob(self._parameterNode, job)
            if job.kind == "predict":
                if self._lastPrediction is not None:
                    self.logic.removeImported(self._lastPrediction)
                self._lastPrediction = job.result
            self.logic.showResult(job.result)
        elif job.state == "failed":
            slicer.util.errorDisplay("STNeRP failed: %s" % job.message,
                                     detailedText="\n".join(job.log_lines[-200:]))
        self._updateButtons()
        self.updateGUIFromParameterNode()

    def ensureTorch(self):
        """torch is needed by the worker (which shares Slicer's Python packages): offer to install
        it through the PyTorch extension, after the user's confirmation."""
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("STNeRP needs the PyTorch extension. Install it with the Extensions "
                                     "Manager and restart Slicer.")
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        torch = torchLogic.installTorch(askConfirmation=True)
        if torch is None:
            slicer.util.warningDisplay("STNeRP cannot run without PyTorch.")
            return False
        return True


#
# STNeRPLogic
#


class STNeRPLogic(ScriptedLoadableModuleLogic):
    """Adapter between the application and the Qt-free STNeRPCoreLogic: asks the application for
    the scene, the module logics, PythonSlicer and the temporary folder."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    def setDefaultParameters(self, parameterNode):
        parameters.initialize(parameterNode)

    def getParameterNode(self):
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        return parameters.initialize(node) if node is not None else None

    def core(self, parameterNode=None):
        scene = slicer.mrmlScene
        if self._core is None or self._core.scene is not scene:
            temp = os.path.join(slicer.app.temporaryPath, "STNeRP")
            self._core = core_logic.STNeRPCoreLogic(
                scene, slicer.modules.segmentations.logic(),
                python_executable=worker_process.default_python_executable(),
                temp_root=temp, runs_root=os.path.join(temp, "runs"))
        if parameterNode is not None and parameterNode.GetParameter("OutputDirectory"):
            self._core.runs_root = parameterNode.GetParameter("OutputDirectory")
        return self._core

    def inputsFromParameterNode(self, pn):
        referenceTime = parameters.get_float(pn, "ReferenceTime")
        landmarks = []
        if pn.GetParameter("FollowUpMode") == "sequence":
            sequence = pn.GetNodeReference(parameters.FOLLOW_UP_SEQUENCE)
            followups = core_logic.followups_from_sequence(sequence, referenceTime) if sequence else []
        else:
            followups = []
            for volume, t, lm in parameters.get_follow_ups(pn):
                followups.append((t, volume))
                landmarks.append((t, lm))
        return core_logic.JobInputs(
            pn.GetNodeReference(parameters.REFERENCE_VOLUME), followups, reference_time=referenceTime,
            segmentation_node=pn.GetNodeReference(parameters.SEGMENTATION),
            segment_ids=parameters.get_json(pn, "SegmentIDs") or None,
            reference_landmarks=pn.GetNodeReference(parameters.REFERENCE_LANDMARKS),
            followup_landmarks=landmarks)

    def startTraining(self, pn):
        inputs = self.inputsFromParameterNode(pn)
        pn.SetNodeReferenceID(parameters.LAST_REFERENCE_VOLUME, inputs.reference_volume.GetID())
        return self.core(pn).start_training(inputs, parameters.settings(pn))

    def startPrediction(self, pn, times):
        runDir = pn.GetParameter("LastRunDirectory")
        if not runDir or not os.path.isdir(runDir):
            raise ValueError("No trained run: press Apply first.")
        segmentMap = parameters.get_json(pn, "LastSegmentMap") or None
        return self.core(pn).start_prediction(runDir, times, segment_map=segmentMap,
                                              reference_volume=pn.GetNodeReference(parameters.LAST_REFERENCE_VOLUME))

    def recordFinishedJob(self, pn, job):
        """Remember a finished training run in the parameter node (saved with the scene), so the
        time slider can query it later."""
        if pn is None or job.kind != "train":
            return
        pn.SetParameter("LastRunDirectory", job.run_dir)
        parameters.set_json(pn, "LastSegmentMap", job.segment_map)
        parameters.set_json(pn, "LastTimes", core_logic.STNeRPCoreLogic.run_times(job.run_dir))

    @staticmethod
    def removeImported(result):
        """Remove the nodes of an earlier import (e.g. the previous time-slider prediction)."""
        scene_io.remove_imported(slicer.mrmlScene, result)

    @staticmethod
    def showResult(result):
        """Show the reference under the first transform's segmentation, and the predicted image."""
        if result is None or not result.time_points:
            return
        first = result.time_points[sorted(result.time_points)[0]]
        image = first.get("image")
        if image is not None:
            slicer.util.setSliceViewerLayers(background=image, fit=True)
        segmentation = first.get("segmentation")
        if segmentation is not None and segmentation.GetDisplayNode() is not None:
            segmentation.GetDisplayNode().SetVisibility(True)

    def runSynchronously(self, job, timeout=None):
        """Poll a job until it ends while keeping the application responsive (self-test)."""
        start = time.monotonic()
        while not job.finished:
            if timeout is not None and time.monotonic() - start > timeout:
                job.cancel()
            if not job.poll():
                slicer.app.processEvents()
                time.sleep(0.05)
        return job


#
# STNeRPTest
#


class STNeRPTest(ScriptedLoadableModuleTest):
    """Whole flow in the real application on a small generated sample: train (tiny), import,
    sequences and table, predict at an unscanned time, cancel leaves the scene unchanged."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_STNeRP_fullFlow()
        self.setUp()
        self.test_STNeRP_cancel()

    def _loadSample(self, nPhases=3):
        import SimpleITK as sitk
        from STNeRPLib import phantom
        series = phantom.breathing_series(size=(48, 48, 32), n_phases=nPhases)
        folder = os.path.join(slicer.app.temporaryPath, "STNeRPTest")
        os.makedirs(folder, exist_ok=True)
        volumes = []
        for i, image in enumerate(series.images):
            path = os.path.join(folder, "phase_%d.nrrd" % i)
            sitk.WriteImage(image, path)
            volumes.append(slicer.util.loadVolume(path, {"name": "phase %d" % i}))
        labelPath = os.path.join(folder, "labels.nrrd")
        sitk.WriteImage(series.labelmaps[0], labelPath)
        segmentation = slicer.util.loadSegmentation(labelPath)
        return series, volumes, segmentation

    def _parameterNode(self, logic, series, volumes, segmentation, iterations):
        pn = logic.getParameterNode()
        pn.SetNodeReferenceID(parameters.REFERENCE_VOLUME, volumes[0].GetID())
        pn.SetParameter("ReferenceTime", repr(float(series.times[0])))
        parameters.set_follow_ups(pn, [(v, float(t), None) for v, t in zip(volumes[1:], series.times[1:])])
        pn.SetNodeReferenceID(parameters.SEGMENTATION, segmentation.GetID())
        pn.SetParameter("Iterations", str(iterations))
        pn.SetParameter("Device", "cpu")
        return pn

    def test_STNeRP_fullFlow(self):
        self.delayDisplay("Generating a small breathing phantom")
        series, volumes, segmentation = self._loadSample()
        logic = STNeRPLogic()
        pn = self._parameterNode(logic, series, volumes, segmentation, iterations=20)
        segmentNames = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                        for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]

        self.delayDisplay("Training in the background")
        job = logic.runSynchronously(logic.startTraining(pn), timeout=900)
        self.assertEqual(job.state, "complete", job.message)
        logic.recordFinishedJob(pn, job)
        result = job.result
        times = sorted(result.time_points)
        self.assertTrue(set(float(t) for t in series.times[1:]) <= set(times))  # may include the reference time
        for t in times:
            entry = result.time_points[t]
            self.assertTrue(entry["transform"].IsA("vtkMRMLGridTransformNode"))
            names = [entry["segmentation"].GetSegmentation().GetNthSegment(i).GetName()
                     for i in range(entry["segmentation"].GetSegmentation().GetNumberOfSegments())]
            self.assertEqual(names, segmentNames)
            self.assertAlmostEqual(entry["jacobian"].GetDisplayNode().GetLevel(), 1.0)
        self.assertEqual(result.sequences["transform"].GetNumberOfDataNodes(), len(times))
        self.assertEqual(result.table.GetTable().GetNumberOfRows(), len(times))

        # the reference segmentation under a transform shows the anatomy at time t
        segmentation.SetAndObserveTransformNodeID(result.time_points[times[-1]]["transform"].GetID())
        slicer.app.processEvents()
        segmentation.SetAndObserveTransformNodeID(None)

        self.delayDisplay("Predicting an unscanned time with the trained model")
        job = logic.runSynchronously(logic.startPrediction(pn, [0.5]), timeout=300)
        self.assertEqual(job.state, "complete", job.message)
        self.assertIn(0.5, job.result.time_points)
        self.delayDisplay("Full flow passed")

    def test_STNeRP_cancel(self):
        series, volumes, segmentation = self._loadSample()
        logic = STNeRPLogic()
        pn = self._parameterNode(logic, series, volumes, segmentation, iterations=100000)
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.startTraining(pn)
        start = time.monotonic()
        while job.progress <= 0.05 and time.monotonic() - start < 120 and not job.finished:
            job.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        job.cancel()
        logic.runSynchronously(job, timeout=60)
        self.assertEqual(job.state, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay("Cancel passed")
