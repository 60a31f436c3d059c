"""python -m vhostuser.blkload: the vhostuser-blkload command."""
import sys

from .cli import main

sys.exit(main())
