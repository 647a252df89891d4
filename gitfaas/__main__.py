import sys

from gitfaas.cli import main

sys.exit(main())
