"""What `pip install .` ships: every Python package of the project and the data files it reads at run time
(the per-device launch tables, the recipe presets). A package left out of pyproject.toml installs fine and
only fails on the GPU host, at the first import of the missing module."""

import glob
import os

import tomllib
from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]


def test_every_package_of_the_project_is_installed():
    roots = ("vllm_twinquant", "offline_quantizer", "csrc_triton")
    found = set(find_packages(ROOT, include=[f"{r}" for r in roots] + [f"{r}.*" for r in roots]))
    assert found == set(PROJECT["packages"]), f"pyproject.toml packages {PROJECT['packages']}, on disk {found}"


def test_the_data_files_read_at_run_time_are_package_data():
    data = PROJECT["package-data"]
    for package, folder, ext in (("csrc_triton", "configs", "json"), ("offline_quantizer", "recipes", "yaml")):
        files = glob.glob(os.path.join(ROOT, package, folder, f"*.{ext}"))
        assert files, f"{package}/{folder} has no .{ext} files"
        shipped = {os.path.basename(f) for pat in data.get(package, [])
                   for f in glob.glob(os.path.join(ROOT, package, pat))}
        assert {os.path.basename(f) for f in files} <= shipped, f"{package}/{folder}/*.{ext} not in package-data"
