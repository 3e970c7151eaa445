"""`python -m workers worker --model NAME [--beat]` or `python -m workers beat` (workers.process)."""

import sys

from workers.process import main

sys.exit(main())
