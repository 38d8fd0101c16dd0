"""`python -m omnigpt.train ARGS` is `omnigpt train ARGS` (handy under torchrun: `torchrun ... -m omnigpt.train ...`)."""

import sys

from omnigpt.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
