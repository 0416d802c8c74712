"""``python -m rlhf_pg`` (and ``accelerate launch -m rlhf_pg``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
