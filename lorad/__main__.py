import sys

from lorad.cli.cli import main

sys.exit(main())
