"""Qt-free helpers of the STNeRP scripted module: every decision the panel takes.

Everything in this package imports with only ``slicer`` (MRML classes), ``vtk``, ``numpy``,
``STNeRPLib.contract`` and the standard library, so it runs both inside the Slicer application and
under pytest with the ``slicer-core`` wheel (no Qt, no ``slicer.app``, no ``slicer.modules``).
ARCHITECTURE.md lists its files and the order they import one another in.

The module file ``STNeRP.py`` holds only the Slicer template classes; its logic asks
``slicer.modules`` for the module logics and hands them to :class:`core_logic.STNeRPCoreLogic`.
"""
