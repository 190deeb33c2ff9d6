import sys

from ctp.cli import main

sys.exit(main())
