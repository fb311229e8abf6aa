import sys

from vmckpt.cli import main

sys.exit(main())
