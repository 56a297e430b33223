"""Training and evaluation data: records from files or the hub, formatted and tokenized examples, the embedded task."""

from ..errors import DataError
from .examples import IGNORE_INDEX, build_dataset, format_example, tokenize_example
from .records import load_records, read_rows

__all__ = ["DataError", "IGNORE_INDEX", "build_dataset", "format_example", "load_records", "read_rows",
           "tokenize_example"]
