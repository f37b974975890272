# The repo shows the kernels at the top level (kernels/); they install as fusedopt.kernels,
# so nothing called `kernels` lands in site-packages.
from setuptools import setup

setup(
    packages=["fusedopt", "fusedopt.kernels"],
    package_dir={"fusedopt": "fusedopt", "fusedopt.kernels": "kernels"},
    package_data={"fusedopt.kernels": ["host.cpp"]},  # compiled at first use (fusedopt/host.py)
)
