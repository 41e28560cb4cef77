"""`python -m stream_readapt VERB ...`: the same as the `stream-readapt` command."""

import sys

from .cli import main

sys.exit(main())
