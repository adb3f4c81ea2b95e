"""What ``ubsmoe compare`` runs: variants of registered methods, each a method plus config settings.

A variant is written ``method[:key=value[:key=value ...]]``: ``ubsmoe``, ``ubsmoe:pg=false``,
``ubsmoe:zeta=0.25:federation.rounds=3``. A bare key is a method option (``pg`` means ``method.pg``), a
dotted key any config key. The same can be listed in a TOML file, as strings, as tables, or mixed in
one inline list:

    variants = ["ubsmoe", "ubsmoe:pg=false", {method = "ubsmoe", label = "low only", federation.budgets = [0.25]}]

    [[variants]]                               # or, as tables (TOML cannot mix them with a list above)
    method = "ubsmoe"
    label = "ubsmoe, every client at K = 2"    # optional; by default the written form
    federation.budgets = [0.25]
    zeta = 0.5
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ubsmoe.config import ConfigError, flatten_keys


@dataclass(frozen=True)
class Variant:
    """A method and the settings that make this variant of it; ``label`` names it in the report.

    overrides: ``key=value`` config overrides, method options already spelled ``method.<key>``.
    """

    label: str
    method: str
    overrides: tuple[str, ...] = ()

    def folder(self, seed: int) -> str:
        """The run folder's name for ``seed``: the label with every character outside [A-Za-z0-9._=-] as _."""
        return f"{re.sub(r'[^A-Za-z0-9._=-]+', '_', self.label)}-s{seed}"


def _override(key: str, value: str) -> str:
    return f"{key if '.' in key else 'method.' + key}={value}"


def parse_variant(spec: str) -> Variant:
    """``method[:key=value ...]`` -> Variant."""
    method, *settings = [part.strip() for part in spec.strip().split(":")]
    if not method or "=" in method:
        raise ConfigError(f"variant {spec!r} does not start with a method name; write method:key=value, "
                          "e.g. ubsmoe:pg=false (several settings: ubsmoe:pg=false:dmr=false)")
    overrides = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"variant {spec!r}: {setting!r} is not key=value, e.g. ubsmoe:pg=false")
        overrides.append(_override(key.strip(), value.strip()))
    label = ":".join([method] + [s.partition("=")[0].strip() + "=" + s.partition("=")[2].strip() for s in settings])
    return Variant(label, method, tuple(overrides))


def parse_variants(text: str) -> list[Variant]:
    """Comma-separated variants, or the path of a TOML file that lists them."""
    if text.strip().endswith(".toml"):
        return variants_from_toml(Path(text.strip()))
    variants = [parse_variant(part) for part in text.split(",") if part.strip()]
    if not variants:
        raise ConfigError("give at least one method or variant, e.g. --variants ubsmoe,ubsmoe:pg=false")
    return unique_labels(variants)


def variants_from_toml(path: Path) -> list[Variant]:
    """The ``variants`` list of a TOML file: strings in the written form, or tables (see the module doc)."""
    if not path.is_file():
        raise ConfigError(f"variants file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"variants file {path} is not valid TOML: {error}") from None
    items = data.get("variants")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path} needs a non-empty list `variants` (strings like \"ubsmoe:pg=false\" or "
                          "[[variants]] tables with a `method` key)")
    variants = []
    for item in items:
        if isinstance(item, str):
            variants.append(parse_variant(item))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("method"), str):
            raise ConfigError(f"{path}: every entry of `variants` is a string or a table with `method`, got {item!r}")
        settings = flatten_keys({k: v for k, v in item.items() if k not in ("method", "label")})
        overrides = tuple(_override(key, _as_text(value)) for key, value in settings.items())
        label = item.get("label") or ":".join([item["method"]] + [f"{k}={_as_text(v)}" for k, v in settings.items()])
        variants.append(Variant(str(label), item["method"], overrides))
    return unique_labels(variants)


def unique_labels(variants: list[Variant]) -> list[Variant]:
    labels = [v.label for v in variants]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"variants listed twice: {', '.join(repeated)}")
    folders = {}
    for variant in variants:
        other = folders.setdefault(variant.folder(0), variant.label)
        if other != variant.label:
            raise ConfigError(f"variants {other!r} and {variant.label!r} would share a run folder; give one a label")
    return variants


def _as_text(value: Any) -> str:
    """A TOML value as override text (the form ``config.parse_value`` reads)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(_as_text(v) for v in value)
    return str(value)
