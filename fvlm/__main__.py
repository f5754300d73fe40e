import sys

from fvlm.cli import main

sys.exit(main())
