"""Packaging of the Slicer extension and consistency of the panel (no Slicer needed)."""

import os
import re
import struct
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def cmake_list(text, name, substitutions=None):
    """Entries of ``set(NAME ...)`` in a CMake file (comments removed)."""
    text = re.sub(r"#[^\n]*", "", text)
    match = re.search(rf"set\(\s*{re.escape(name)}\s+(.*?)\)", text, re.S)
    assert match, f"set({name} ...) not found"
    out = []
    for item in match.group(1).split():
        for key, value in (substitutions or {}).items():
            item = item.replace(f"${{{key}}}", value)
        out.append(item)
    return out


def files_under(folder, suffix=None):
    base = os.path.join(ROOT, folder)
    out = set()
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name.endswith((".pyc", ".pyo")):
                continue
            if suffix and not name.endswith(suffix):
                continue
            out.add(os.path.relpath(os.path.join(dirpath, name), ROOT).replace(os.sep, "/"))
    return out


def test_module_cmake_lists_every_python_and_resource_file():
    text = read("STNeRP", "CMakeLists.txt")
    module_name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    assert module_name == "STNeRP"
    module = {"STNeRP/" + f for f in cmake_list(text, "MODULE_PYTHON_SCRIPTS", {"MODULE_NAME": module_name})}
    engine = set(cmake_list(text, "ENGINE_PYTHON_SCRIPTS"))
    resources = set(cmake_list(text, "MODULE_RESOURCES"))
    for listed in module | engine | resources:
        assert os.path.isfile(os.path.join(ROOT, listed)), f"CMake lists a missing file: {listed}"
    missing = (files_under("STNeRP", ".py") - module) | (files_under("STNeRPLib", ".py") - engine) \
        | (files_under("Resources") - resources)
    assert not missing, f"files not packaged by STNeRP/CMakeLists.txt: {sorted(missing)}"
    assert "Resources/UI/STNeRP.ui" in resources and "Resources/Icons/STNeRP.png" in resources
    # the module is built by Slicer's macro; top-level files go beside it in the scripted-modules folder
    assert "slicerMacroBuildScriptedModule" in text and "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in text
    assert "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in text and "Slicer_QTSCRIPTEDMODULES_LIB_DIR" in text
    assert "foreach(_file IN LISTS ENGINE_PYTHON_SCRIPTS MODULE_RESOURCES SELF_TEST_FILES)" in text
    # the self-test finds its stand-in worker beside the module, where this list installs it
    assert cmake_list(text, "SELF_TEST_FILES") == ["Testing/Python/stnerp_standin_worker.py"]
    assert '"Testing", "Python", "stnerp_standin_worker.py"' in read("STNeRP", "STNeRP.py")


def test_module_extension_description_matches_s4ext():
    cmake = read("CMakeLists.txt")
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', cmake))
    assert "project(STNeRP)" in cmake
    assert "find_package(Slicer REQUIRED)" in cmake and "include(${Slicer_USE_FILE})" in cmake
    assert "add_subdirectory(STNeRP)" in cmake and "Slicer_EXTENSION_CPACK" in cmake
    assert values["EXTENSION_CATEGORY"] == "Registration"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    s4ext = {}
    for line in read("STNeRP.s4ext").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            s4ext[key] = value.strip()
    pairs = {"homepage": "EXTENSION_HOMEPAGE", "category": "EXTENSION_CATEGORY", "iconurl": "EXTENSION_ICONURL",
             "description": "EXTENSION_DESCRIPTION", "contributors": "EXTENSION_CONTRIBUTORS",
             "screenshoturls": "EXTENSION_SCREENSHOTURLS", "depends": "EXTENSION_DEPENDS"}
    for key, var in pairs.items():
        assert s4ext[key] == values[var], key


def test_module_icon_is_128_png():
    with open(os.path.join(ROOT, "Resources", "Icons", "STNeRP.png"), "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (128, 128)


def test_module_widget_names_exist_in_ui_file():
    tree = ET.parse(os.path.join(ROOT, "Resources", "UI", "STNeRP.ui"))
    names = {w.get("name") for w in tree.iter("widget")}
    source = read("STNeRP", "STNeRP.py")
    used = set(re.findall(r"\bui\.([A-Za-z_]\w*)", source))
    assert used, "no ui.<name> found in STNeRP.py"
    missing = used - names
    assert not missing, f"STNeRP.py uses widgets the .ui file does not have: {sorted(missing)}"
    # every MRML widget gets the scene, every custom class is declared
    receivers = {c.findtext("receiver") for c in tree.iter("connection")}
    mrml = {w.get("name") for w in tree.iter("widget") if w.get("class").startswith("qMRML")} - {"STNeRP"}
    assert mrml <= receivers
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    custom = {w.get("class") for w in tree.iter("widget") if not w.get("class").startswith("Q")}
    assert custom <= declared
    root_widget = tree.getroot().find("widget")
    assert root_widget.get("class") == "qMRMLWidget" and root_widget.get("name") == "STNeRP"


def test_module_ui_form_rows_hold_one_control_each():
    """Two items at the same row and column of a form layout overlap on screen: every (row, column)
    of each QFormLayout is taken once, and each row that has a field has its label."""
    tree = ET.parse(os.path.join(ROOT, "Resources", "UI", "STNeRP.ui"))
    for layout in tree.iter("layout"):
        if layout.get("class") != "QFormLayout":
            continue
        cells = [(item.get("row"), item.get("column")) for item in layout.findall("item")]
        assert len(cells) == len(set(cells)), f"{layout.get('name')}: two items share a cell"
        spanned = {item.get("row") for item in layout.findall("item") if item.get("colspan") == "2"}
        fields = {row for row, column in cells if column == "1"}
        labels = {row for row, column in cells if column == "0"}
        assert fields <= labels | spanned, f"{layout.get('name')}: a field without a label"


def test_module_file_has_slicer_template_classes():
    source = read("STNeRP", "STNeRP.py")
    for cls in ("class STNeRP(ScriptedLoadableModule)", "class STNeRPWidget(ScriptedLoadableModuleWidget",
                "class STNeRPLogic(ScriptedLoadableModuleLogic)", "class STNeRPTest(ScriptedLoadableModuleTest)"):
        assert cls in source
    # torch only through the PyTorch extension, never pip
    assert "PyTorchUtils" in source and "pip_install" not in source
