"""Geometry and I/O: physical space honoured with anisotropic spacing, non-zero origin and an
oblique direction; bad input files rejected with one clear line."""
import numpy as np
import pytest
import SimpleITK as sitk

from STNeRPLib.errors import InputError
from STNeRPLib.geometry import Grid
from STNeRPLib.io import read_image, read_labelmap, read_landmarks, write_image


def oblique_image(size=(7, 6, 5), spacing=(0.8, 1.3, 2.5), origin=(-12.5, 30.25, 101.0)) -> sitk.Image:
    rotation = sitk.VersorTransform((1, 2, 3), 0.4).GetMatrix()
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(rotation)
    image[:] = 0
    return image


def test_grid_maps_indices_as_itk_does():
    image = oblique_image()
    grid = Grid.of(image)
    rng = np.random.default_rng(0)
    index = rng.uniform(-1, 7, size=(20, 3))
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])
    assert np.allclose(grid.to_physical(index), expected, atol=1e-9)
    assert np.allclose(grid.to_index(expected), index, atol=1e-9)


def test_grid_points_follow_array_order():
    image = oblique_image()
    grid = Grid.of(image)
    points = grid.points().reshape(*grid.shape, 3)
    for k, j, i in np.ndindex(*grid.shape):
        assert np.allclose(points[k, j, i], image.TransformIndexToPhysicalPoint((i, j, k)), atol=1e-9)
    assert np.allclose(grid.points(3, 5), points[3:5].reshape(-1, 3))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_written_images_keep_their_geometry(tmp_path, suffix):
    grid = Grid.of(oblique_image())
    array = np.random.default_rng(1).normal(size=grid.shape).astype(np.float32)
    write_image(grid.image(array), tmp_path / f"image{suffix}")
    back = read_image(tmp_path / f"image{suffix}", "image")
    assert Grid.of(back).matches(grid)
    assert np.array_equal(sitk.GetArrayFromImage(back), array)


def test_vector_images_keep_their_geometry(tmp_path):
    grid = Grid.of(oblique_image())
    field = np.random.default_rng(2).normal(size=(*grid.shape, 3))
    write_image(grid.image(field, vector=True), tmp_path / "field.nrrd")
    back = sitk.ReadImage(str(tmp_path / "field.nrrd"))
    assert Grid.of(back).matches(grid) and back.GetNumberOfComponentsPerPixel() == 3
    assert np.allclose(sitk.GetArrayFromImage(back), field)


def write(tmp_path, name, image):
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def assert_one_line(error: pytest.ExceptionInfo, *words):
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as error:
        read_image(tmp_path / "nothing.nrrd", "reference image")
    assert_one_line(error, "reference image not found", "nothing.nrrd")


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n\x00\x01")
    with pytest.raises(InputError) as error:
        read_image(path, "follow-up image")
    assert_one_line(error, "cannot read follow-up image", "damaged")


def test_2d_and_4d_images(tmp_path):
    with pytest.raises(InputError) as error:
        read_image(write(tmp_path, "slice.nrrd", sitk.Image([8, 8], sitk.sitkFloat32)), "image")
    assert_one_line(error, "2-D")
    with pytest.raises(InputError) as error:
        read_image(write(tmp_path, "series.nii.gz", sitk.Image([8, 8, 8, 3], sitk.sitkFloat32)), "image")
    assert_one_line(error, "4-D", "split")


def test_single_slice_volume(tmp_path):
    with pytest.raises(InputError) as error:
        read_image(write(tmp_path, "flat.nrrd", sitk.Image([8, 8, 1], sitk.sitkFloat32)), "image")
    assert_one_line(error, "at least 4 voxels")


def test_nan_voxels(tmp_path):
    array = np.zeros((6, 6, 6), np.float32)
    array[2, 3, 1] = np.nan
    with pytest.raises(InputError) as error:
        read_image(write(tmp_path, "nan.nrrd", sitk.GetImageFromArray(array)), "image")
    assert_one_line(error, "NaN")


def test_labelmaps(tmp_path):
    grid = Grid.of(oblique_image())
    empty = write(tmp_path, "empty.nrrd", grid.image(np.zeros(grid.shape, np.uint8)))
    with pytest.raises(InputError) as error:
        read_labelmap(empty, grid, "segmentation")
    assert_one_line(error, "empty")
    labels = np.zeros(grid.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 4
    elsewhere = write(tmp_path, "elsewhere.nrrd", Grid(grid.size, (1, 1, 1), grid.origin, grid.direction).image(labels))
    with pytest.raises(InputError) as error:
        read_labelmap(elsewhere, grid, "segmentation")
    assert_one_line(error, "another grid")
    good = read_labelmap(write(tmp_path, "good.nrrd", grid.image(labels)), grid, "segmentation")
    assert set(np.unique(sitk.GetArrayFromImage(good))) == {0, 4}


def test_a_labelmap_cropped_to_its_segments_or_padded_beyond_its_image_is_placed_on_the_images_grid(tmp_path):
    """3D Slicer exports a segmentation's labelmap cropped to its segments (the logic's default extent) or grown to
    hold a segment beyond the image (the Segmentations module's): its voxels are the image's, whole voxels off."""
    grid = Grid.of(oblique_image(size=(12, 10, 8)))
    labels = np.zeros(grid.shape, np.uint8)
    labels[2:5, 3:7, 4:9] = 3
    labels[5, 6, 9] = 7
    full = grid.image(labels)
    cropped = sitk.RegionOfInterest(full, (6, 4, 4), (4, 3, 2))   # size, index: 4 slices of the 8
    padded = sitk.ConstantPad(full, (2, 0, 1), (1, 3, 0), 0)
    for name, image in (("cropped.nrrd", cropped), ("padded.nii.gz", padded)):
        read = read_labelmap(write(tmp_path, name, image), grid, "segmentation")
        assert Grid.of(read).matches(grid)
        assert np.array_equal(sitk.GetArrayFromImage(read), labels)
    thin = np.zeros(grid.shape, np.uint8)
    thin[6, 2:4, 5:8] = 2                                            # a structure on one slice, cropped to it
    read = read_labelmap(write(tmp_path, "thin.nrrd", sitk.RegionOfInterest(grid.image(thin), (3, 2, 1), (5, 2, 6))),
                         grid, "segmentation")
    assert np.array_equal(sitk.GetArrayFromImage(read), thin)


def test_a_labelmap_labelling_voxels_beyond_its_image_or_between_its_voxels_is_refused(tmp_path):
    grid = Grid.of(oblique_image(size=(12, 10, 8)))
    labels = np.zeros(grid.shape, np.uint8)
    labels[2:5, 3:7, 4:9] = 3
    padded = sitk.ConstantPad(grid.image(labels), (2, 0, 0), (0, 0, 0), 0)
    padded[0, 5, 4] = 3
    with pytest.raises(InputError) as error:
        read_labelmap(write(tmp_path, "beyond.nrrd", padded), grid, "segmentation")
    assert_one_line(error, "labels 1 voxel outside", "beyond.nrrd")
    between = grid.image(labels)
    between.SetOrigin(grid.to_physical(np.array([[0.5, 0.0, 0.0]]))[0])
    with pytest.raises(InputError) as error:
        read_labelmap(write(tmp_path, "between.nrrd", between), grid, "segmentation")
    assert_one_line(error, "another grid")


def test_landmarks(tmp_path):
    path = tmp_path / "landmarks.csv"
    path.write_text("time,x,y,z,ref_x,ref_y,ref_z\n1,0,0,0,1,2,3\n1,5,5,5,5,5,6\n2.5,1,1,1,1,1,1\n")
    pairs = read_landmarks(path)
    assert sorted(pairs) == [1.0, 2.5]
    assert np.array_equal(pairs[1.0][1], [[1, 2, 3], [5, 5, 6]])
    path.write_text("t,x,y,z\n1,0,0,0\n")
    with pytest.raises(InputError) as error:
        read_landmarks(path)
    assert_one_line(error, "lacks the columns", "ref_x")


def test_landmarks_saved_with_a_byte_order_mark_are_read(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte order mark; the header is the same header."""
    path = tmp_path / "landmarks.csv"
    path.write_bytes("time,x,y,z,ref_x,ref_y,ref_z\r\n1,0,0,0,1,2,3\r\n".encode("utf-8-sig"))
    pairs = read_landmarks(path)
    assert np.array_equal(pairs[1.0][1], [[1, 2, 3]])


def test_landmarks_saved_with_semicolons_and_decimal_commas_are_read(tmp_path):
    """Excel in a locale that writes 1,5 (German, French, ...) saves "CSV" separated by semicolons, with decimal
    commas; the header then read as one column, 'lacks the columns time'. The same landmarks are read."""
    path = tmp_path / "landmarks.csv"
    path.write_bytes("time;x;y;z;ref_x;ref_y;ref_z\r\n1,5;-12,25;0;3,5;1;2,75;-3\r\n".encode("utf-8-sig"))
    pairs = read_landmarks(path)
    assert list(pairs) == [1.5]
    assert np.array_equal(pairs[1.5][0], [[-12.25, 0, 3.5]]) and np.array_equal(pairs[1.5][1], [[1, 2.75, -3]])


def _nrrd_encoding(path) -> str:
    header = path.read_bytes()[:2000].split(b"\n\n")[0].decode()
    return next(line.split(":")[1].strip() for line in header.splitlines() if line.startswith("encoding:"))


def test_float_outputs_are_written_raw_and_labelmaps_gzip_compressed(tmp_path):
    """gzip barely shrinks float32 fields and costs a third of the output time; labelmaps shrink ~100x."""
    field = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(6, 7, 8, 3)).astype(np.float32), isVector=True)
    labels = sitk.GetImageFromArray(np.zeros((6, 7, 8), np.uint16))
    write_image(field, tmp_path / "f" / "displacement.nrrd")
    write_image(labels, tmp_path / "labelmap.nrrd")
    assert _nrrd_encoding(tmp_path / "f" / "displacement.nrrd") == "raw"
    assert _nrrd_encoding(tmp_path / "labelmap.nrrd") == "gzip"
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "f" / "displacement.nrrd")))
    assert np.array_equal(back, sitk.GetArrayFromImage(field))
