"""python -m kdaverify: the same as the kdaverify command."""

import sys

from kdaverify.cli import main

sys.exit(main())
