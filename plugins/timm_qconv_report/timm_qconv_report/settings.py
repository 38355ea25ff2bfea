"""Whether the report is on, where it goes and in which format: an argument, else an environment
variable, else the default (off, ``./timm-qconv-report``, CSV)."""
from __future__ import annotations

import os
from pathlib import Path

ENABLE_ENV = "TIMM_QCONV_REPORT"
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


def resolve_enabled(enabled: bool | None) -> bool:
    """``enabled``, else whether ``$TIMM_QCONV_REPORT`` is ``1``/``true``/``yes``/``on`` (off when unset)."""
    if enabled is not None:
        return enabled
    value = os.environ.get(ENABLE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENABLE_ENV}={value!r} is not allowed; expected 1/true/yes/on or 0/false/no/off (or unset)")
