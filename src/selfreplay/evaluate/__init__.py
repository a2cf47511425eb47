"""Measuring forgetting: held-out loss and KL to the teacher (:mod:`.metrics`), the ``selfreplay eval`` report,
multiple-choice benchmarks, and the quality of replay corpora."""
