import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = "rigl_ds_autohook.pth"


class BuildPyWithPth(build_py):
    """Ships ``rigl_ds_autohook.pth`` (see rigl_ds_autohook.py) at the top of site-packages, for a
    normal install (via build_lib) and an editable one (setuptools points ``install_lib`` at the
    editable wheel's root there)."""

    def run(self):
        super().run()
        target = self.get_finalized_command("install").install_lib if getattr(self, "editable_mode", False) else None
        self.copy_file(PTH, os.path.join(target or self.build_lib, PTH))


setup(
    name="rigl_ds",
    version="0.1.0",
    description="Sparse training from scratch (RigL and baselines) for PyTorch and DeepSpeed, masks sharded with ZeRO",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["rigl_ds", "rigl_ds.*"]),
    py_modules=["rigl_ds_autohook"],
    cmdclass={"build_py": BuildPyWithPth},
    package_data={"rigl_ds.corpus": ["kjv.txt.xz", "kjv.json", "kjv.sha256", "README.md", "make_kjv.sh"]},
    python_requires=">=3.10",
    # Ranges verified together: torch 2.13.0 (CPU) + deepspeed 0.19.8 + transformers 5.24.0 + datasets 5.2.0
    # + accelerate 1.15.0 here; torch 2.11 / transformers 5.17 are what the GPU machines carry.
    # Install torch first (pip install torch==2.13.0 on CPU), or pip pulls a CUDA build.
    # The core and the DeepSpeed plugin (safetensors: rigl-ds-export; tqdm: the launch scripts' progress).
    install_requires=[
        "torch>=2.11,<2.14",
        "deepspeed>=0.19.8,<0.20",
        "pydantic>=2.10,<3",
        "tqdm>=4.66",
        "safetensors>=0.4,<1",
    ],
    extras_require={
        # The LM job (rigl_ds.lm, launch/train_lm.py, rigl-ds-plot) and the HF Trainer / accelerate wrappers.
        "lm": [
            "transformers>=5.17,<6",
            "datasets>=5.2,<6",
            "accelerate>=1.15,<2",
            "tokenizers>=0.21,<1",
            "matplotlib>=3.8,<4",
            "tensorboard>=2.15,<3",
        ],
        # The tests exercise the LM job and the HF wrappers too.
        "test": ["rigl_ds[lm]", "pytest>=9.2,<10", "hypothesis>=6.100,<7"],
    },
    entry_points={
        "console_scripts": ["rigl-ds-export = rigl_ds.export:main", "rigl-ds-plot = rigl_ds.lm.plot:main"]
    },
)
