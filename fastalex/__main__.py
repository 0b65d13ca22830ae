"""`python -m fastalex` (and `torchrun -m fastalex`) runs the command line."""

from fastalex.cli import main

main()
