import sys

from dynlm.cli import main

sys.exit(main())
