import sys

from qala.serve.server import main

if __name__ == "__main__":
    sys.exit(main())
