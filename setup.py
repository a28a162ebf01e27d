from setuptools import find_packages, setup

setup(
    name="hieradet-mmdet",
    version="0.1.0",
    description="HieraDet (Hiera with SAM2's detection trunk) as an MMDetection 3.x backbone, exact to birder.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hieradet_mmdet", "hieradet_mmdet.*"]),
    install_requires=[
        "torch>=2.0",
        "mmengine>=0.7,<1.0",
        "mmcv>=2.0,<2.2",
        "mmdet>=3.0,<3.4",
        "numpy",
        "Pillow",
    ],
    extras_require={
        "safetensors": ["safetensors"],  # reading birder .safetensors checkpoints
        "test": ["pytest", "birder==0.8.4", "safetensors", "pycocotools"],
    },
)
