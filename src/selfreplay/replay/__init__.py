"""The forgetting penalty: its losses, where replay rows come from (real data, a stored corpus, the teacher's own
samples), how they are sampled and stored, and the one object that computes ``coeff · term``
(:class:`~selfreplay.replay.penalty.ReplayPenalty`)."""
