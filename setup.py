"""Package discovery, which pyproject.toml cannot express for a renamed folder: every package under
lookalike/, and export/ installed as lookalike_export (with any subpackage it grows), so that a
non-editable `pip install .` (the serving image) ships all of them. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["lookalike", "lookalike.*"]),
              "lookalike_export", *(f"lookalike_export.{name}" for name in find_packages("export"))],
    package_dir={"lookalike_export": "export"},
)
