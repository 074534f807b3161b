"""Load one institution's own data from files and check it against the task before any training starts.

A client runs next to its data (``fedshield client --data PATH``), so every problem with that data surfaces here,
on that machine, as one :class:`~fedshield.errors.DataError` naming the file, what the task expected, what was
found, and the fix. Nothing is coerced silently: a wrong feature count, a text column, an out-of-range label or a
NaN would otherwise train a model that looks fine and is not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError
from ..dataspec import DataSpec, Dataset

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["LocalData", "load_local_data", "SUPPORTED_FORMATS", "IMAGE_SUFFIXES", "MIN_EXAMPLES"]

#: Fewer examples than this cannot be split into anything worth training on.
MIN_EXAMPLES = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SUPPORTED_FORMATS = ".csv, .parquet, .npz, or a directory with one subfolder of images per class"
DEFAULT_LABEL_COLUMN = "label"
_MAX_SHOWN = 5


@dataclass(frozen=True)
class LocalData:
    """An institution's examples, checked against a task's :class:`DataSpec`.

    Attributes:
        x: float32, shape ``(n, *spec.input_shape)``, finite. Tabular and ``.npz`` values are as stored in the
            file (the task's own ``preprocess`` scales them); images are already scaled to ``[0, 1]``.
        y: int64, shape ``(n,)``, every value in ``0 .. spec.num_classes - 1``.
        source: where the data came from (format and path), for logs.
    """

    x: np.ndarray
    y: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def as_dataset(self) -> Dataset:
        """The examples as the :class:`Dataset` the training code consumes."""
        return Dataset(self.x, self.y)


def load_local_data(path: Path, spec: DataSpec, *, label_column: str | None = None) -> LocalData:
    """Read ``path`` and check it fits ``spec``; raise :class:`DataError` on anything that does not.

    Args:
        path: a ``.csv``, ``.parquet`` or ``.npz`` file, or an image folder (one subfolder per class).
        spec: the task's data contract: example shape and number of classes.
        label_column: name of the label column in a ``.csv``/``.parquet`` file; default ``"label"``.
            Meaningless for other formats, so passing it there is an error rather than silently ignored.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist; pass the file or folder holding your data to --data")
    if path.is_dir():
        kind, reader = "image-folder", _read_image_folder
    else:
        kind = path.suffix.lower().lstrip(".")
        found = _FILE_READERS.get(kind)
        if found is None:
            raise DataError(f"{path.name}: unsupported data format {path.suffix!r}; expected {SUPPORTED_FORMATS}")
        reader = found
    if label_column is not None and kind not in ("csv", "parquet"):
        raise DataError(f"{path.name}: --label-column applies to .csv and .parquet files only; drop it for {kind} data")
    x, y = reader(path, spec, label_column)
    return LocalData(*_checked(x, y, spec, path.name), source=f"{kind}:{path}")



def _read_table(path: Path, spec: DataSpec, label_column: str | None) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    is_csv = path.suffix.lower() == ".csv"
    try:
        table = pacsv.read_csv(path) if is_csv else pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        kind, fix = ("CSV", "save it as comma-separated text, header first") if is_csv else ("Parquet", "re-export it")
        raise DataError(f"{path.name} is not a readable {kind} file ({first_line(e)}); {fix}") from e
    return _table_to_arrays(table, path.name, spec, label_column, line_offset=2 if is_csv else None)


def _table_to_arrays(
    table: pa.Table, where: str, spec: DataSpec, label_column: str | None, *, line_offset: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Split a table into (features, labels); line_offset maps a row to a CSV line (header is line 1)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    label = _label_column_name(table.column_names, where, label_column)
    features = [c for c in table.column_names if c != label]
    if len(features) != spec.num_features:
        raise DataError(
            f"{where} has {len(features)} feature columns, task {spec.name!r} expects {spec.num_features} "
            f"(every column except the label {label!r}); remove extra columns or pass the right --label-column"
        )
    if table.num_rows < MIN_EXAMPLES:
        raise DataError(f"{where} has {table.num_rows} data rows, at least {MIN_EXAMPLES} are needed; add examples")
    for name in features:
        col = table.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            raise DataError(
                f"{where}: feature column {name!r} is not numeric (read as {col.type}, e.g. {_first_value(col)!r}); "
                "encode it as numbers or drop it"
            )
    # Casting through float64 turns empty cells into NaN, which the finite check then reports by row.
    x = np.column_stack([pc.cast(table.column(n), pa.float64()).to_numpy() for n in features])
    y = label_values(table.column(label), where, label, line_offset)
    return _finite_float32(x, where, features, line_offset), y


def _label_column_name(columns: Sequence[str], where: str, label_column: str | None) -> str:
    name = DEFAULT_LABEL_COLUMN if label_column is None else label_column
    duplicates = sorted({c for c in columns if list(columns).count(c) > 1})
    if duplicates:
        raise DataError(f"{where} repeats the column names {duplicates}; give every column a unique name")
    if name in columns:
        return name
    hint = "pass --label-column NAME" if label_column is None else "pass one of these to --label-column"
    raise DataError(
        f"{where} has no label column {name!r}; found columns {list(columns)} "
        f"(the first line must name the columns); {hint}"
    )


def label_values(col: pa.ChunkedArray, where: str, name: str, line_offset: int | None) -> np.ndarray:
    import pyarrow as pa

    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: label column {name!r} is empty in {_row(row, line_offset)}; fill in or drop it")
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
        raise DataError(
            f"{where}: label column {name!r} must hold class indices 0..k-1, got {col.type} values "
            f"such as {_first_value(col)!r}; map each class name to an integer"
        )
    return np.asarray(col.to_numpy())



def _read_npz(path: Path, spec: DataSpec, label_column: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        # NEVER allow_pickle: the file crossed a machine boundary, and unpickling it could execute code.
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path.name} holds a single array, not an archive; save np.savez(path, x=..., y=...)")
        with loaded as archive:
            keys = sorted(archive.files)
            if "x" not in keys or "y" not in keys:
                raise DataError(f"{path.name} must hold arrays 'x' and 'y', found {keys}; save them with np.savez")
            return archive["x"], archive["y"]
    except DataError:  # a ValueError too; already says what is wrong
        raise
    except (ValueError, OSError, EOFError) as e:  # includes object arrays, which allow_pickle=False refuses
        raise DataError(f"{path.name}: cannot read numeric arrays ({first_line(e)}); save them with np.savez") from e



def _read_image_folder(path: Path, spec: DataSpec, label_column: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One subfolder per class; images are converted to the task's channels and size, then scaled to [0, 1].

    Scaling: 8-bit pixels are divided by 255 so they land in ``[0, 1]``, the same range the built-in ``digits``
    task trains on (its bundled pixels are 0..16, divided by 16). Images must also match the task's polarity
    (digits: light strokes on a dark background). Files with other extensions, and hidden files, are ignored.
    """
    if len(spec.input_shape) != 3 or spec.input_shape[0] not in (1, 3):
        raise DataError(
            f"{path.name} is an image folder, but task {spec.name!r} takes examples of shape {spec.input_shape}, "
            "not (1 or 3, height, width) images; pass a .csv, .parquet or .npz file"
        )
    labels = _class_labels(path, spec)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for folder, label in labels.items():
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != ".")
        xs.extend(_load_image(image, spec.input_shape) for image in images)
        ys.extend([label] * len(images))
    if len(xs) < MIN_EXAMPLES:
        raise DataError(
            f"{path.name} holds {len(xs)} images in its class subfolders, at least {MIN_EXAMPLES} are needed "
            f"(supported: {', '.join(IMAGE_SUFFIXES)}); add images"
        )
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _class_labels(path: Path, spec: DataSpec) -> dict[Path, int]:
    """Integer-named folders keep their integer; otherwise sorted folder names give labels 0..k-1."""
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{path.name} has no class subfolders; put each class's images in a subfolder (0/, 1/, ...)")
    if all(f.name.isascii() and f.name.isdigit() for f in folders):
        labels = {f: int(f.name) for f in folders}
    else:
        labels = {f: i for i, f in enumerate(folders)}
        if len(folders) < spec.num_classes:
            warnings.warn(
                f"{path.name}: labels come from the sorted names of {len(folders)} folders, but task {spec.name!r} "
                f"has {spec.num_classes} classes, so they may not match other sites' labels; name the folders "
                f"0..{spec.num_classes - 1} to pin each class's label",
                stacklevel=4,
            )
    bad = [f"{f.name!r} -> {v}" for f, v in labels.items() if v >= spec.num_classes]
    if bad:
        raise DataError(
            f"{path.name}: class folders {', '.join(bad[:_MAX_SHOWN])} give labels outside 0..{spec.num_classes - 1} "
            f"(task {spec.name!r} has {spec.num_classes} classes); remove or rename them"
        )
    return labels


def _load_image(image: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    channels, height, width = input_shape
    try:
        with Image.open(image) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataError(f"{image.parent.name}/{image.name} is {im.mode} (16-bit/float); convert it to 8-bit")
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, Image.DecompressionBombError) as e:
        where = f"{image.parent.name}/{image.name}"
        raise DataError(f"{where} is not a readable image ({first_line(e)}); remove or re-save it") from e
    return pixels[None, :, :] if channels == 1 else pixels.transpose(2, 0, 1)



def _checked(x: np.ndarray, y: np.ndarray, spec: DataSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (x float32 in spec's shape, y int64) or raise naming the first problem."""
    if x.dtype.kind not in "iufb":
        raise DataError(f"{where}: features must be numbers, got dtype {x.dtype}; convert them to float")
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: x has shape {x.shape}, y {y.shape}; expected x (n, ...) and y (n,), the same n")
    if len(y) < MIN_EXAMPLES:
        raise DataError(f"{where} has {len(y)} examples, at least {MIN_EXAMPLES} are needed; add examples")
    per_example = int(np.prod(x.shape[1:], dtype=np.int64))
    if per_example != spec.num_features:
        raise DataError(
            f"{where}: each example has shape {x.shape[1:]} ({per_example} values), task {spec.name!r} expects "
            f"{spec.input_shape} ({spec.num_features} values); export data in the task's shape"
        )
    x32 = _finite_float32(x, where, None, None).reshape((len(y), *spec.input_shape))
    return x32, checked_labels(y, spec, where)


def checked_labels(y: np.ndarray, spec: DataSpec, where: str) -> np.ndarray:
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise DataError(
                f"{where}: labels must be whole numbers, got {_shown(y[bad])}; use 0..{spec.num_classes - 1}"
            )
    elif y.dtype.kind not in "iub":
        raise DataError(
            f"{where}: labels must be integers, got dtype {y.dtype}; map each class to 0..{spec.num_classes - 1}"
        )
    out_of_range = (y < 0) | (y >= spec.num_classes)
    if out_of_range.any():
        raise DataError(
            f"{where}: labels {_shown(y[out_of_range])} are outside 0..{spec.num_classes - 1} "
            f"(task {spec.name!r} has {spec.num_classes} classes); relabel them or pick the matching task"
        )
    return y.astype(np.int64)


def _finite_float32(x: np.ndarray, where: str, names: Sequence[str] | None, line_offset: int | None) -> np.ndarray:
    """x as float32, checked after the cast: float64 values beyond float32's range become Inf."""
    with np.errstate(over="ignore"):
        flat = x.astype(np.float32, copy=False).reshape(x.shape[0], -1)
    bad = ~np.isfinite(flat)
    if not bad.any():
        return flat.reshape(x.shape)
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    col = int(np.flatnonzero(bad[row])[0])
    feature = repr(names[col]) if names is not None else f"index {col}"
    raise DataError(
        f"{where}: {_row(row, line_offset)} has a missing, NaN or infinite value "
        f"(feature {feature}, got {flat[row, col]}); fill in or drop such rows"
    )


def _row(row: int, line_offset: int | None) -> str:
    return f"row {row}" if line_offset is None else f"row {row} (line {row + line_offset})"


def _shown(values: np.ndarray) -> str:
    unique = np.unique(values)
    text = ", ".join(str(v.item()) for v in unique[:_MAX_SHOWN])
    return f"[{text}{', ...' if len(unique) > _MAX_SHOWN else ''}]"


def _first_value(col: pa.ChunkedArray) -> object:
    valid = col.drop_null()
    return valid[0].as_py() if len(valid) else None


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


_FILE_READERS: dict[str, Callable[[Path, DataSpec, str | None], tuple[np.ndarray, np.ndarray]]] = {
    "csv": _read_table,
    "parquet": _read_table,
    "npz": _read_npz,
}
