"""klbench: which KL term should your GRPO/PPO run use, and does it matter on your model?

Importing the package is cheap: heavy modules (transformers, hydra, vllm, deepspeed) load
only when a command needs them, so `import klbench.kl` works from any other trainer.
"""

__version__ = "0.1.0"
