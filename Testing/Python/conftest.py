"""Shared by every suite: the engine (STNeRPLib) and the module's Qt-free package
(STNeRPModuleLib) import from the source tree, as Slicer's scripted-modules folder holds them."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "STNeRP")]
