"""
C{python -m skynet.cluster COMMAND ...}: the cluster's commands (see
L{skynet.cluster.commands}), as C{sky COMMAND ...} runs them.
"""

import sys

from skynet.cluster.commands import main

sys.exit(main())
