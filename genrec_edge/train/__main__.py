"""``python -m genrec_edge.train`` / ``accelerate launch -m genrec_edge.train``: ``genrec-edge train`` with its flags."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
