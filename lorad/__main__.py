import sys

from lorad.cli import main

sys.exit(main())
