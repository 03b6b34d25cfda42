import sys

from qala.bench.cli import main

sys.exit(main())
