"""The package map: the top-level folders app/, tasks/, adapters/ and migrations/ install as courier.app,
courier.tasks, courier.adapters and courier.migrations, so a host's own `app` or `tasks` never meets ours.
Everything else about the distribution is declared in setup.cfg."""
from setuptools import find_namespace_packages, setup

PARTS = ("app", "tasks", "adapters", "migrations")
package_dir = {"courier": "courier", **{f"courier.{part}": part for part in PARTS}}
packages = ["courier", *(f"courier.{part}{'.' + sub if sub else ''}"
                         for part in PARTS for sub in ["", *find_namespace_packages(part, exclude=["*__pycache__*"])])]

setup(package_dir=package_dir, packages=packages)
