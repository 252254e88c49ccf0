"""rlj: JAX-native reinforcement-learning post-training for language models."""
import pathlib

import setuptools

_here = pathlib.Path(__file__).parent
_reqs = [
    line.strip() for line in (_here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setuptools.setup(
    name="rlj",
    version="0.1.0",
    description="JAX/TPU-native RL post-training (GRPO, GDPO, P3O, DNO) for language models",
    packages=setuptools.find_packages(include=["rlj*", "models*", "rewards*", "algorithms*", "configs*", "launch*"]),
    python_requires=">=3.10",
    install_requires=_reqs,
    extras_require={"test": ["pytest>=8", "torch==2.13.0", "transformers>=4.50"],
                    "tpu": ["jax[tpu]>=0.10,<0.11"]},
)
