"""cglab: train CodeGen2-style code LMs on Megatron-Core under Ray, and run the CodeGen2 lesson ablations."""

__version__ = "0.1.0"
