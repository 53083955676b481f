"""python -m STNeRPLib: the stnerp worker command."""
import sys

from .worker import main

sys.exit(main())
