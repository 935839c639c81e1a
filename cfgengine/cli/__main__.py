"""`python -m cfgengine.cli …` runs the `cfgengine` command."""
import sys

from cfgengine.cli import main

sys.exit(main())
