"""``python -m optlayers`` runs the command line interface."""
import sys

from optlayers.cli import main

sys.exit(main())
