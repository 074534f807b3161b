"""Read labelled text records from a site's own CSV or Parquet file, checked before any training starts.

One column holds the text (``--text-column``, default ``text``), one the class index (``--label-column``, default
``label``); other columns are ignored (a text table usually carries ids, dates, sources). Every problem is one
:class:`~fedshield.errors.DataError` naming the file, the column, the row and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .files import DEFAULT_LABEL_COLUMN, MIN_EXAMPLES, checked_labels, first_line, label_values
from ..dataspec import DataSpec

__all__ = ["DEFAULT_TEXT_COLUMN", "load_text_table"]

DEFAULT_TEXT_COLUMN = "text"


def load_text_table(
    path: Path, spec: DataSpec, *, text_column: str | None = None, label_column: str | None = None
) -> tuple[list[str], np.ndarray]:
    """``(texts, labels)`` from ``path`` (``.csv`` or ``.parquet``); labels int64 in ``0 .. spec.num_classes - 1``."""
    path = Path(path)
    text_name = text_column or DEFAULT_TEXT_COLUMN
    label_name = label_column or DEFAULT_LABEL_COLUMN
    table, line_offset = _read(path, text_name)
    for name, flag in ((text_name, "--text-column"), (label_name, "--label-column")):
        if name not in table.column_names:
            raise DataError(f"{path.name} has no column {name!r}; found {table.column_names}: pass {flag} NAME")
    if table.num_rows < MIN_EXAMPLES:
        raise DataError(f"{path.name} has {table.num_rows} rows, at least {MIN_EXAMPLES} are needed; add records")
    texts = _texts(table.column(text_name), path.name, text_name, line_offset)
    labels = label_values(table.column(label_name), path.name, label_name, line_offset)
    return texts, checked_labels(labels, spec, path.name)


def _read(path: Path, text_name: str):  # type: ignore[no-untyped-def]
    kind = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"text data {str(path)!r} is not a file; pass a .csv or .parquet file to --data")
    if kind not in (".csv", ".parquet"):
        raise DataError(f"{path.name}: text data must be .csv or .parquet, got {path.suffix!r}; export it as CSV")
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading text tables needs pyarrow: pip install pyarrow") from None
    try:
        if kind == ".csv":
            # The text column is text even when every cell looks like a number.
            options = pacsv.ConvertOptions(column_types={text_name: pa.string()}, strings_can_be_null=True)
            return pacsv.read_csv(path, convert_options=options), 2
        return pq.read_table(path), None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path.name} is not a readable {kind[1:]} file ({first_line(e)}); re-export it") from e


def _texts(col, where: str, name: str, line_offset: int | None) -> list[str]:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DataError(f"{where}: text column {name!r} holds {col.type}, not text; pass the right --text-column")
    values = col.to_pylist()
    for row, value in enumerate(values):
        if value is None or not value.strip():
            line = f"row {row}" if line_offset is None else f"row {row} (line {row + line_offset})"
            raise DataError(f"{where}: text column {name!r} is empty in {line}; fill it in or drop the row")
    return values
