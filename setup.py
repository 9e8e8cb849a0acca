"""
Packaging for skynet: services, clients, registry, daemon and tools.
"""

from setuptools import find_packages, setup

setup(
    name="skynet",
    version="0.1.0",
    description="Massively distributed services on Twisted, wire compatible with Go Skynet",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["skynet", "skynet.*"]) + ["twisted.plugins"],
    package_data={
        "twisted": ["plugins/skynet_plugin.py"],
        "skynet.web": ["static/*"],
    },
    include_package_data=True,
    install_requires=[
        "twisted[conch]>=24.7",
        "attrs>=23.1",
        "zope.interface>=6.0",
        "pymongo>=4.6",
        "kazoo>=2.9",
        "klein>=23.12",
        "autobahn>=23.6",
        "psutil>=5.9",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "hypothesis>=6.100",
            "treq>=23.11",
            "playwright>=1.40",
        ],
        "dev": ["ruff", "mypy", "mypy-zope", "types-psutil"],
    },
    entry_points={"console_scripts": ["sky = skynet.sky:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
    ],
)
