"""Where the report goes and in which format: an argument, else an environment variable, else the default."""
from __future__ import annotations

import os
from pathlib import Path

DIR_ENV = "TIMM_QCONV_REPORT_DIR"
FORMAT_ENV = "TIMM_QCONV_REPORT_FORMAT"
# Not "timm_qconv_report": a folder with the package's name in the working directory would shadow
# the installed package on the next import.
DEFAULT_DIR = "timm-qconv-report"
FORMATS = ("csv", "json")


def check_format(fmt: str, name: str = "fmt") -> str:
    """Return ``fmt`` if it is one of :data:`FORMATS`; ``name`` is what the error calls it."""
    if fmt not in FORMATS:
        raise ValueError(f"{name}={fmt!r} is not allowed; expected one of {list(FORMATS)}")
    return fmt


def resolve_dir(out_dir: str | os.PathLike | None) -> Path:
    """``out_dir``, else ``$TIMM_QCONV_REPORT_DIR``, else ``./timm-qconv-report``."""
    return Path(out_dir if out_dir is not None else os.environ.get(DIR_ENV) or DEFAULT_DIR)


def resolve_format(fmt: str | None) -> str:
    """``fmt``, else ``$TIMM_QCONV_REPORT_FORMAT``, else ``"csv"``."""
    if fmt is not None:
        return check_format(fmt)
    return check_format(os.environ.get(FORMAT_ENV) or "csv", FORMAT_ENV)
