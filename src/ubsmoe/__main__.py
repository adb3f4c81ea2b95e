import sys

from ubsmoe.cli import main

sys.exit(main())
