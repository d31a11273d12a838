from setuptools import setup

setup(
    name="transformers-hyperllava",
    version="0.1.0",
    description="HyperLLaVA (arXiv 2403.13447) as a Hugging Face Transformers model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The conversion scripts live in the top-level `conversion/` folder and install as a subpackage.
    packages=["transformers_hyperllava", "transformers_hyperllava.conversion"],
    package_dir={
        "transformers_hyperllava": "src/transformers_hyperllava",
        "transformers_hyperllava.conversion": "conversion",
    },
    install_requires=[
        # A bare `torch` pulls a CUDA build on machines without one installed. 2.7 is the oldest the tests pass with
        # (2.6's custom ops take no `list[torch.Tensor]`, and it does not compile Transformers 5.24's LLaVA).
        "torch>=2.7",
        "transformers>=5.17",
        "safetensors",
        "huggingface_hub",
        "accelerate",
        "tokenizers",
        # Read LLaVA-1.5's SentencePiece-only tokenizers (tokenizer.model) in hyperllava-convert.
        "sentencepiece",
        "protobuf",
        "pillow",
        "numpy",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # Triton's interpreter lets the fused-kernel tests run on a CPU, as bitsandbytes' 8-bit layers do.
        "test": ["pytest", "peft", "triton; platform_system == 'Linux'", "bitsandbytes; platform_system == 'Linux'"],
        "dev": [
            "pytest",
            "peft",
            "triton; platform_system == 'Linux'",
            "bitsandbytes; platform_system == 'Linux'",
            "ruff",
        ],
    },
    entry_points={
        "console_scripts": [
            "hyperllava-generate=transformers_hyperllava.generate:main",
            "hyperllava-train=transformers_hyperllava.training:main",
            "hyperllava-demo=transformers_hyperllava.demo:main",
            "hyperllava-convert=transformers_hyperllava.conversion.convert_hyperllava_weights_to_hf:main",
        ]
    },
)
