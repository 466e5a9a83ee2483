"""Build script: the Python packages, with ``kernels/`` installed as ``convrec.kernels``."""

from setuptools import setup

setup(
    packages=[
        "convrec",
        "convrec.baselines",
        "convrec.bench",
        "convrec.kernels",
        "convrec.ops",
    ],
    package_dir={"convrec.kernels": "kernels"},
)
