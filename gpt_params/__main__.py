import sys

from gpt_params.cli import main

sys.exit(main())
