from setuptools import find_namespace_packages, setup

setup(
    name="minillm",
    version="0.1.0",
    description="A small, exact, readable library for training decoder-only language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Namespace discovery lists minillm/assets (data only, no __init__.py) as the package its files belong to.
    packages=find_namespace_packages(include=["minillm", "minillm.*"], exclude=["*.__pycache__"]),
    package_data={"minillm.assets": ["*"]},
    include_package_data=True,
    install_requires=["torch>=2.1", "tokenizers>=0.15", "numpy", "tqdm", "safetensors"],
    extras_require={
        "serve": ["starlette>=0.40", "uvicorn>=0.30"],
        "gguf": ["gguf>=0.17"],
        # llama-cpp-python builds llama.cpp from source (a C++ compiler and cmake; minutes): the reference
        # the GGUF export is tested against.
        "dev": ["pytest", "transformers>=4.45", "peft", "trl>=1.0", "ruff", "matplotlib",
                "starlette>=0.40", "uvicorn>=0.30", "openai>=1.40", "httpx", "selenium>=4.20",
                "gguf>=0.17", "llama-cpp-python==0.3.36", "jinja2>=3.1",
                "lm_eval>=0.4.9", "pypinyin>=0.50", "llguidance>=1.0", "jsonschema>=4.0", "tensorboard"],
        "plot": ["matplotlib"],
        # --report_to tensorboard: the training scalars for TensorBoard, beside metrics.jsonl.
        "tensorboard": ["tensorboard"],
        # The rhyme tool (minillm/infer/poem_tools.py): pinyin, finals and tones of Chinese characters.
        "tools": ["pypinyin>=0.50"],
        # Constrained decoding (minillm/infer/constrain.py): forced tool calls and response_format in serve.py.
        "grammar": ["llguidance>=1.0"],
        # An outside model's own chat template (Llama 3, Gemma, ...) is Jinja; ChatML needs nothing.
        "jinja": ["jinja2>=3.1"],
    },
)
