"""Maps two top-level folders into one namespace: service/ is tilert.service and
engine/ is tilert.engine (the rest of the metadata is in pyproject.toml)."""

from setuptools import find_packages, setup

_ROOTS = {"tilert.service": "service", "tilert.engine": "engine"}

setup(
    package_dir=_ROOTS,
    packages=[
        name
        for root, folder in _ROOTS.items()
        for name in [root, *(f"{root}.{sub}" for sub in find_packages(folder))]
    ],
)
