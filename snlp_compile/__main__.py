import sys

from snlp_compile.cli import main

sys.exit(main())
