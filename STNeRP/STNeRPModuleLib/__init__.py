"""Qt-free helpers of the STNeRP scripted module.

Everything in this package imports with only ``slicer`` (MRML classes), ``vtk``, ``numpy``
and the standard library, so it runs both inside the Slicer application and under pytest
with the ``slicer-core`` wheel (no Qt, no ``slicer.app``, no ``slicer.modules``).

- :mod:`scene_io`: MRML <-> files (volumes, segmentations, landmarks, transforms, run import).
- :mod:`worker_process`: the worker command line and the background process.
- :mod:`parameters`: the parameter node (settings saved with the scene).
- :mod:`core_logic`: one training / prediction job: export inputs, run, import results.

The module file ``STNeRP.py`` holds only the Slicer template classes; its logic asks
``slicer.modules`` for the module logics and hands them to :class:`core_logic.STNeRPCoreLogic`.
"""
