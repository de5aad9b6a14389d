"""`python -m xlstm_eqx.cli`."""

import sys

from . import main


sys.exit(main())
