"""`python -m pipeline ...` runs the CLI (also what `torchrun -m pipeline` starts)."""

from cli import main

main()
