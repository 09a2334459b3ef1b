"""``python -m mixgrpo``: the ``mixgrpo`` command line (for launchers that take a module, e.g.
``accelerate launch -m mixgrpo train ...``)."""

import sys

from mixgrpo.commands.cli import main

sys.exit(main())
