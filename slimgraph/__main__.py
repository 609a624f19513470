"""``python -m slimgraph`` runs the CLI (also how ``torchrun -m slimgraph export ...`` starts it)."""

import sys

from slimgraph.cli import main

sys.exit(main())
