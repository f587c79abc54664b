"""Where the values of :class:`~.settings.DistributionSettings` come from: environment and TOML files.

Highest priority first: keyword arguments, ``CELERY_SERVICES_*`` environment variables
(:data:`ENV_PREFIX`), the ``[distribution]`` table (:data:`TABLE`) of ``config/{CELERY_SERVICES_ENV}.toml``
(:data:`ENV_NAME_VAR`), then that of the base file, ``$CELERY_SERVICES_CONFIG`` (:data:`CONFIG_ENV_VAR`) or
``config/default.toml``. :func:`config_files` picks the files; :func:`reading` makes them the files read by
the settings built in its block, and :func:`file_sources` gives the settings model their sources.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "ENV_NAME_VAR",
    "ENV_PREFIX",
    "TABLE",
    "check_environment",
    "config_files",
    "file_sources",
    "reading",
]

#: Environment variable prefix of every setting.
ENV_PREFIX = "CELERY_SERVICES_"
#: Environment variable naming the base configuration file.
CONFIG_ENV_VAR = "CELERY_SERVICES_CONFIG"
#: Environment variable naming the environment whose ``config/{name}.toml`` overrides the base file.
ENV_NAME_VAR = "CELERY_SERVICES_ENV"
#: The TOML table holding the settings.
TABLE = "distribution"

#: Variables under the prefix that are not settings of the distribution: the files' names above, and the
#: prefixes of other settings models and of the project's own test tooling.
OTHER_VARIABLES = frozenset({CONFIG_ENV_VAR, ENV_NAME_VAR})
OTHER_PREFIXES = ("CELERY_SERVICES_JWT_", "CELERY_SERVICES_TEST_")

_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _closest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def check_environment(
    fields: list[str], environ: dict[str, str] | None = None, prefix: str = ENV_PREFIX
) -> None:
    """Refuse a ``{prefix}*`` variable that names no setting: a typo must not pass silently. Under the
    distribution's own prefix, the variables of other settings models (:data:`OTHER_PREFIXES`) are theirs
    to check.

    Raises:
        ValueError: naming the variable and the closest valid one.
    """
    environ = dict(os.environ) if environ is None else environ
    known = [field.upper() for field in fields]
    others = OTHER_PREFIXES if prefix == ENV_PREFIX else ()
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(prefix) or upper in OTHER_VARIABLES or upper.startswith(others):
            continue
        name = upper[len(prefix) :]
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ValueError(f"unknown setting variable {variable}{hint}")


class CommaListEnvSource(EnvSettingsSource):
    """``CELERY_SERVICES_*`` variables; a list setting also reads ``find,get`` (JSON stays accepted)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        text = str(value).strip()
        if text.startswith(("[", "{", '"')) or not _is_list(field):
            return super().decode_complex_value(field_name, field, value)
        try:
            return json.loads(text)
        except ValueError:
            return [item.strip() for item in text.split(",") if item.strip()]


def _is_list(field: FieldInfo) -> bool:
    return "list[" in str(field.annotation)


#: Files read by the sources of the settings being built by :meth:`DistributionSettings.load`.
_config_files: ContextVar[tuple[Path, ...]] = ContextVar("celery_services_config_files", default=())


class _DistributionTableSource(TomlConfigSettingsSource):
    """The ``[distribution]`` table of one TOML file; a file without that table gives no settings."""

    def __init__(self, settings_cls: type[BaseSettings], toml_file: Path) -> None:
        self._fields = list(settings_cls.model_fields)  # read by _read_file, which the base calls
        super().__init__(settings_cls, toml_file=toml_file, toml_table_header=(TABLE,))

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{file_path}: invalid TOML: {exc}") from exc
        table = data.get(TABLE, {})
        if not isinstance(table, dict):
            raise ValueError(f"{file_path}: [{TABLE}] must be a table, not {type(table).__name__}")
        for key in table:
            if key not in self._fields:
                raise ValueError(
                    f"{file_path}: unknown setting '{key}' in [{TABLE}]{_closest(key, self._fields)}"
                )
        return {TABLE: table}


def config_files(path: str | os.PathLike[str] | None = None) -> list[Path]:
    """The configuration files :meth:`DistributionSettings.load` reads, lowest priority first.

    Args:
        path: The base file; default: ``$CELERY_SERVICES_CONFIG``, else ``config/default.toml`` in the
            current directory when it exists.

    Returns:
        The base file (when there is one), then ``{its directory}/{$CELERY_SERVICES_ENV}.toml`` when that
        variable names an environment (``config/`` of the current directory without a base file).

    Raises:
        FileNotFoundError: A file named explicitly (argument or environment variable) does not exist.
        ValueError: ``CELERY_SERVICES_ENV`` is not a plain name.
    """
    named = path if path is not None else os.environ.get(CONFIG_ENV_VAR) or None
    files: list[Path] = []
    if named is not None:
        base = Path(named).resolve()
        if not base.is_file():
            raise FileNotFoundError(f"configuration file {base} does not exist")
        files.append(base)
    else:
        default = (Path.cwd() / "config" / "default.toml").resolve()
        if default.is_file():
            files.append(default)
    env_name = os.environ.get(ENV_NAME_VAR, "")
    if env_name:
        if not _NAME.fullmatch(env_name):
            raise ValueError(f"{ENV_NAME_VAR}={env_name!r} must match [A-Za-z0-9_-]+")
        folder = files[0].parent if files else (Path.cwd() / "config").resolve()
        env_file = folder / f"{env_name}.toml"
        if not env_file.is_file():
            raise FileNotFoundError(f"{ENV_NAME_VAR}={env_name!r} but {env_file} does not exist")
        if env_file not in files:
            files.append(env_file)
    return files


@contextmanager
def reading(files: tuple[Path, ...]) -> Iterator[None]:
    """Make ``files`` (lowest priority first) the files read by the settings built inside the block."""
    token = _config_files.set(files)
    try:
        yield
    finally:
        _config_files.reset(token)


def file_sources(settings_cls: type[BaseSettings]) -> tuple[PydanticBaseSettingsSource, ...]:
    """The ``[distribution]`` tables of the files being read, highest priority (environment file) first.

    Outside a :func:`reading` block there are none: settings built directly read no file.
    """
    return tuple(_DistributionTableSource(settings_cls, path) for path in reversed(_config_files.get()))
