"""`python -m decoderlab` (and `torchrun -m decoderlab`) run the command line."""

from .cli import main

main()
