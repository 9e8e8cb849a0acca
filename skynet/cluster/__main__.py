"""
C{python -m skynet.cluster COMMAND ...}: the cluster's commands (see
L{skynet.cluster.commands}) until C{sky} offers them.
"""

import sys

from skynet.cluster.commands import main

sys.exit(main())
