"""python -m vhostuser.sandbox PROGRAM [KIND...]: the filter's rules."""
import sys

from .policy import main

sys.exit(main())
