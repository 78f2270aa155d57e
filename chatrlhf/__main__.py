"""`python -m chatrlhf ...`: the CLI in the form launchers take (`torchrun --nproc_per_node 2 -m chatrlhf sft ...`)."""

import sys

from chatrlhf.cli import main

sys.exit(main())
