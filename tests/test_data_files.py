"""load_local_data: each format's success path, and every error a site's data can raise, on files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fedshield.data.files import LocalData, load_local_data
from fedshield.dataspec import DataSpec
from fedshield.errors import DataError

TABULAR = DataSpec("tab", (3,), 2)
DIGITS = DataSpec("digits", (1, 8, 8), 10)
RGB = DataSpec("rgb", (3, 4, 6), 3)


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _good_csv(tmp_path: Path) -> Path:
    return _write_csv(tmp_path / "site1.csv", "a,b,label,c\n1,2,0,3\n4.5,5,1,6\n7,8,1,9\n")


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _raises(match: str, path: Path, spec: DataSpec = TABULAR, **kwargs: str) -> None:
    with pytest.raises(DataError, match=match):
        load_local_data(path, spec, **kwargs)


# --- success paths -------------------------------------------------------------------------------------------


def test_csv_label_column_is_taken_out_and_features_keep_their_order(tmp_path: Path) -> None:
    data = load_local_data(_good_csv(tmp_path), TABULAR)
    assert isinstance(data, LocalData) and len(data) == 3
    assert data.x.dtype == np.float32 and data.x.shape == (3, 3)
    assert data.y.dtype == np.int64 and data.y.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(data.x[1], [4.5, 5, 6])
    assert data.source.startswith("csv:") and data.source.endswith("site1.csv")
    assert data.as_dataset().x is data.x


def test_csv_named_label_column_and_reshape(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "s.csv", "y,f0,f1,f2,f3\n1,0,1,2,3\n0,4,5,6,7\n")
    data = load_local_data(csv, DataSpec("square", (1, 2, 2), 2), label_column="y")
    assert data.x.shape == (2, 1, 2, 2)
    np.testing.assert_array_equal(data.x[1, 0], [[4, 5], [6, 7]])
    assert data.y.tolist() == [1, 0]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "site.parquet"
    table = pa.table({"x1": [0.5, 1.5], "x2": [1, 2], "x3": [3.0, 4.0], "label": pa.array([1, 0], pa.int8())})
    pq.write_table(table, path)
    data = load_local_data(path, TABULAR)
    assert data.x.dtype == np.float32 and data.x.shape == (2, 3)
    np.testing.assert_array_equal(data.x, [[0.5, 1, 3], [1.5, 2, 4]])
    assert data.y.dtype == np.int64 and data.y.tolist() == [1, 0]


def test_npz_reshapes_flat_examples_and_accepts_float_whole_labels(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    x = np.arange(3 * 64, dtype=np.float64).reshape(3, 64)
    np.savez(path, x=x, y=np.array([0.0, 9.0, 3.0]))
    data = load_local_data(path, DIGITS)
    assert data.x.dtype == np.float32 and data.x.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(data.x.reshape(3, 64), x)
    assert data.y.dtype == np.int64 and data.y.tolist() == [0, 9, 3]
    assert data.source.startswith("npz:")


def test_image_folder_integer_names_grayscale_resized_and_scaled(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _png(root / "7" / "a.png", np.full((8, 8), 255, np.uint8))
    _png(root / "2" / "b.PNG", np.zeros((16, 16), np.uint8))  # resized to 8x8; suffix case ignored
    (root / "2" / "notes.txt").write_text("ignored")
    data = load_local_data(root, DIGITS)
    assert data.x.dtype == np.float32 and data.x.shape == (2, 1, 8, 8)
    assert sorted(data.y.tolist()) == [2, 7]  # folder "7" is label 7, not its sorted position
    assert data.x[data.y == 7].min() == 1.0 and data.x[data.y == 2].max() == 0.0
    assert data.source.startswith("image-folder:")


def test_image_folder_named_classes_rgb_channels_first(tmp_path: Path) -> None:
    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255
    for name in ("bird", "cat", "dog"):
        _png(tmp_path / name / "1.png", red)
    Image.fromarray(np.zeros((4, 6), np.uint8)).convert("RGB").save(tmp_path / "dog" / "2.jpg")
    data = load_local_data(tmp_path, RGB)
    assert data.x.shape == (4, 3, 4, 6) and data.y.tolist() == [0, 1, 2, 2]  # sorted folder names
    np.testing.assert_allclose(data.x[0, 0], 1.0)
    np.testing.assert_allclose(data.x[0, 1:], 0.0)
    assert 0.0 <= data.x.min() and data.x.max() <= 1.0


def test_image_folder_with_fewer_named_classes_than_task_warns(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        _png(tmp_path / name / "1.png", np.zeros((4, 6, 3), np.uint8))
    with pytest.warns(UserWarning, match="name the folders 0..2"):
        load_local_data(tmp_path, RGB)


# --- errors for every format ---------------------------------------------------------------------------------


def test_missing_path_names_it(tmp_path: Path) -> None:
    _raises(r"nope\.csv.*does not exist.*--data", tmp_path / "nope.csv")


def test_unknown_extension_lists_supported_formats(tmp_path: Path) -> None:
    _raises(r"'\.xlsx'.*\.csv, \.parquet, \.npz", _write_csv(tmp_path / "s.xlsx", "x"))


def test_label_column_flag_on_npz_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.zeros((2, 3)), y=np.zeros(2, np.int64))
    _raises(r"--label-column applies to \.csv and \.parquet", tmp_path / "s.npz", label_column="y")


# --- tabular errors ------------------------------------------------------------------------------------------


def test_missing_default_label_column_lists_columns_and_flag(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "s.csv", "a,b,c,target\n1,2,3,0\n4,5,6,1\n")
    _raises(r"no label column 'label'.*\['a', 'b', 'c', 'target'\].*--label-column", csv)


def test_missing_named_label_column(tmp_path: Path) -> None:
    _raises(r"no label column 'y'.*'label'", _good_csv(tmp_path), label_column="y")


def test_feature_count_mismatch_names_file_task_and_counts(tmp_path: Path) -> None:
    spec = DataSpec("breast-cancer", (4,), 2)
    _raises(r"site1\.csv has 3 feature columns, task 'breast-cancer' expects 4", _good_csv(tmp_path), spec)


def test_non_numeric_feature_column_is_named(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "s.csv", "a,b,c,label\n1,x,3,0\n4,y,6,1\n")
    _raises(r"feature column 'b' is not numeric.*'x'", csv)


def test_string_labels_are_refused(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "s.csv", "a,b,c,label\n1,2,3,benign\n4,5,6,malignant\n")
    _raises(r"label column 'label' must hold class indices.*'benign'.*integer", csv)


def test_empty_label_names_the_row(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "s.csv", "a,b,c,label\n1,2,3,0\n4,5,6,\n")
    _raises(r"empty in row 1 \(line 3\)", csv)


def test_nan_feature_names_row_and_column(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "s.csv", "a,b,c,label\n1,2,3,0\n4,5,6,1\n7,,9,1\n")
    _raises(r"row 2 \(line 4\).*NaN.*feature 'b'", csv)


def test_inf_feature_in_parquet_names_row(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"a": [1.0, np.inf], "b": [1, 2], "c": [1, 2], "label": [0, 1]}), path)
    _raises(r"row 1 has a missing, NaN or infinite value \(feature 'a', got inf\)", path)


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "s.csv", "a,a,c,label\n1,2,3,0\n4,5,6,1\n")
    _raises(r"repeats the column names \['a'\]", csv)


def test_too_few_rows(tmp_path: Path) -> None:
    _raises(r"has 1 data rows, at least 2", _write_csv(tmp_path / "s.csv", "a,b,c,label\n1,2,3,0\n"))


def test_unreadable_csv_and_parquet(tmp_path: Path) -> None:
    _raises(r"not a readable CSV file", _write_csv(tmp_path / "s.csv", "a,b,label\n1,2,0\n1,2,3,4\n"))
    _raises(r"not a readable Parquet file", _write_csv(tmp_path / "s.parquet", "not parquet"))


def test_out_of_range_labels_are_named_with_range(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "s.csv", "a,b,c,label\n1,2,3,0\n4,5,6,2\n7,8,9,-1\n")
    _raises(r"labels \[-1, 2\] are outside 0\.\.1 \(task 'tab' has 2 classes\)", csv)


# --- npz errors ----------------------------------------------------------------------------------------------


def test_npz_without_x_and_y_lists_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", features=np.zeros((2, 3)), labels=np.zeros(2))
    _raises(r"must hold arrays 'x' and 'y', found \['features', 'labels'\]", tmp_path / "s.npz")


def test_npz_with_pickled_objects_is_never_unpickled(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.zeros(2, np.int64))
    _raises(r"cannot read numeric arrays.*(pickle|object)", tmp_path / "s.npz")


def test_npz_example_shape_mismatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.zeros((2, 28, 28)), y=np.zeros(2, np.int64))
    expected = r"shape \(28, 28\) \(784 values\), task 'digits' expects \(1, 8, 8\) \(64 values\)"
    _raises(expected, tmp_path / "s.npz", DIGITS)


def test_npz_non_integer_labels_and_length_mismatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3)), y=np.array([0.5, 1.0]))
    _raises(r"labels must be whole numbers, got \[0\.5\]", tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 3)), y=np.zeros(2, np.int64))
    _raises(r"x has shape \(3, 3\), y \(2,\)", tmp_path / "b.npz")


def test_npz_single_array_and_text_features(tmp_path: Path) -> None:
    with open(tmp_path / "one.npz", "wb") as f:  # a .npy payload under an .npz name
        np.save(f, np.zeros((2, 3)))
    _raises(r"holds a single array, not an archive", tmp_path / "one.npz")
    np.savez(tmp_path / "s.npz", x=np.array([["a", "b", "c"], ["d", "e", "f"]]), y=np.zeros(2, np.int64))
    _raises(r"features must be numbers, got dtype <U1", tmp_path / "s.npz")


def test_npz_nan_names_row(tmp_path: Path) -> None:
    x = np.zeros((3, 3))
    x[2, 1] = np.nan
    np.savez(tmp_path / "s.npz", x=x, y=np.zeros(3, np.int64))
    _raises(r"row 2 has a missing, NaN or infinite value \(feature index 1", tmp_path / "s.npz")


def test_npz_float64_beyond_float32_range_is_caught(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.array([[1e300, 0, 0], [0, 0, 0]]), y=np.zeros(2, np.int64))
    _raises(r"row 0 .*infinite", tmp_path / "s.npz")


def test_npz_single_example(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.zeros((1, 3)), y=np.zeros(1, np.int64))
    _raises(r"has 1 examples, at least 2", tmp_path / "s.npz")


# --- image folder errors -------------------------------------------------------------------------------------


def test_image_folder_for_tabular_task(tmp_path: Path) -> None:
    _png(tmp_path / "0" / "a.png", np.zeros((8, 8), np.uint8))
    _raises(r"task 'tab' takes examples of shape \(3,\), not .*images", tmp_path)


def test_image_folder_without_subfolders(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _raises(r"no class subfolders", tmp_path, DIGITS)


def test_image_folder_class_beyond_task(tmp_path: Path) -> None:
    _png(tmp_path / "0" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "12" / "a.png", np.zeros((8, 8), np.uint8))
    _raises(r"class folders '12' -> 12 give labels outside 0\.\.9", tmp_path, DIGITS)


def test_image_folder_too_few_images(tmp_path: Path) -> None:
    _png(tmp_path / "0" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "b.tiff").write_bytes(b"")
    _raises(r"holds 1 images.*at least 2.*\.png", tmp_path, DIGITS)


def test_image_folder_unreadable_and_16_bit_images(tmp_path: Path) -> None:
    _png(tmp_path / "0" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "broken.png").write_bytes(b"not a png")
    _raises(r"1/broken\.png is not a readable image", tmp_path, DIGITS)
    (tmp_path / "1" / "broken.png").unlink()
    _png(tmp_path / "1" / "deep.png", np.full((8, 8), 1000, np.uint16))
    _raises(r"deep\.png is I;16.*convert it to 8-bit", tmp_path, DIGITS)
