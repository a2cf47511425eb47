"""selfreplay: finetune language models without forgetting (KL replay on real or self-generated data)."""

__version__ = "0.1.0"
