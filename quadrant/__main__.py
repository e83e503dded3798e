import sys

from quadrant.cli import main

sys.exit(main())
