# The repo shows the kernels at the top level (kernels/); they install as fusedopt.kernels,
# so nothing called `kernels` lands in site-packages.
from setuptools import setup

setup(
    packages=["fusedopt", "fusedopt.kernels"],
    package_dir={"fusedopt": "fusedopt", "fusedopt.kernels": "kernels"},
    # host.cpp is compiled at first use or by `fusedopt warmup` (fusedopt/host.py), not here:
    # pip builds in an isolated environment without torch, and the helper must be compiled
    # against the torch that will load it (and again when that torch is upgraded)
    package_data={"fusedopt.kernels": ["host.cpp"]},
)
