"""Data: the BPE tokenizer and token corpora of the built-in GPT, text / chat records of Hugging Face models,
the toy tasks, and the loaders that turn each into :class:`~selfreplay.data.batch.Batch` rows."""
