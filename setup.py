"""Packaging: the agent, privd, their twistd plugins and the console scripts."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(name):
    with open(os.path.join(HERE, name)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


version = {}
with open(os.path.join(HERE, "vdsm_twisted", "_version.py")) as f:
    exec(f.read(), version)

setup(
    name="vdsm-twisted",
    version=version["__version__"],
    description="A node virtualization agent for KVM hosts (VDSM's API) on Twisted",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # twisted/plugins has no __init__.py on purpose: it extends Twisted's namespace.
    packages=find_packages(include=["vdsm_twisted", "vdsm_twisted.*", "privd", "privd.*"])
    + ["twisted.plugins"],
    package_data={"twisted.plugins": ["vdsm_twisted_plugins.py"]},
    install_requires=requirements("requirements.txt"),
    entry_points={
        "console_scripts": [
            "vdsm-twisted-client = vdsm_twisted.client.cli:main",
            "vdsm-twisted-tool = vdsm_twisted.tool.cli:main",
        ],
    },
    data_files=[("share/vdsm-twisted/etc", [
        "etc/vdsm.conf", "etc/privd.conf", "etc/vdsmd.service", "etc/privd.service"])],
)
