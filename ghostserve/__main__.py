import sys

from ghostserve.cli import main

sys.exit(main())
