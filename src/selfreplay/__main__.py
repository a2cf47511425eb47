"""``python -m selfreplay`` (also what ``torchrun -m selfreplay`` runs)."""

from selfreplay.cli import main

main()
